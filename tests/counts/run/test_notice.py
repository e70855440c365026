"""The after-commit notice names exactly the targets a statement's writes can dirty.

A missed notice leaves a count stale until the scheduler's sweep (seconds); a false one sends a
useless message. The notice is judged from SQL text, so these tests feed it the text it really
meets: what Django itself generates for every ORM write path (recorded by an execute wrapper,
as the watcher sees it: placeholders, not values), and hand-written SQL with comments,
literals, CTEs, quoting and schemas. The end-to-end tests then check the notice a transaction
registers, and that the counts it announces converge.
"""

from __future__ import annotations

import time

import pytest
from django.db import connection, transaction

from counts.apps import graph
from counts.base.names import OPERATIONS
from counts.run.notice import WriteWatcher, _Notice, quiet
from counts.run.statements import ANY_TABLE, HEAD, statement_writes
from project.monitoring.models import (
    Deployment,
    Detection,
    Project,
    SourceImageCollection,
    Taxon,
)
from tests.conftest import build_world
from tests.truth import assert_all_counts_exact, drain_all

D, E, S, C = (
    "monitoring.deployment",
    "monitoring.event",
    "monitoring.sourceimage",
    "monitoring.sourceimagecollection",
)
EVERY = {D, E, S, C}
ITEM = "item:monitoring.sourceimage"
#: What a project's threshold change announces: a job over its occurrences
#: (``counts.declare.jobs``).
OCC = "item:monitoring.occurrence"
#: What a write to detections announces: the captures as items (their own detections count
#: included, ``counts.declare.modes.fold_into_items``), and the occurrences, which reach
#: capture sets through their detections' captures.
DETECTIONS = {ITEM, "item:monitoring.occurrence"}
#: Stands for every target of every installed app.
ALL_TARGETS = object()
DET, PROJ, DEP, IMG, EVT, TAXON = (
    "monitoring_detection",
    "monitoring_project",
    "monitoring_deployment",
    "monitoring_sourceimage",
    "monitoring_event",
    "monitoring_taxon",
)
THROUGH = "monitoring_sourceimagecollection_images"
BOX = [10, 10, 20, 20]
LONG_SELECT = ", ".join(f"d.bbox AS c{i}" for i in range(800))  # ~14 KB, within HEAD
ROWS = ", ".join(["(%s, %s, %s)"] * 40000)  # a bulk insert's VALUES, ~600 KB


def watcher() -> WriteWatcher:
    return WriteWatcher.for_graph(graph())


def ops(table: str, *operations: str) -> set[tuple[str, str]]:
    return {(table, op) for op in operations}


