"""The recount formula (``counts.run.aggregate``): what "Recompute now", reconcile and a drain's
recounts store, and the row locks they take first.

Cached values are corrupted with triggers off (as a restore would) and compared with the
independent truth of ``tests.truth``. What is pinned: the statement is compiled once per graph;
a dry run reports exactly the rows that differ and writes nothing; a write stores the truth and
stamps only the rows it changed; with an amount or an item change still queued, the recount
stores ``truth - pending - adjustment`` (a distinct count: its multiplicities), so that the
drain which follows ends exact rather than counting the change twice (invariant I); a count kept
in full stores its truth; ``lock`` skips rows held elsewhere, never a row a writer only
references, and ``held_elsewhere`` names the skipped rows that exist.
"""

from __future__ import annotations

import datetime
import re

import pytest
from django.apps import apps
from django.db import connection

from counts.apps import graph
from counts.base.mark import Kind, where
from counts.declare.graph import Graph
from counts.declare.modes import Full
from counts.run import aggregate, target_truth
from counts.run.engine_transaction import engine_transaction
from project.monitoring.models import (
    Detection,
    Event,
    Occurrence,
    Project,
    SourceImage,
    SourceImageCollection,
    Taxon,
)
from tests.engine_app.models import Review
from tests.engine_app.truth import assert_engine_counts_exact
from tests.engine_app.truth import cached as library_cached
from tests.engine_app.truth import truth as library_truth
from tests.invariants import assert_invariants
from tests.plans import crowd, plan_reads
from tests.truth import assert_all_counts_exact, cached, drain_all, triggers_off, truth

D, E = "monitoring.deployment", "monitoring.event"
LONG_AGO = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
#: A wait here would be a bug: it fails after this long instead of hanging the run.
NO_WAIT_MS = 2000


def corrupt(table: str, pk: int, **values) -> None:
    sets = ", ".join(f"{column} = %s" for column in values)
    with triggers_off() as cursor:
        cursor.execute(f"UPDATE {table} SET {sets} WHERE id = %s", [*values.values(), pk])


def recount(label: str, ids: list[int]) -> list[aggregate.Change]:
    """Lock and recount ``ids`` with the formula, as "Recompute now" does."""
    statement = aggregate.compile_recompute(graph(), label)
    with engine_transaction() as cursor:
        locked = aggregate.lock(cursor, statement, ids)
        assert locked == sorted(ids)
        return aggregate.run(cursor, statement, locked, write=True)


def test_compiled_once_per_graph_one_subquery_per_join_signature():
    g = graph()
    statement = aggregate.compile_recompute(g, D)
    assert aggregate.compile_recompute(g, D) is statement
    other = Graph.build(list(g.specs))
    assert aggregate.compile_recompute(other, D) is not statement  # a graph of its own
    for label in g.targets:
        specs = g.specs_for(label)
        counted = {s.join_signature for s in specs if not getattr(s.mode, "distinct", None)}
        sql = aggregate.compile_recompute(g, label).sql
        assert len(re.findall(r"\) g(\d+) ON g\1\.pk", sql)) == len(counted), label
    deployment = aggregate.compile_recompute(g, D).sql
    assert len({s.join_signature for s in g.specs_for(D)}) > 1  # several joins, kept apart
    assert "counts_dirtymark" in deployment and where(Kind.DELTA) in deployment  # pending
    only_full = Graph.build([s for s in g.specs if isinstance(s.mode, Full)])
    full = aggregate.compile_recompute(only_full, "counts_testapp.library").sql
    assert "counts_dirtymark" not in full  # a count kept in full stores its truth


def test_a_dry_run_reports_the_rows_that_differ_and_writes_nothing(world, marks):
    corrupt("monitoring_event", world.e1.pk, captures_count=99)
    corrupt("monitoring_event", world.e2.pk, detections_count=7, occurrences_count=5)
    before = cached("monitoring_event")
    statement = aggregate.compile_recompute(graph(), E)
    ids = list(Event.objects.values_list("pk", flat=True))
    with engine_transaction() as cursor:  # as reconcile's dry run: a write would land here
        changes = aggregate.run(cursor, statement, ids, write=False)
    want = truth("monitoring_event")
    assert [c.pk for c in changes] == [world.e1.pk, world.e2.pk]
    for change in changes:
        assert change.old == before[change.pk] and change.new == want[change.pk]
    assert changes[0].fields == ["captures_count"]
    assert sorted(changes[1].fields) == ["detections_count", "occurrences_count"]
    assert cached("monitoring_event") == before


