"""``counts.rebuild``: recompute every row of some models now, leaving no mark it made redundant.

What ``seed_demo`` and ``manage.py counts rebuild`` use instead of spelling out target tables:
drift the triggers never saw is repaired, the marks the pass covered are gone (a drain would only
redo them), and marks it did not cover — other models', and any written during the pass — stay.
"""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

import counts
from counts.base.errors import UnknownTargetError
from counts.run.marks import mark_all
from project.monitoring.models import Event, SourceImageCollection
from tests.api_fixtures import drift
from tests.counts.operate.test_reconciling import write_behind_the_triggers
from tests.interleave import Harness
from tests.truth import assert_all_counts_exact, drain_all, mismatches

D, E, S, C = (
    "monitoring.deployment",
    "monitoring.event",
    "monitoring.sourceimage",
    "monitoring.sourceimagecollection",
)


def test_rebuild_repairs_and_drops_only_the_marks_it_covered(world, marks):
    write_behind_the_triggers(world)
    mark_all(E)
    mark_all(D)
    mark_all(S)
    during = []

    def progress(label: str, checked: int) -> None:
        if not during:  # a writer marks an event while the pass is running
            mark_all(E)
            during.append(label)

    report = counts.rebuild([Event, D], progress=progress)

    assert set(report.models) == {D, E}
    assert report.drifted_rows == 3  # one station and two nights had drifted
    assert not [m for m in mismatches() if m.startswith((f"{D}#", f"{E}#"))]
    assert [target for target, _ in marks.rows()] == [S, E]  # S: not rebuilt; E: written during
    drain_all()
    drifted = {m.split("#")[0] for m in mismatches()} & {D, E, S, C}
    assert drifted == {C}  # drifted, and neither marked nor rebuilt
    counts.rebuild()
    assert_all_counts_exact()
    assert marks.rows() == []


def test_target_rows_sizes_a_pass(world, marks):
    rows = counts.target_rows()

    assert {label: n for label, n in rows.items() if label in (D, E, S, C)} == {
        D: 3,
        E: 3,
        S: 5,
        C: 3,
    }
    assert sum(rows.values()) == counts.rebuild().checked
    with pytest.raises(UnknownTargetError):
        counts.rebuild("counts_testapp.author")  # a model without counts
    assert_all_counts_exact()


@pytest.mark.django_db(transaction=True)
def test_a_rebuild_claims_every_row_only_where_it_drops_marks(make_world, marks):
    """Every row of a model is claimed (a held one marked again) only when the rebuild will
    delete marks of that model: only a lock attempt finds a row a drain is still writing. A
    model with no mark is recounted as reconcile does: an exact row someone holds is not
    marked again."""
    world = make_world()
    harness = Harness()
    try:
        holder = harness.sql("holder")
        holder.execute(
            "UPDATE monitoring_event SET updated_at = now() WHERE id = %s", [world.e2.pk]
        )
        counts.rebuild([Event])
        assert marks.rows() == [], "nothing marked, nothing dropped: nothing to claim"
        mark_all(E)
        counts.rebuild([Event])
        assert [target for target, _ in marks.rows()] == [E], "the held row, marked again"
        holder.rollback()
    finally:
        harness.close()
    drain_all()
    assert_all_counts_exact()


def test_a_rebuild_recounts_each_costly_row_once(world, marks):
    """A capture set's recount reads every membership of the set (half a million, for the
    largest). A rebuild, run where drift is expected, claims such rows first and recounts each
    once; comparing first, then recounting what differed, read every drifted set twice."""
    for collection in (world.c1, world.c2):
        drift(collection, source_images_count=99)
    with CaptureQueriesContext(connection) as queries:
        report = counts.rebuild(SourceImageCollection)
    assert len(set_recounts(queries)) == 1, "one recount of the sets, which wrote them"
    assert report.models[C].drift == {"source_images_count": 2}
    assert_all_counts_exact()
    assert marks.rows() == []


def test_a_reconcile_compares_first_until_it_finds_drift(world, marks):
    """At rest a reconcile claims no row, however costly (a set's row locked for its recount
    would keep the drains from it meanwhile): it compares first, and claims costly rows first
    only once a chunk has found most of its rows drifted."""
    with CaptureQueriesContext(connection) as queries:
        counts.reconcile(SourceImageCollection)
    assert not [q for q in queries.captured_queries if "FOR NO KEY UPDATE" in (q["sql"] or "")]
    for collection in (world.c1, world.c2):
        drift(collection, source_images_count=99)
    report = counts.reconcile(SourceImageCollection)
    assert report.models[C].drift == {"source_images_count": 2}
    assert_all_counts_exact()
    assert marks.rows() == []


def set_recounts(queries) -> list[str]:
    """The statements among ``queries`` that recount capture sets."""
    sqls = [query["sql"] or "" for query in queries.captured_queries]
    return [
        sql
        for sql in sqls
        if sql.startswith("WITH fresh") and '"monitoring_sourceimagecollection" t' in sql
    ]
