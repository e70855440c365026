"""The stale items' SQL (``counts.compile.stale_items``): which items a waiting mark covers, and
what they mean for target rows.

Pinned, as text: the stale items come from marks of their own kind, told apart by
``counts.base.mark.where`` (never by a prefix of the test's own), the "every item" arms are
gated by a one-time test, arms are a ``UNION`` (an item covered twice is adjusted once), and each
statement binds its ids exactly as often as it says. Run on the small world: the adjustment is
what the stale items would credit now, and the pending targets are the rows they link to now or
credited before. Run on a crowd of 2,000 items: what each statement reads when one item is
stale (``EXPLAIN ANALYZE``), since a recount or a list page pays it for every batch.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from django.db import connection

from counts.apps import graph
from counts.base.mark import Kind, Mark, where
from counts.compile.item_sql import entries_sql, entry_targets_sql
from counts.compile.stale_items import adjustment_sql, pending_targets_sql, stale_sql
from project.monitoring.models import Deployment, Project, SourceImage
from tests.plans import plan_reads
from tests.truth import drain_all

CAPTURES = "item:monitoring.sourceimage"
OCCURRENCES = "item:monitoring.occurrence"
STATION = "monitoring.deployment"
SET = "monitoring.sourceimagecollection"
#: Tables with a row per item or more: none may be read in full for a few stale items.
BIG = (
    "monitoring_sourceimage",
    "monitoring_detection",
    "monitoring_sourceimagecollection_images",
    "counts_ledger",
)


def kind(name):
    return graph().kinds[name]


def fetch(sql, params=None):
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def stale(name, only="true") -> set[int]:
    return {i for (i,) in fetch(stale_sql(kind(name), only))}


def rows_read(sql, params) -> Counter:
    """Rows each relation's executed scans looked at (kept or filtered out), per EXPLAIN."""
    with connection.cursor() as cursor:
        return plan_reads(cursor, sql, params)[0]


@pytest.fixture
def crowd(world):
    """The world, plus 40 stations of a third project holding 2,000 captures (each with a valid
    detection, all in set c3), drained and analysed: a plan reading every item shows."""
    w = world
    crowd = Project.objects.create(name="Crowd", default_filters_score_threshold=0.5)
    stations = Deployment.objects.bulk_create(
        Deployment(project=crowd, name=f"Crowd {n}") for n in range(40)
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO monitoring_sourceimage (deployment_id, timestamp, path, created_at,"
            " updated_at) SELECT (%s::bigint[])[1 + n %% 40], now(), 'crowd', now(), now()"
            " FROM generate_series(1, 2000) n",
            [[s.pk for s in stations]],
        )
        cursor.execute(
            "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
            " SELECT id, '[1, 1, 2, 2]', now(), now() FROM monitoring_sourceimage"
            " WHERE path = 'crowd'"
        )
        cursor.execute(
            "INSERT INTO monitoring_sourceimagecollection_images"
            " (sourceimagecollection_id, sourceimage_id)"
            " SELECT %s, id FROM monitoring_sourceimage WHERE path = 'crowd'",
            [w.c3.pk],
        )
    drain_all()
    with connection.cursor() as cursor:
        for table in (*BIG, "monitoring_deployment", "counts_dirtymark"):
            cursor.execute(f"ANALYZE {table}")
    w.crowd = stations
    return w


def test_stale_items_are_read_from_marks_of_their_kind_in_one_union():
    for name in (CAPTURES, OCCURRENCES):
        k = kind(name)
        only = "m.id > 41"
        sql = stale_sql(k, only)
        assert f"m.target = '{name}' AND {where(Kind.ITEM)} AND {only}" in sql
        gate = f"EXISTS (SELECT 1 FROM counts_dirtymark m WHERE m.target = '{name}'"
        gate += f" AND {where(Kind.EVERY_ITEM)} AND {only})"
        # Every item, and every ledger of the kind, only behind the one-time "every item" test.
        assert f'SELECT "{k.table.pk}" FROM "{k.table.db_table}" WHERE {gate}' in sql
        assert f"SELECT item_id FROM counts_ledger WHERE kind = '{name}' AND {gate}" in sql
        # Every read of the queue passes ``only`` (a bulk pass splits the marks it has read).
        assert sql.count(only) == sql.count("FROM counts_dirtymark m")
        assert " UNION ALL " not in sql  # an item covered twice is adjusted once
        for job in k.jobs:
            assert f"m.field = '{job.key}'" in sql
    assert "m.field = 'job:" not in stale_sql(kind(CAPTURES))


@pytest.mark.django_db
def test_stale_items_are_those_marked_for_the_kind_and_every_one_under_an_every_item_mark(
    world, marks
):
    w = world
    with connection.cursor() as cursor:
        Mark.item(CAPTURES, [w.i1.pk]).insert(cursor)
        Mark.item(CAPTURES, [w.i5.pk]).insert(cursor, due_in_s=60)  # not due: stale all the same
        Mark.item(OCCURRENCES, [w.o1.pk]).insert(cursor)  # another kind
        Mark.recount("monitoring.sourceimage", [w.i2.pk]).insert(cursor)  # a target's mark
        Mark.delta("monitoring.sourceimage", "detections_count", {w.i4.pk: 1}).insert(cursor)
    assert stale(CAPTURES) == {w.i1.pk, w.i5.pk}
    assert stale(CAPTURES, "false") == set()
    gone = w.i5.pk + 1000  # a deleted item whose ledger still credits
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO counts_ledger (kind, item_id, state) VALUES (%s, %s, '{}')",
            [CAPTURES, gone],
        )
        Mark.every_item(CAPTURES).insert(cursor)
    every = {i for (i,) in fetch("SELECT id FROM monitoring_sourceimage")}
    assert stale(CAPTURES) == every | {gone}
    assert stale(OCCURRENCES) == {w.o1.pk}