def test_a_write_stores_the_truth_and_stamps_only_the_rows_it_changed(world, marks):
    corrupt("monitoring_event", world.e2.pk, captures_count=99)
    with triggers_off() as cursor:
        cursor.execute("UPDATE monitoring_event SET counts_updated_at = %s", [LONG_AGO])
    ids = sorted(Event.objects.values_list("pk", flat=True))
    changes = recount(E, ids)
    assert [(c.pk, c.fields) for c in changes] == [(world.e2.pk, ["captures_count"])]
    stamps = dict(Event.objects.values_list("pk", "counts_updated_at"))
    assert stamps.pop(world.e2.pk) > LONG_AGO and set(stamps.values()) == {LONG_AGO}
    assert_all_counts_exact()
    statement = aggregate.compile_recompute(graph(), E)
    with connection.cursor() as cursor:
        assert aggregate.run(cursor, statement, ids, write=False) == []


def test_a_ranged_statement_recounts_exactly_the_bound_rows(world, library, marks):
    """The bulk passes' statement (``ranged``) reads every table by the batch's id range, for
    speed: its values are the plain statement's, and a row between the bounds that is not
    bound is neither reported nor written (a pass writes only the rows it claimed)."""
    g = graph()
    for label in g.targets:
        model = apps.get_model(label)
        table = model._meta.db_table
        ids = sorted(model._base_manager.values_list("pk", flat=True))
        if len(ids) < 3:
            continue
        for pk in ids:  # every row off by one, every count
            with triggers_off() as cursor:
                sets = ", ".join(f"{s.column} = {s.column} + 1" for s in g.specs_for(label))
                cursor.execute(f"UPDATE {table} SET {sets} WHERE id = %s", [pk])
        plain = aggregate.compile_recompute(g, label)
        ranged = aggregate.compile_recompute(g, label, ranged=True)
        assert ranged is not plain and ranged.sql != plain.sql
        bound = [ids[0], ids[-1]]  # the rows between are left out
        with engine_transaction() as cursor:
            want = aggregate.run(cursor, plain, ids, write=False)
            got = aggregate.run(cursor, ranged, ids, write=False)
            assert got == want and len(got) == len(ids), label
            written = aggregate.run(cursor, ranged, bound, write=True)
        assert [c.pk for c in written] == bound, label
        with engine_transaction() as cursor:
            left = aggregate.run(cursor, plain, ids, write=False)
        assert [c.pk for c in left] == ids[1:-1], label
        recount(label, ids)
    assert_all_counts_exact()
    assert_engine_counts_exact()


@pytest.mark.django_db
def test_a_ranged_recount_reads_its_range_once_however_few_rows_it_binds(marks):
    """The planner took the bound list and the range on one key for one row and ran each
    grouped subquery again for every target row: at 10^7, 909 captures cost 909
    re-aggregations of their range (300 ms against 33 ms for 5,000 rows), and a pass whose
    chunks are sized by their cost shrank them into that. A ranged recount reads each
    capture's detections once, for a chunk of any size."""
    ids = crowd(4000)
    with connection.cursor() as cursor:
        for table in ("monitoring_sourceimage", "monitoring_detection"):
            cursor.execute(f"ANALYZE {table}")
    statement = aggregate.compile_recompute(graph(), "monitoring.sourceimage", ranged=True)
    for size in (16, 300, 1000):
        chunk = ids[2000 : 2000 + size]
        with engine_transaction() as cursor:
            scanned, _thrown = plan_reads(cursor, statement.dry_sql, statement.bind(chunk))
        assert scanned["monitoring_detection"] <= 2 * size, (size, scanned)