# (what, SQL, the (table, operation) pairs it writes, the targets announced)
RAW = [
    (
        "plain delete",
        "DELETE FROM monitoring_detection WHERE id = 1",
        ops(DET, "delete"),
        DETECTIONS,
    ),
    (
        "comment first",
        "/* hint */ DELETE FROM monitoring_detection",
        ops(DET, "delete"),
        DETECTIONS,
    ),
    (
        "line comment first",
        "-- why\nDELETE FROM monitoring_detection",
        ops(DET, "delete"),
        DETECTIONS,
    ),
    (
        "nested comment",
        "/* a /* b */ c */ DELETE FROM monitoring_detection",
        ops(DET, "delete"),
        DETECTIONS,
    ),
    (
        "comment inside",
        "DELETE /* x */ FROM -- y\n monitoring_detection",
        ops(DET, "delete"),
        DETECTIONS,
    ),
    (
        "data-modifying CTE",
        "WITH gone AS (DELETE FROM monitoring_detection WHERE id = 1 RETURNING id)"
        " SELECT count(*) FROM gone",
        ops(DET, "delete"),
        DETECTIONS,
    ),
    (
        "CTE after a long SELECT list",
        f"WITH s AS (SELECT {LONG_SELECT} FROM monitoring_detection d),"
        " gone AS NOT MATERIALIZED (DELETE FROM monitoring_detection RETURNING id)"
        " SELECT count(*) FROM s, gone",
        ops(DET, "delete"),
        DETECTIONS,
    ),
    (
        "main statement after a recursive CTE",
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 3)"
        " UPDATE monitoring_project SET default_filters_score_threshold = 0.1"
        " WHERE id IN (SELECT n FROM t)",
        ops(PROJ, "update"),
        {OCC},
    ),
    (
        "several CTEs",
        "WITH a AS (WITH b AS (SELECT 1) SELECT * FROM b),"
        " c AS MATERIALIZED (UPDATE monitoring_sourceimage SET event_id = NULL RETURNING id)"
        " INSERT INTO monitoring_taxon (name) SELECT id::text FROM c",
        ops(IMG, "update") | ops(TAXON, "insert"),
        {D, E},
    ),
    (
        "quoted name",
        'UPDATE "monitoring_detection" SET "bbox" = %s',
        ops(DET, "update"),
        DETECTIONS,
    ),
    ("schema", "DELETE FROM public.monitoring_detection", ops(DET, "delete"), DETECTIONS),
    (
        "quoted schema",
        'INSERT INTO "public"."monitoring_detection" (bbox) VALUES (NULL)',
        ops(DET, "insert"),
        DETECTIONS,
    ),
    ("ONLY", "UPDATE ONLY monitoring_detection SET bbox = NULL", ops(DET, "update"), DETECTIONS),
    ("DELETE ONLY", "DELETE FROM ONLY monitoring_detection", ops(DET, "delete"), DETECTIONS),
    ("unquoted folds", "delete from Monitoring_Detection", ops(DET, "delete"), DETECTIONS),
    (
        "quoted keeps case",
        'DELETE FROM "Monitoring_Detection"',
        ops("Monitoring_Detection", "delete"),
        set(),
    ),
    (
        "truncate",
        "TRUNCATE TABLE ONLY monitoring_detection, monitoring_event RESTART IDENTITY",
        ops(DET, "truncate") | ops(EVT, "truncate"),
        DETECTIONS,
    ),
    (
        "truncate cascade",
        "TRUNCATE monitoring_taxon CASCADE",
        ops(TAXON, "truncate") | ops(ANY_TABLE, "truncate"),
        ALL_TARGETS,
    ),
    (
        "merge",
        "MERGE INTO monitoring_project p USING (SELECT 1 AS id) s ON p.id = s.id"
        " WHEN MATCHED THEN DELETE",
        ops(PROJ, "insert", "update", "delete"),
        {OCC},
    ),
    ("copy from", "COPY monitoring_detection (bbox) FROM STDIN", ops(DET, "insert"), DETECTIONS),
    (
        "upsert",
        "INSERT INTO monitoring_project (id, name) VALUES (%s, %s)"
        " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
        ops(PROJ, "insert", "update"),
        {OCC},
    ),
    (
        "upsert after a megabyte of VALUES",
        f"INSERT INTO monitoring_project (id, name, created_at) VALUES {ROWS}"
        " ON CONFLICT (id) DO UPDATE SET default_filters_score_threshold = 0.2",
        ops(PROJ, "insert", "update"),
        {OCC},
    ),
    (
        "second statement",
        "SELECT 1; DELETE FROM monitoring_detection;",
        ops(DET, "delete"),
        DETECTIONS,
    ),
    # Writes that reach no count, and statements that write nothing.
    (
        "new project",
        "INSERT INTO monitoring_project (name) VALUES (%s)",
        ops(PROJ, "insert"),
        set(),
    ),
    (
        "upsert that does nothing",
        "INSERT INTO monitoring_project (name) VALUES ('DO UPDATE') ON CONFLICT DO NOTHING",
        ops(PROJ, "insert"),
        set(),
    ),
    (
        "unwatched table",
        'INSERT INTO "monitoring_taxon" ("name") VALUES (%s)',
        ops(TAXON, "insert"),
        set(),
    ),
    (
        "reads a watched table",
        "INSERT INTO monitoring_taxon (name) SELECT bbox::text FROM monitoring_detection",
        ops(TAXON, "insert"),
        set(),
    ),
    ("select", 'SELECT * FROM "monitoring_detection"', set(), set()),
    ("select for update", 'SELECT * FROM "monitoring_detection" FOR UPDATE', set(), set()),
    (
        "CTE select for update",
        "WITH x AS (SELECT 1) SELECT * FROM monitoring_detection FOR UPDATE",
        set(),
        set(),
    ),
    ("copy to", "COPY monitoring_detection TO STDOUT", set(), set()),
    ("explain", "EXPLAIN DELETE FROM monitoring_detection", set(), set()),
    ("string literal", "SELECT 'DELETE FROM monitoring_detection'", set(), set()),
    ("literal after ;", "SELECT 1; SELECT 'x; DELETE FROM monitoring_detection'", set(), set()),
    ("dollar quote", "SELECT 1; SELECT $f$ DELETE FROM monitoring_detection $f$", set(), set()),
    ("E string", r"SELECT 1; SELECT E'\'; DELETE FROM monitoring_detection'", set(), set()),
    ("quoted name", 'SELECT 1; SELECT "; DELETE FROM monitoring_detection" FROM t', set(), set()),
    ("comment", "SELECT 1 -- ; DELETE FROM monitoring_detection", set(), set()),
    (
        "column called delete",
        "WITH x AS (SELECT 1) SELECT count(*) delete FROM monitoring_detection",
        set(),
        set(),
    ),
]


