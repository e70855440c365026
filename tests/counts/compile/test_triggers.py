"""The trigger compiler: pure SQL text first, then what PostgreSQL actually has installed.

``counts.compile.triggers`` turns the dependency graph into SQL without a database, so most of these
tests read the text: PostgreSQL's rules for transition tables (one event per trigger, no
``UPDATE OF``), index-friendly ``= ANY(ids)`` probes, one mark per target model. The last tests
check the database: the migrations installed exactly the compiled triggers, and a statement
touching 10,000 rows writes one mark row per target model, not 10,000.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from django.apps import apps
from django.db import connection

from counts.apps import graph
from counts.base.names import MARK_TABLE, OPERATIONS
from counts.compile.compiled import object_name
from counts.compile.triggers import compile_mark_triggers, compile_triggers
from counts.declare.graph import Graph
from counts.declare.resolve import resolve_all
from counts.operate.status import trigger_states
from tests.truth import assert_all_counts_exact, cached, drain_all

REFERENCING = {
    "insert": "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT",
    "update": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT",
    "delete": "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT",
}


@pytest.fixture(scope="module")
def compiled():
    return compile_mark_triggers(graph())


def by_key(compiled) -> dict[tuple[str, str], str]:
    return {(t.table, t.operation): t.sql for t in compiled}


def test_names_are_predictable_and_fit_postgres_identifiers(compiled):
    assert all(len(t.name) <= 63 for t in compiled)
    assert object_name("monitoring_detection", "insert") == "counts_ins_monitoring_detection"
    long_a, long_b = "x" * 70 + "_a", "x" * 70 + "_b"
    names = {object_name(long_a, "update"), object_name(long_b, "update")}
    assert len(names) == 2 and all(len(n) <= 63 for n in names)
    assert object_name(long_a, "update") == object_name(long_a, "update")


def test_one_trigger_per_table_and_operation(compiled):
    keys = Counter((t.table, t.operation) for t in compiled)
    assert set(keys.values()) == {1}
    for t in compiled:
        assert t.sql.count("CREATE TRIGGER") == 1
        assert f'AFTER {t.operation.upper()} ON "{t.table}"' in t.sql
        assert " OF " not in t.sql.split("CREATE TRIGGER", 1)[1]  # no UPDATE OF column list
        assert t.operation in OPERATIONS


def test_transition_tables_are_referenced_per_operation(compiled):
    for t in compiled:
        if t.operation == "truncate":
            assert "REFERENCING" not in t.sql
        else:
            assert REFERENCING[t.operation] in t.sql


def test_only_tables_a_domain_count_reads_are_watched(compiled):
    tables = {t.table for t in compiled if t.table.startswith("monitoring_")}
    assert tables == {
        "monitoring_deployment",
        "monitoring_detection",
        "monitoring_event",
        "monitoring_occurrence",
        "monitoring_project",
        "monitoring_sourceimage",
        "monitoring_sourceimagecollection_images",
    }
    ops = {(t.table, t.operation) for t in compiled}
    # Parents reached by forward hops matter only when a read column changes.
    assert ("monitoring_project", "update") in ops
    assert ("monitoring_project", "insert") not in ops
    assert ("monitoring_project", "delete") not in ops


def test_truncate_recounts_own_row_targets_and_recomputes_every_credited_item(compiled):
    sql = by_key(compiled)[("monitoring_sourceimagecollection_images", "truncate")]
    assert "VALUES ('monitoring.sourceimagecollection', NULL)" in sql
    assert "FROM counts_ledger WHERE kind = 'item:monitoring.sourceimage'" in sql
    # The stations', nights' and sets' detection counts follow from their captures' ledgers.
    assert "'monitoring.deployment'" not in sql


def test_incremental_triggers_read_only_their_own_rows(compiled):
    """No probe into another table, no join: what a statement records depends on its rows
    alone, so no concurrent writer can make it record the wrong targets."""
    for table in (
        "monitoring_detection",
        "monitoring_sourceimage",
        "monitoring_sourceimagecollection_images",
        "monitoring_event",
    ):
        for op in ("insert", "update", "delete"):
            sql = by_key(compiled).get((table, op))
            if sql is None:
                continue
            body = sql.split("$counts$")[1]
            assert not re.search(r'FROM "monitoring_\w+"', body), (table, op)
            assert " JOIN " not in body, (table, op)


def test_deltas_are_exact_amounts_and_item_marks_are_ids(compiled):
    sql = by_key(compiled)[("monitoring_sourceimage", "update")]
    # A capture's own-row counts: +1 at its new station, -1 at its old one.
    assert "'monitoring.deployment' AS target, 'captures_count' AS field" in sql
    assert "-1 AS d" in sql and "HAVING sum(x.d) <> 0" in sql
    # The capture, as an item, from its own id when its links change.
    assert "'item:monitoring.sourceimage' AS target, r.\"id\" AS id" in sql
    detection = by_key(compiled)[("monitoring_detection", "update")]
    # A detection: its capture as an item, from its old and new source_image_id, and no delta.
    assert "'item:monitoring.sourceimage' AS target, r.\"source_image_id\" AS id" in detection
    assert "deltas" not in detection


def test_one_statement_writes_one_mark_per_count_and_per_item_kind(compiled):
    for t in compiled:
        if t.operation == "truncate":
            continue
        body = t.sql.split("$counts$")[1]
        # deltas (one row per count), item marks (one row per kind), recounts (full counts),
        # and one job mark per job the table starts
        jobs = len(re.findall(r"'job:[0-9a-f]{12}'", body))
        assert body.count(f"INSERT INTO {MARK_TABLE}") - jobs <= 3, t.name


def test_occurrence_counts_mark_items_and_a_threshold_change_writes_one_job(compiled):
    """Occurrence counts (a threshold reached by F(), distinct taxa) are kept through the
    occurrences' ledgers: a written occurrence marks itself from its own columns; a threshold
    change writes one job mark naming only the project, with old and new values, and reads no
    other table (the drain expands it into the occurrences it can flip)."""
    sql = by_key(compiled)[("monitoring_occurrence", "insert")]
    assert "'item:monitoring.occurrence' AS target, r.\"id\" AS id FROM new_rows r" in sql
    assert "'monitoring.deployment'" not in sql and "'monitoring.event'" not in sql
    project = by_key(compiled)[("monitoring_project", "update")].split("$counts$")[1]
    assert len(re.findall(r"'job:[0-9a-f]{12}'", project)) == 1
    assert 'jsonb_build_array(o."default_filters_score_threshold"' in project
    assert 'monitoring_deployment"' not in project and 'monitoring_occurrence"' not in project
    station = by_key(compiled)[("monitoring_deployment", "update")].split("$counts$")[1]
    # Its occurrences, all of them: once for the threshold they now read, once for the
    # project whose taxa they now count (a link job, named by the station's id).
    assert len(re.findall(r"'job:[0-9a-f]{12}'", station)) == 2
    assert 'o."project_id" IS DISTINCT FROM n."project_id"' in station


def test_compilation_is_pure_and_deterministic(compiled):
    rebuilt = compile_mark_triggers(Graph.build(resolve_all(apps.get_models())))
    assert [t.as_dict() for t in rebuilt] == [t.as_dict() for t in compiled]
    assert [t.hash for t in rebuilt] == [t.hash for t in compiled]


@pytest.mark.django_db
def test_migrations_installed_exactly_the_compiled_triggers():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, t.tgname, obj_description(t.oid, 'pg_trigger')"
            " FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " WHERE t.tgname LIKE 'counts\\_%%' AND NOT t.tgisinternal"
        )
        installed = {(table, name): comment for table, name, comment in cursor.fetchall()}
    assert installed == {(t.table, t.name): t.hash for t in compile_triggers(graph())}
    assert {s["state"] for s in trigger_states()} == {"INSTALLED"}


@pytest.mark.django_db
def test_an_outdated_trigger_is_reported(compiled):
    t = compiled[0]
    with connection.cursor() as cursor:
        cursor.execute(f"COMMENT ON TRIGGER {t.name} ON \"{t.table}\" IS 'stale'")
    states = {(s["table"], s["name"]): s["state"] for s in trigger_states()}
    assert states[(t.table, t.name)] == "OUTDATED"


@pytest.mark.django_db
def test_a_10000_row_statement_writes_one_mark_per_target_model(world, marks):
    images = [world.i1.pk, world.i3.pk, world.i4.pk, world.i5.pk]
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
            " SELECT (%s::bigint[])[1 + n %% 4], '[1, 1, 2, 2]', now(), now()"
            " FROM generate_series(1, 10000) n",
            [images],
        )
        assert cursor.rowcount == 10000
    rows = marks.rows()
    # One item mark for 10,000 rows (the captures' own count is credited from it too).
    assert [target for target, _ in rows] == ["item:monitoring.sourceimage"]
    assert dict(rows)["item:monitoring.sourceimage"] == sorted(images)
    drain_all()
    with connection.cursor() as cursor:
        cursor.execute("UPDATE monitoring_detection SET bbox = NULL WHERE id > %s", [world.det5.pk])
    assert len(marks.rows()) == 1
    drain_all()
    assert_all_counts_exact()
    assert cached("monitoring_sourceimage")[world.i1.pk]["detections_count"] == 2