def test_an_amount_still_queued_is_left_out_of_the_recount(world, marks):
    """A capture's +1 waits as a delta mark: the recount stores truth - 1, the drain adds it."""
    corrupt("monitoring_deployment", world.d1.pk, captures_count=50)
    corrupt("monitoring_event", world.e1.pk, captures_count=50)
    SourceImage.objects.create(
        deployment=world.d1, event=world.e1, timestamp=world.i1.timestamp, path="a/new.jpg"
    )
    recount(D, [world.d1.pk])
    recount(E, [world.e1.pk])
    want = {"d": truth("monitoring_deployment"), "e": truth("monitoring_event")}
    assert cached("monitoring_deployment")[world.d1.pk]["captures_count"] == (
        want["d"][world.d1.pk]["captures_count"] - 1
    )
    assert cached("monitoring_event")[world.e1.pk]["captures_count"] == (
        want["e"][world.e1.pk]["captures_count"] - 1
    )
    assert_invariants()
    drain_all()
    assert_all_counts_exact()


def test_an_item_change_still_queued_is_left_out_of_the_recount(world, marks):
    """A detection on i3 waits as an item mark: every count it will credit stores truth - 1
    (its adjustment), and the drain that credits it ends exact, not one too many."""
    Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])
    rows = {
        "monitoring_deployment": (D, world.d1.pk, "detections_count"),
        "monitoring_event": (E, world.e2.pk, "detections_count"),
        "monitoring_sourceimage": ("monitoring.sourceimage", world.i3.pk, "detections_count"),
        "monitoring_sourceimagecollection": (
            "monitoring.sourceimagecollection",
            world.c1.pk,
            "source_images_with_detections_count",
        ),
    }
    for table, (label, pk, column) in rows.items():
        corrupt(table, pk, **{column: 40})
        recount(label, [pk])
        assert cached(table)[pk][column] == truth(table)[pk][column] - 1, table
    assert_invariants()
    drain_all()
    assert_all_counts_exact()


def test_a_distinct_count_is_read_from_the_multiplicities(world, marks):
    """A new taxon at d1 is not counted until its item is drained: the recount stores the
    pairs the ledgers credit now, not a fresh distinct count of the base tables."""
    corrupt("monitoring_deployment", world.d1.pk, taxa_count=30)
    moth_like = Taxon.objects.create(name="Hyalophora cecropia")
    Occurrence.objects.create(
        deployment=world.d1, event=world.e2, determination=moth_like, determination_score=0.95
    )
    recount(D, [world.d1.pk])
    want = truth("monitoring_deployment")[world.d1.pk]["taxa_count"]
    assert cached("monitoring_deployment")[world.d1.pk]["taxa_count"] == want - 1
    assert_invariants()
    drain_all()
    assert_all_counts_exact()


def test_counts_whose_filters_are_or_ed_into_one_where_keep_their_own_values(library, marks):
    """A group's subquery drops the rows none of its counts wants (their filters OR-ed in its
    WHERE) before aggregating them: each count still counts only what its own filter passes.
    The library's four filtered review counts, recounted without the unfiltered one that
    keeps them from being filtered together in the app's statement, against the hand-written
    truth, for every library and for a range of them."""
    Library = apps.get_model("counts_testapp.library")
    specs = [s for s in graph().specs_for("counts_testapp.library") if s.filter is not None]
    assert len(specs) == 4 and len(target_truth._groups(tuple(specs))) == 1
    assert target_truth._counted_rows(specs) is not None, "the case under test: filtered"
    want = library_truth("counts_testapp_library")
    ids = sorted(want)
    for ranged in (False, True):
        sql, columns, params = target_truth.truth_sql(Library, specs, connection, ranged=ranged)
        with connection.cursor() as cursor:
            cursor.execute(sql, target_truth.bind(params, ids, ranged))
            got = {row[0]: dict(zip(columns, row[1:], strict=True)) for row in cursor.fetchall()}
        assert got == {pk: {c: want[pk][c] for c in columns} for pk in ids}, ranged
        assert any(v for row in got.values() for v in row.values()), "not all zeros"


def test_a_count_kept_in_full_stores_its_truth(library, marks):
    """Its triggers leave route marks, which exempt nothing: no pending term applies."""
    corrupt("counts_testapp_library", library.city.pk, picked_reviews_count=70)
    Review.objects.create(book=library.sense, stars=2)  # a route mark, not drained
    recount("counts_testapp.library", [library.city.pk, library.school.pk])
    city, column = library.city.pk, "picked_reviews_count"
    stored = library_cached("counts_testapp_library")[city][column]
    assert stored == library_truth("counts_testapp_library")[city][column] != 70
    drain_all()
    assert_engine_counts_exact()


