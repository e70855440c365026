"""Jobs (``counts.declare.jobs``): a change to a setting, or to a link on the way to it, that many
items read.

Pinned: the graph has one job per table and column on the way (deduplicated across the counts
that share a setting), keyed by a stable hash; the job's trigger statement reads only the
transition tables and writes one mark, with ids and ``[old, new]`` payloads in one order; its
expansion binds what ``counts.run.items.expand`` passes (a list of anchors, or one anchor and
its bounds as values), walks the ``range_index`` for a setting change, and finds exactly the
items the change can flip; and the stale items a waiting job mark stands for
(``pending_items_sql``) are the same items, read from the queue.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from django.apps import apps
from django.db import connection

from counts.apps import graph
from counts.base.mark import JOB_PREFIX, Kind, kind_of
from counts.declare.graph import Graph
from counts.declare.jobs import jobs_by_key, jobs_on
from counts.declare.modes import ItemCount
from counts.declare.resolve import resolve_all
from counts.operate.status import job_indexes
from counts.run.items import expand
from tests.truth import settle

OCCURRENCES = "item:monitoring.occurrence"


def job_on(table: str, link: bool = False):
    """The setting job (``link``: the link job) of the occurrences on ``table``."""
    [job] = [
        j
        for j in graph().jobs
        if j.kind == OCCURRENCES and j.table.db_table == table and bool(j.values) == link
    ]
    return job


THRESHOLD = "monitoring_project"  # the setting itself: ranged on the occurrence's score
STATION = "monitoring_deployment"  # a station's project: the link on the way
MEMBERSHIP = "monitoring_sourceimagecollection_images"  # a link several steps from the items


def fetch(sql, params=None) -> set[int]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {row[0] for row in cursor.fetchall()}


def test_jobs_are_deduplicated_and_keyed_stably_by_their_shape():
    g = graph()
    keys = [job.key for job in g.jobs]
    assert keys == sorted(set(keys))  # no duplicate, in key order
    assert all(re.fullmatch(rf"{JOB_PREFIX}[0-9a-f]{{12}}", key) for key in keys)
    assert kind_of(OCCURRENCES, [1], keys[0], None) is Kind.JOB
    rebuilt = Graph.build(resolve_all(apps.get_models()))
    assert [dataclasses.asdict(j) for j in rebuilt.jobs] == [dataclasses.asdict(j) for j in g.jobs]
    # Seven occurrence counts compare with one threshold: two tables on the way, two jobs.
    counts = [s for s in g.specs if isinstance(s.mode, ItemCount) and s.mode.setting]
    assert len([s for s in counts if s.mode.mark_target == OCCURRENCES]) == 7
    setting_jobs = [j for j in g.kinds[OCCURRENCES].jobs if j.values is None]
    assert sorted(j.table.db_table for j in setting_jobs) == [STATION, THRESHOLD]
    # Two link tables several steps from an occurrence: a capture set's membership rows (for
    # the sets' counts) and a station's project (for the project's taxa).
    link_jobs = [j for j in g.kinds[OCCURRENCES].jobs if j.values]
    assert sorted((j.table.db_table, j.values) for j in link_jobs) == [
        (STATION, "id"),
        (MEMBERSHIP, "sourceimage_id"),
    ]
    # The key names the job's shape: another column or path is another job.
    job = job_on(THRESHOLD)
    assert dataclasses.replace(job, column="name").key != job.key
    assert dataclasses.replace(job, anchor="id").key != job.key
    assert jobs_by_key(g)[job.key] == job and jobs_on(g, job.table) == [job]


def test_every_table_on_the_way_to_a_setting_has_exactly_one_job():
    """A change to the setting, or to any link on the way to it, writes a job mark."""
    g = graph()
    for spec in [s for s in g.specs if isinstance(s.mode, ItemCount) and s.mode.setting]:
        setting = spec.mode.setting
        for n, hop in enumerate(setting.hops):
            last = n == len(setting.hops) - 1
            column = setting.column if last else setting.hops[n + 1].column
            shape = (spec.mode.mark_target, hop.child, column)
            found = [j for j in g.jobs if (j.kind, j.table, j.column) == shape and j.values is None]
            assert len(found) == 1, (spec.key, hop.child.db_table)
            # Only the setting itself is compared (ranged); a link change reaches them all.
            assert (found[0].compared == setting.compared) if last else not found[0].compared


def test_the_range_index_is_the_items_link_then_the_compared_column_and_exists():
    threshold, station = job_on(THRESHOLD), job_on(STATION)
    assert threshold.range_index == ("deployment_id", "determination_score")
    assert station.range_index is None and station.compared is None
    library = [j for j in graph().jobs if j.compared and j.kind != OCCURRENCES]
    assert [j.range_index for j in library] == [("shelf_id", "pages")]


@pytest.mark.django_db
def test_every_ranged_job_has_its_index():
    ranged = [j for j in graph().jobs if j.range_index]
    assert {r["job"]: r["state"] for r in job_indexes()} == {j.key: "INDEXED" for j in ranged}


def test_a_plain_expansion_reads_the_items_through_the_bound_rows():
    for job in (job_on(THRESHOLD), job_on(STATION)):
        sql = job.expand_sql(ranged=False)
        assert sql.count("%s") == 1 and sql.endswith(" = ANY(%s::bigint[])")
        assert f'FROM "{job.item.db_table}" r' in sql and "counts_dirtymark" not in sql
        for n, (table, pk, column) in enumerate(job.joins, start=1):
            prev = f"h{n - 1}" if n > 1 else "r"
            assert f'JOIN "{table.db_table}" h{n} ON h{n}."{pk}" = {prev}."{column}"' in sql
        assert "BETWEEN" not in sql


def test_a_ranged_expansion_binds_one_anchor_and_its_bounds_as_values():
    job = job_on(THRESHOLD)
    sql = job.expand_sql(ranged=True)
    # counts.run.items.expand binds [anchor, old, new, old, new]: one station walk per anchor.
    assert sql.count("%s") == 5
    assert 'WHERE h1."project_id" = %s AND ' in sql and "ANY(" not in sql
    bounds = "least(%s::double precision, %s::double precision)"
    assert f'r."determination_score" BETWEEN {bounds} AND greatest(' in sql


@pytest.mark.django_db
def test_expansion_finds_exactly_the_items_a_change_can_flip(world):
    w = world
    threshold, station = job_on(THRESHOLD), job_on(STATION)
    ranged = threshold.expand_sql(ranged=True)
    # 0.5 -> 0.3 at p1: o2 (0.4) flips; o1 (0.9) passes both, o3 has no score, o4 is p2's.
    assert fetch(ranged, [w.p1.pk, "0.5", "0.3", "0.5", "0.3"]) == {w.o2.pk}
    assert fetch(ranged, [w.p1.pk, "0.3", "0.5", "0.3", "0.5"]) == {w.o2.pk}  # either way
    assert fetch(ranged, [w.p1.pk, "0.4", "0.9", "0.4", "0.9"]) == {w.o1.pk, w.o2.pk}  # ends in
    assert fetch(threshold.expand_sql(ranged=False), [[w.p1.pk]]) == {w.o1.pk, w.o2.pk, w.o3.pk}
    assert fetch(station.expand_sql(ranged=False), [[w.d2.pk, w.d3.pk]]) == {w.o3.pk, w.o4.pk}


@pytest.mark.django_db
def test_a_ranged_expansion_can_walk_the_range_index(db):
    """The ranged expansion's predicates are the two leading columns of an index on the item
    table (``occurrence_station_score``): one station, the score between two bounds. Which
    index the planner picks on the test's few rows is its business (the bench walks it at
    10^6); what must hold is that the text and the index match."""
    job = job_on(THRESHOLD)
    link, compared = job.range_index
    sql = job.expand_sql(ranged=True)
    assert f'= r."{link}"' in sql, "the occurrences of the changed project's stations"
    assert re.search(rf'r\."{compared}" BETWEEN least\(%s::\w+( \w+)?, %s::', sql)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexname = %s",
            [job.item.db_table, "occurrence_station_score"],
        )
        (indexdef,) = cursor.fetchone()
    assert re.search(rf"\({link}, {compared}\b", indexdef), indexdef


def test_the_trigger_writes_one_job_mark_from_the_transition_tables():
    for job, payload in ((job_on(THRESHOLD), True), (job_on(STATION), False)):
        sql = job.trigger_sql()
        column, pk = f'"{job.column}"', f'"{job.table.pk}"'
        reads = set(re.findall(r"(?<!DISTINCT )\b(?:FROM|JOIN) (\w+)", sql))
        assert reads == {"new_rows", "old_rows"}
        assert f"FROM new_rows n JOIN old_rows o ON o.{pk} = n.{pk}" in sql
        assert f"WHERE o.{column} IS DISTINCT FROM n.{column}" in sql  # changed rows only
        assert sql.rstrip(";").endswith("HAVING count(*) > 0")  # no change, no mark
        assert f"'{job.kind}', '{job.key}', array_agg(n.{pk} ORDER BY n.{pk})" in sql
        if payload:  # [old, new] per id, in the ids' order
            agg = f"jsonb_agg(jsonb_build_array(o.{column}, n.{column}) ORDER BY n.{pk})"
            assert agg in sql
        else:
            assert "NULL::jsonb" in sql


def set_thresholds(cursor, values: dict[int, float]) -> None:
    """One statement, as an admin bulk edit would: one job mark for every project changed."""
    cursor.execute(
        "UPDATE monitoring_project p SET default_filters_score_threshold = v.t"
        " FROM unnest(%s::bigint[], %s::float8[]) v(id, t) WHERE p.id = v.id",
        [list(values), list(values.values())],
    )


@pytest.mark.django_db
def test_a_waiting_job_mark_stands_for_the_items_its_expansion_finds(world, marks):
    w = world
    job = job_on(THRESHOLD)
    with connection.cursor() as cursor:
        set_thresholds(cursor, {w.p1.pk: 0.3, w.p2.pk: 0.5})  # o2 (0.4) and o4 (0.35) flip
        cursor.execute("SELECT ids, payload FROM counts_dirtymark WHERE field = %s", [job.key])
        [(ids, payload)] = cursor.fetchall()
        expanded = set(expand(cursor, job, ids, payload))
    assert expanded == {w.o2.pk, w.o4.pk}
    assert fetch(job.pending_items_sql()) == expanded  # the n-th payload goes with the n-th id
    assert fetch(job.pending_items_sql("false")) == set()
    with connection.cursor() as cursor:  # no payload: every item reached may flip
        cursor.execute("UPDATE counts_dirtymark SET payload = NULL WHERE field = %s", [job.key])
    assert fetch(job.pending_items_sql()) == {w.o1.pk, w.o2.pk, w.o3.pk, w.o4.pk}
    assert fetch(job_on(STATION).pending_items_sql()) == set()  # another job's marks only


@pytest.mark.django_db
def test_a_membership_change_writes_one_link_job_expanded_to_the_occurrences_on_its_captures(
    world,
):
    """Two captures joining a set: the writer records the captures, never their occurrences;
    the drain finds the occurrences with a detection on them (o1 and o2 on i1, o3 on i4)."""
    job = job_on(MEMBERSHIP, link=True)
    world.c3.images.add(world.i1, world.i4)
    with connection.cursor() as cursor:
        cursor.execute("SELECT ids FROM counts_dirtymark WHERE field = %s", [job.key])
        [(ids,)] = cursor.fetchall()
        assert sorted(ids) == sorted([world.i1.pk, world.i4.pk])
        found = expand(cursor, job, list(ids), None)
    assert found == sorted([world.o1.pk, world.o2.pk, world.o3.pk])
    settle()