@pytest.mark.django_db
def test_a_job_mark_makes_the_items_it_can_flip_stale(world, marks):
    w = world
    with connection.cursor() as cursor:  # 0.5 -> 0.3: only o2 (0.4) can flip
        cursor.execute(
            "UPDATE monitoring_project SET default_filters_score_threshold = 0.3 WHERE id = %s",
            [w.p1.pk],
        )
    assert [t for t, _ids in marks.rows()] == [OCCURRENCES]
    assert stale(OCCURRENCES) == {w.o2.pk}


def test_the_adjustment_reads_stale_items_related_to_the_targets_and_sums_their_counts():
    for name, label in ((CAPTURES, STATION), (CAPTURES, SET), (OCCURRENCES, STATION)):
        k = kind(name)
        sql, binds = adjustment_sql(k, label, 3)
        assert sql.count("%s") == binds
        for p in k.summed_parts(label):  # related by its current link ...
            table, item_col, target_col = p.link.rows(k.table)
            assert (
                f'FROM "{table.db_table}" x WHERE x."{item_col}" = s.id'
                f' AND x."{target_col}" = ANY(%s::bigint[])'
            ) in sql
        # ... or by a ledger, which may credit it; truth and ledger are read per stale item.
        assert f"counts_ledger l WHERE l.kind = '{name}' AND l.item_id = s.id" in sql
        assert "LATERAL" in sql and "GROUP BY 1)" not in sql
        assert "-(kv.value->>0)::bigint" in sql  # the ledger's credit is taken off
        summed = {p.key for p in k.summed_parts(label)}
        assert set(re.findall(r"FILTER \(WHERE e\.key = '(\w+)'\)\)::bigint AS a3_", sql)) == summed
        assert sql.endswith("WHERE e.t = ANY(%s::bigint[]) GROUP BY e.t")
        assert "FOR UPDATE" not in sql and "INSERT" not in sql