@pytest.mark.django_db(transaction=True)
def test_lock_skips_rows_held_elsewhere_and_held_elsewhere_names_them(world, marks, harness):
    holder, writer, probe = harness.sql("holder"), harness.sql("writer"), harness.sql("probe")
    holder.execute("UPDATE monitoring_event SET updated_at = now() WHERE id = %s", [world.e2.pk])
    # A capture under e1, not committed: its foreign-key check holds e1 FOR KEY SHARE.
    writer.execute("SET CONSTRAINTS ALL IMMEDIATE")  # checked now, not at commit
    writer.execute(
        "INSERT INTO monitoring_sourceimage (deployment_id, event_id, timestamp, path,"
        " detections_count, created_at, updated_at) VALUES (%s, %s, now(), 'w.jpg', 0,"
        " now(), now())",
        [world.d1.pk, world.e1.pk],
    )
    gone = world.e3.pk + 1000
    statement = aggregate.compile_recompute(graph(), E)
    ids = [world.e3.pk, gone, world.e1.pk, world.e2.pk]
    with engine_transaction(lock_timeout_ms=NO_WAIT_MS) as cursor:
        locked = aggregate.lock(cursor, statement, ids)
        assert locked == [world.e1.pk, world.e3.pk], "in id order, e1 although referenced"
        assert aggregate.held_elsewhere(cursor, statement, ids, locked) == [world.e2.pk]
        free = probe.execute(
            "SELECT id FROM monitoring_event WHERE id = ANY(%s) FOR NO KEY UPDATE SKIP LOCKED",
            [[world.e1.pk, world.e3.pk]],
        )
        assert free == [], "lock returned rows it does not hold"
        aggregate.run(cursor, statement, locked, write=True)
    probe.rollback()
    holder.rollback()
    writer.commit()
    drain_all()
    assert_all_counts_exact()


def _collection_with(ids: list[int], name: str) -> SourceImageCollection:
    collection = SourceImageCollection.objects.create(project=Project.objects.first(), name=name)
    collection.images.add(*ids)
    return collection


@pytest.mark.django_db
def test_a_small_batch_is_recounted_by_probes_a_large_one_as_the_planner_likes(marks, monkeypatch):
    """The planner sizes a set its statistics do not know yet by the average of the others: at
    10^6 a new set of 200 captures beside eleven sharing 1.27M memberships was taken for
    106,000, and its recount hashed every detection and occurrence (481 ms for "Recompute
    now"; 9.5 ms by index probes). A batch whose stored counts add up to few rows is recounted
    with hash and merge joins off; a larger one keeps the planner's choice. Both exact, and
    the transaction's own planner settings are as they were afterwards."""
    ids = crowd(300)
    large = _collection_with(ids, "large")
    small = _collection_with(ids[:3], "small")
    drain_all()
    # A "large" batch here: stored counts adding up to more than 100 rows.
    monkeypatch.setattr(aggregate, "PROBES_BELOW", 100, raising=False)
    statement = aggregate.compile_recompute(graph(), "monitoring.sourceimagecollection")
    seen = []

    def spy(execute, sql, params, many, context):
        if sql == statement.dry_sql:
            cursor = context["cursor"]
            cursor.execute("SELECT current_setting('enable_hashjoin')")
            seen.append(cursor.fetchone()[0])
        return execute(sql, params, many, context)

    with engine_transaction() as cursor, connection.execute_wrapper(spy):
        cursor.execute("SET LOCAL enable_mergejoin = off")
        for batch in ([small.pk], [large.pk], [small.pk, large.pk]):
            assert aggregate.run(cursor, statement, batch, write=False) == []
        cursor.execute(
            "SELECT current_setting('enable_hashjoin'), current_setting('enable_mergejoin')"
        )
        assert cursor.fetchone() == ("on", "off")
    assert seen == ["off", "on", "on"]
    corrupt("monitoring_sourceimagecollection", small.pk, source_images_count=7)
    corrupt("monitoring_sourceimagecollection", large.pk, source_images_with_detections_count=7)
    recount("monitoring.sourceimagecollection", [small.pk])
    recount("monitoring.sourceimagecollection", [large.pk])
    want = truth("monitoring_sourceimagecollection")
    got = cached("monitoring_sourceimagecollection")
    assert got[small.pk] == want[small.pk] and got[large.pk] == want[large.pk]
    assert got[small.pk]["source_images_count"] == 3