def announced(writes) -> set[str]:
    """What the graph says these ``(table, operation)`` writes can dirty.

    The tables above also list the domain's targets today; a count added later only adds to
    what a write announces, so they are checked as a lower bound.
    """
    found: set[str] = set()
    for table, operation in writes:
        if table == ANY_TABLE:  # everything any trigger can mark
            found |= {
                label
                for watched in graph().routes
                for op in OPERATIONS
                for label in graph().targets_of_operation(watched, op)
            }
        else:
            found |= graph().targets_of_operation(table, operation)
    return found


@pytest.mark.parametrize(
    ("sql", "writes", "targets"), [r[1:] for r in RAW], ids=[r[0] for r in RAW]
)
def test_hand_written_sql_announces_what_it_writes(sql, writes, targets):
    assert statement_writes(sql) == writes
    if targets is ALL_TARGETS:  # every item kind and every model marked by its own rows
        only_items = {"monitoring.sourceimage", "monitoring.project"}  # all their counts are
        targets = set(graph().kinds) | {
            label for label in graph().targets if label not in only_items
        }
    assert watcher().targets_of(sql) == announced(writes) >= targets


def test_a_verb_past_the_head_is_left_to_the_sweep():
    """The documented bound: the tokenizer stops at HEAD, so a later CTE is not read."""
    padding = ", ".join(f"c{i}" for i in range(HEAD // 4))
    sql = f"WITH s AS (SELECT {padding}), g AS (DELETE FROM monitoring_detection) SELECT 1"
    assert statement_writes(sql) == set()
    assert statement_writes(sql.replace(padding, "c0")) == ops(DET, "delete")


def test_a_bulk_insert_is_judged_without_reading_its_values():
    sql = f"INSERT INTO monitoring_detection (source_image_id, bbox, score) VALUES {ROWS * 5}"
    started = time.perf_counter()
    for _ in range(10):
        assert watcher().targets_of(sql) == DETECTIONS
    assert time.perf_counter() - started < 0.5  # tokenizing 3 MB would take seconds


# What Django generates: (what, action on the world, (table, operation) pairs, targets).
DJANGO = [
    (
        "save new",
        lambda w: Detection(source_image=w.i2, bbox=BOX).save(),
        ops(DET, "insert"),
        DETECTIONS,
    ),
    ("save changed", lambda w: _set(w.det3, bbox=BOX), ops(DET, "update"), DETECTIONS),
    ("delete one", lambda w: w.det1.delete(), ops(DET, "delete"), DETECTIONS),
    (
        "queryset update",
        lambda w: Detection.objects.filter(source_image=w.i1).update(bbox=None),
        ops(DET, "update"),
        DETECTIONS,
    ),
    (
        "queryset delete",
        lambda w: Detection.objects.filter(bbox__isnull=True).delete(),
        ops(DET, "delete"),
        DETECTIONS,
    ),
    (
        "bulk_create",
        lambda w: Detection.objects.bulk_create(
            [Detection(source_image=w.i3, bbox=BOX) for _ in range(3)]
        ),
        ops(DET, "insert"),
        DETECTIONS,
    ),
    (
        "bulk_update",
        lambda w: Detection.objects.bulk_update(
            [_moved(w.det1, w.i4), _moved(w.det2, w.i5)], ["source_image"]
        ),
        ops(DET, "update"),
        DETECTIONS,
    ),
    ("M2M add", lambda w: w.c3.images.add(w.i5), ops(THROUGH, "insert"), {C}),
    ("M2M add, other side", lambda w: w.i5.collections.add(w.c1), ops(THROUGH, "insert"), {C}),
    ("M2M remove", lambda w: w.c1.images.remove(w.i1), ops(THROUGH, "delete"), {C}),
    ("M2M clear", lambda w: w.i2.collections.clear(), ops(THROUGH, "delete"), {C}),
    ("M2M set", lambda w: w.c1.images.set([w.i1, w.i4]), ops(THROUGH, "insert", "delete"), {C}),
    (
        "cascade",
        lambda w: w.i1.delete(),
        ops(DET, "delete") | ops(THROUGH, "delete") | ops(IMG, "delete"),
        {D, E, C, ITEM},
    ),
    ("new project", lambda w: Project.objects.create(name="New"), ops(PROJ, "insert"), set()),
    (
        "new station",
        lambda w: Deployment.objects.create(project=w.p1, name="New"),
        ops(DEP, "insert"),
        set(),
    ),
    (
        "threshold change",
        lambda w: _set(w.p1, default_filters_score_threshold=0.7),
        ops(PROJ, "update"),
        {OCC},
    ),
    (
        "project upsert",
        lambda w: Project.objects.bulk_create(
            [Project(id=w.p2.id, name="Panama", default_filters_score_threshold=0.9)],
            update_conflicts=True,
            unique_fields=["id"],
            update_fields=["default_filters_score_threshold"],
        ),
        ops(PROJ, "insert", "update"),
        {OCC},
    ),
    (
        "unwatched upsert",
        lambda w: Taxon.objects.bulk_create(
            [Taxon(name="Actias luna")],
            update_conflicts=True,
            unique_fields=["name"],
            update_fields=["name"],
        ),
        ops(TAXON, "insert", "update"),
        set(),
    ),
    (
        "select for update",
        lambda w: list(Detection.objects.select_for_update().filter(source_image=w.i1)),
        set(),
        set(),
    ),
    ("count", lambda w: SourceImageCollection.objects.filter(images=w.i1).count(), set(), set()),
]


def _set(obj, **values):
    for name, value in values.items():
        setattr(obj, name, value)
    obj.save()


def _moved(detection, image):
    detection.source_image = image
    return detection


@pytest.mark.parametrize(
    ("action", "writes", "targets"), [r[1:] for r in DJANGO], ids=[r[0] for r in DJANGO]
)
def test_django_generated_sql_announces_what_it_writes(world, marks, action, writes, targets):
    seen: list[str] = []

    def record(execute, sql, params, many, context):
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record), transaction.atomic():
        action(world)
    assert seen
    assert set().union(*map(statement_writes, seen)) == writes
    announcing = set().union(*map(watcher().targets_of, seen))
    assert announcing == announced(writes) >= targets
    marked = {target for target, _ids in marks.rows()}
    assert marked <= announcing, "the triggers marked a target left unannounced"


def pending_notice() -> _Notice | None:
    notices = [f for _sids, f, _robust in connection.run_on_commit if isinstance(f, _Notice)]
    assert len(notices) <= 1
    return notices[0] if notices else None


@pytest.fixture
def quiet_world(marks):
    """The world, built and drained without registering a notice in the test's transaction."""
    with quiet():
        w = build_world()
    drain_all()
    assert pending_notice() is None and marks.rows() == []
    return w


@pytest.mark.parametrize(
    "sql",
    [
        "WITH gone AS (DELETE FROM monitoring_detection WHERE id = %s RETURNING id)"
        " SELECT count(*) FROM gone",
        "/* hint */ DELETE FROM monitoring_detection WHERE id = %s",
    ],
    ids=["data-modifying CTE", "comment first"],
)
def test_raw_deletes_are_announced_at_commit(
    quiet_world, marks, django_capture_on_commit_callbacks, sql
):
    with django_capture_on_commit_callbacks() as callbacks, connection.cursor() as cursor:
        cursor.execute(sql, [quiet_world.det4.pk])  # i4's only detection: every model changes
    (notice,) = [c for c in callbacks if isinstance(c, _Notice)]
    assert notice.targets == DETECTIONS
    assert set(marks.by_target()) == EVERY
    drain_all()
    assert_all_counts_exact()


def test_executemany_is_announced(quiet_world, marks, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks, connection.cursor() as cursor:
        cursor.executemany(
            "DELETE FROM monitoring_detection WHERE id = %s",
            [[quiet_world.det1.pk], [quiet_world.det4.pk]],
        )
    (notice,) = [c for c in callbacks if isinstance(c, _Notice)]
    assert notice.targets == DETECTIONS
    drain_all()
    assert_all_counts_exact()


def test_a_new_project_announces_nothing(quiet_world, marks, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        Project.objects.create(name="Quebec", default_filters_score_threshold=0.3)
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO monitoring_project (name, default_filters_score_threshold,"
                " created_at, updated_at) VALUES (%s, 0.4, now(), now())",
                ["Ontario"],
            )
    assert callbacks == [] and pending_notice() is None
    assert marks.rows() == []  # and rightly so: a new project changes no count
    assert_all_counts_exact()