def test_pending_targets_read_stale_items_links_and_their_ledger_entries():
    for name, label in ((CAPTURES, SET), (OCCURRENCES, STATION)):
        k = kind(name)
        sql, binds = pending_targets_sql(k, label)
        assert sql.count("%s") == binds == len({p.link for p in k.parts_for(label)}) + 1
        for p in k.parts_for(label):
            table, item_col, target_col = p.link.rows(k.table)
            # Per stale item, its links probed by the item's key, behind OFFSET 0 so the
            # planner cannot turn the probe into a join over every link row.
            assert (
                f'FROM "{table.db_table}" x WHERE x."{item_col}" = s.id'
                f' AND x."{target_col}" = ANY(%s::bigint[]) OFFSET 0) x'
            ) in sql
        ledger = f"l.kind = '{k.mark_target}' AND l.item_id = s.id LIMIT 1) l"
        assert ledger in sql, "the stale item's ledger, probed by its key"
        assert " IN (SELECT" not in sql, "no semi-join the planner may hash"
        # The entries of the label's counts (distinct ones too), each looked up by its key.
        keys = [p.key for p in k.parts_for(label)]
        assert f"{entries_sql('l.state', keys)} kv(key, value)" in sql
        assert "WHERE kv.value IS NOT NULL AND t::bigint = ANY(%s::bigint[])" in sql
        # A distinct entry [1, target, value] names its target, never its value.
        assert f"jsonb_array_elements_text({entry_targets_sql('kv', k)}) t" in sql


def adjustments(label, ids) -> dict[int, int]:
    sql, binds = adjustment_sql(kind(CAPTURES), label, 0)
    return {pk: a for pk, a, *_ in fetch(sql, [ids] * binds)}


def pending(label, ids) -> set[int]:
    sql, binds = pending_targets_sql(kind(CAPTURES), label)
    return {i for (i,) in fetch(sql, [ids] * binds)}


@pytest.mark.django_db
def test_the_adjustment_is_what_the_stale_items_would_credit_now(world):
    w = world
    stations = [w.d1.pk, w.d2.pk, w.d3.pk]
    assert adjustments(STATION, stations) == {} and pending(STATION, stations) == set()
    assert kind(CAPTURES).summed_parts(STATION)[0].column == "detections_count"
    w.det1.delete()  # i1 at d1: 2 valid detections -> 1
    SourceImage.objects.filter(pk=w.i4.pk).update(deployment=w.d3)  # credited to d2, now at d3
    # d2 is related only by i4's ledger, d3 only by its link.
    assert adjustments(STATION, stations) == {w.d1.pk: -1, w.d2.pk: -1, w.d3.pk: 1}
    assert adjustments(STATION, [w.d2.pk]) == {w.d2.pk: -1}
    assert pending(STATION, stations) == set(stations)
    assert pending(STATION, [w.d2.pk]) == {w.d2.pk}
    assert pending(SET, [w.c1.pk, w.c2.pk, w.c3.pk]) == {w.c1.pk, w.c2.pk}


@pytest.mark.django_db
def test_without_an_every_item_mark_no_item_or_ledger_row_is_read(crowd):
    crowd.det1.delete()  # one stale capture
    sql = stale_sql(kind(CAPTURES))
    seen = rows_read(sql, [])
    assert seen["monitoring_sourceimage"] == 0 and seen["counts_ledger"] == 0
    assert {i for (i,) in fetch(sql)} == {crowd.i1.pk}


@pytest.mark.django_db
@pytest.mark.parametrize("builder", [adjustment_sql, pending_targets_sql])
@pytest.mark.parametrize("label", [STATION, SET])
def test_with_one_stale_item_the_targets_statements_read_only_its_rows(crowd, builder, label):
    """What a recount of a page of targets (``adjustment_sql``) and a page's freshness flags
    (``pending_targets_sql``) read when one capture is stale: its own rows, not the crowd's."""
    crowd.det1.delete()  # one stale capture
    args = (0,) if builder is adjustment_sql else ()
    sql, binds = builder(kind(CAPTURES), label, *args)
    ids = {
        STATION: [crowd.d1.pk, crowd.d2.pk, *[s.pk for s in crowd.crowd[:5]]],
        SET: [crowd.c1.pk, crowd.c2.pk, crowd.c3.pk],  # c3 holds the crowd
    }[label]
    seen = rows_read(sql, [ids] * binds)
    assert {t: seen[t] for t in BIG if seen[t] > 50} == {}
