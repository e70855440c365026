"""The SQL of items (``counts.compile.item_sql``), as text and, where the text cannot show it,
run on a small dataset.

Pinned: the drain's truth probes each child and through table once per item (cost follows the
items) and the bulk pass's truth reads each of them in one grouped pass over its id range
(cost follows the range); both forms agree; the recompute locks nothing itself, writes only the
ledgers that changed, deletes those whose truth is empty and credits only the difference;
credits are summed per key and target (per value for a distinct count), unknown keys left out;
item marks for many items carry ``CHUNK`` ids each. Not snapshots: each assertion is a property
the drain's exactness or a pass's cost rests on.
"""

from __future__ import annotations

import json
import re

import pytest
from django.db import connection

from counts.apps import graph
from counts.base.mark import Kind, kind_of
from counts.compile.item_sql import (
    CHUNK,
    credits_sql,
    entry_targets_sql,
    hoisted,
    in_range,
    mark_items_sql,
    mark_ledgered_sql,
    recompute_sql,
    state_sql,
    truth_sql,
)

CAPTURES = "item:monitoring.sourceimage"
OCCURRENCES = "item:monitoring.occurrence"
BOOKS = "item:counts_testapp.book"
KINDS = [CAPTURES, OCCURRENCES, BOOKS]
ITEMS = "(SELECT unnest(%s::bigint[]) AS id)"


def kind(name):
    return graph().kinds[name]


def key_of(name, label, column):
    [part] = [p for p in kind(name).parts if (p.label, p.column) == (label, column)]
    return part.key


def reads(k) -> set[tuple[str, str, str]]:
    """``(table, column holding the item's id, alias)`` of every child and through table, and
    of the first step of a link with steps (the rest are joined to it by their keys)."""
    found = {(p.measure.child.db_table, p.measure.fk, "r") for p in k.parts}
    for link in {p.link for p in k.parts if p.link.through}:
        if link.via:
            found.add((link.via[0].table.db_table, link.via[0].where, "v1"))
        else:
            found.add((link.through.db_table, link.item_column, "x"))
    return found


def state(value) -> dict:
    """A jsonb column as Python (the driver may hand it over as text)."""
    return json.loads(value) if isinstance(value, str) else value


def fetch(sql, params=None):
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


@pytest.mark.parametrize("name", KINDS)
def test_probe_form_reads_each_child_and_through_table_once_per_item_by_its_key(name):
    k = kind(name)
    sql = truth_sql(k, ITEMS)
    for table, column, alias in reads(k):
        # One join per table, shared by every count of the kind ("how many" and "any").
        assert sql.count(f'FROM "{table}" {alias} ') == 1, table
        # (A link's steps are joined to its first by their keys, before the WHERE.)
        where = rf'WHERE {alias}\."{column}" = i\.id\) [cl]\d+ ON true'
        steps = r"(CROSS JOIN LATERAL \(SELECT \* FROM [^()]* OFFSET 0\) \w+ )*"
        probe = rf'FROM "{table}" {alias} {steps}{where}'
        assert re.search(probe, sql), table
    assert sql.count("LEFT JOIN LATERAL") == len(reads(k))
    # Never a grouped pass: that would read a whole child table for a handful of items.
    assert "GROUP BY" not in sql
    if any(p.link.through is None for p in k.parts):  # the item's own link column, by its pk
        table, pk = k.table.db_table, k.table.pk
        assert f'LEFT JOIN "{table}" j ON j."{pk}" = i.id' in sql
        # For items the planner cannot count (a recount's stale items), probed per item.
        probed = truth_sql(k, ITEMS, probe_rows=True)
        assert f'SELECT * FROM "{table}" j WHERE j."{pk}" = i.id LIMIT 1) j ON true' in probed
        assert f'LEFT JOIN "{table}" j ON' not in probed


@pytest.mark.parametrize("name", KINDS)
def test_range_form_reads_each_table_in_one_grouped_pass_over_the_range(name):
    k = kind(name)
    sql = truth_sql(k, ITEMS, within=(100, 200))
    # No probe per item; a link's later steps are probed per row of the range's first step.
    assert "LEFT JOIN LATERAL" not in sql
    for table, column, alias in reads(k):
        [body] = re.findall(
            rf'FROM "{table}" {alias}\b(.*?) GROUP BY 1\) [cl]\d+ ON [cl]\d+\.id = i\.id', sql
        )
        assert f'WHERE {alias}."{column}" > 100 AND {alias}."{column}" <= 200' in body, table
    assert sql.count("GROUP BY 1") == len(reads(k))
    # The last range is open-ended: it takes the orphans past the last item.
    last = truth_sql(k, ITEMS, within=(100, None))
    assert "<=" not in last and all(f'{a}."{c}" > 100' in last for _t, c, a in reads(k))


def test_hoisted_joins_the_setting_once_instead_of_a_probe_per_row():
    k = kind(OCCURRENCES)
    setting = next(p.setting for p in k.parts if p.setting is not None)
    probe = setting.value_sql()
    preds = [p.measure.predicate for p in k.parts] + [None]
    rows, filters = hoisted(preds, setting)
    assert rows == f' LEFT JOIN ({setting.rows_sql()}) sv ON sv.anchor = r."deployment_id"'
    assert all(probe not in f for f in filters if f) and filters[-1] is None
    assert sum("sv.value" in f for f in filters if f) == sum(probe in p for p in preds if p)
    # No setting, or predicates that do not read it: nothing joined, predicates unchanged.
    assert hoisted(preds, None) == ("", preds)
    assert hoisted(['r."determination_id" IS NOT NULL'], setting)[0] == ""


@pytest.mark.django_db
def test_in_range_is_the_half_open_interval_with_integer_bounds():
    def picked(within):
        where = in_range("x", within)
        [(found,)] = fetch(
            f"SELECT array_agg(x ORDER BY x) FROM generate_series(0, 10) x WHERE {where}"
        )
        return found

    assert picked((3, 6)) == [4, 5, 6]
    assert picked((8, None)) == [9, 10]
    assert picked((None, 2)) == [0, 1, 2]
    with pytest.raises(ValueError):  # bounds are the engine's integers, never SQL text
        in_range("x", ("1 OR true", None))


@pytest.mark.django_db
@pytest.mark.parametrize("name", KINDS)
def test_the_probe_and_range_forms_agree_on_every_item(name, request):
    """What the bulk pass compares with the ledgers is what a drain would write."""
    request.getfixturevalue("library" if name == BOOKS else "world")
    k = kind(name)
    ids = [row[0] for row in fetch(f'SELECT "{k.table.pk}" FROM "{k.table.db_table}"')]
    ids.append(max(ids) + 1000)  # an item deleted since: its truth is {}
    probe = fetch(f"{truth_sql(k, ITEMS)} ORDER BY 1", [ids])
    ranged = fetch(f"{truth_sql(k, ITEMS, within=(0, None))} ORDER BY 1", [ids])
    states = [state(s) for _id, s in probe]
    assert probe == ranged
    assert states[-1] == {} and sum(bool(s) for s in states) >= 2


@pytest.mark.django_db
@pytest.mark.parametrize("present", [range(0), range(3), range(0, 250, 7), range(91, 250)])
def test_a_state_leaves_out_the_empty_entries_however_many_the_kind_has(present):
    """A ledger state is the entries that are not NULL, ``{}`` when none is; a kind of more
    counts than one SQL function takes arguments (100) still gets one state, whichever of its
    groups of entries are all NULL."""
    entries = [
        f"CASE WHEN {n} IN ({', '.join(map(str, present)) or 'NULL'})"
        f" THEN '\"k{n}\":[' || {n} || ',7,null]' END"
        for n in range(250)
    ]
    [(found,)] = fetch(f"SELECT {state_sql(entries)}")
    assert state(found) == {f"k{n}": [n, 7, None] for n in present}
    assert state(fetch(f"SELECT {state_sql([])}")[0][0]) == {}


@pytest.mark.django_db
def test_the_truth_of_a_capture_is_its_counts_and_its_targets(world):
    k, w = kind(CAPTURES), world
    rows = {i: state(s) for i, s in fetch(truth_sql(k, ITEMS), [[w.i1.pk, w.i2.pk, w.i3.pk]])}
    i1, i2 = rows[w.i1.pk], rows[w.i2.pk]
    coll = "monitoring.sourceimagecollection"
    assert i1[key_of(CAPTURES, "monitoring.deployment", "detections_count")] == [2, w.d1.pk]
    assert i1[key_of(CAPTURES, coll, "source_images_with_detections_count")] == [1, w.c1.pk]
    # i2: one detection without a box, in two sets: processed in both, counted nowhere.
    assert i2 == {key_of(CAPTURES, coll, "source_images_processed_count"): [1, w.c1.pk, w.c2.pk]}
    assert rows[w.i3.pk] == {}  # no detection: nothing to credit, not even its sets


def test_recompute_locks_nothing_writes_changed_ledgers_and_credits_the_difference():
    k = kind(OCCURRENCES)
    sql = " ".join(recompute_sql(k).split())
    # Its caller locked the ledgers in an earlier statement: this one's snapshot sees the
    # previous holder's commit. Locking here would read the truth from before the wait.
    assert "FOR UPDATE" not in sql and "SKIP LOCKED" not in sql
    assert sql.count("%s") == 2  # the ids, twice (``counts.run.items.recompute``)
    assert "FROM (SELECT DISTINCT unnest(%s::bigint[]) AS id) i" in sql  # each item once
    old = re.search(r" old AS \((.*?)\),", sql).group(1)
    assert f"JOIN counts_ledger l ON l.kind = '{OCCURRENCES}' AND l.item_id = i.id" in old
    changed = re.search(r" changed AS \((.*?)\), kept", sql).group(1)
    assert "WHERE coalesce(o.state, '{}') IS DISTINCT FROM t.state" in changed
    kept = re.search(r" kept AS \((.*?)\), dropped", sql).group(1)
    assert "FROM changed WHERE new <> '{}'" in kept
    assert "ON CONFLICT (kind, item_id) DO UPDATE SET state = EXCLUDED.state" in kept
    dropped = re.search(r" dropped AS \((.*?)\) SELECT", sql).group(1)
    assert f"DELETE FROM counts_ledger l USING truth t WHERE l.kind = '{OCCURRENCES}'" in dropped
    assert "t.state = '{}'" in dropped
    # Credits come from the changed ledgers only: an unchanged item credits nothing.
    assert sql.endswith(" ".join(credits_sql(k, "changed").split()))


@pytest.mark.django_db
def test_recompute_credits_each_change_once_and_deletes_an_emptied_ledger(world):
    k, w = kind(CAPTURES), world
    names = {p.key: f"{p.label.split('.')[1]}.{p.column}" for p in k.parts}

    def recompute():
        rows = fetch(recompute_sql(k), [[w.i1.pk], [w.i1.pk]])
        changed = [n for key, _t, _v, n in rows if key is None]
        return {(names[key], t): n for key, t, _v, n in rows if key}, changed

    w.det1.delete()
    credits, changed = recompute()
    assert changed == [1]
    assert credits == {
        ("deployment.detections_count", w.d1.pk): -1,
        ("event.detections_count", w.e1.pk): -1,
        ("sourceimage.detections_count", w.i1.pk): -1,
    }  # the sets still have a valid detection of i1: nothing for them
    assert recompute() == ({}, [0])  # at the truth: nothing changes, nothing is credited
    w.det2.delete()
    credits, _ = recompute()
    assert credits[("sourceimagecollection.source_images_processed_count", w.c1.pk)] == -1
    assert credits[("sourceimagecollection.source_images_with_detections_count", w.c1.pk)] == -1
    ledger = "SELECT 1 FROM counts_ledger WHERE kind = %s AND item_id = %s"
    assert fetch(ledger, [CAPTURES, w.i1.pk]) == []  # its truth is {}: no row kept


@pytest.mark.django_db
def test_credits_are_summed_per_key_and_target_and_unknown_keys_are_left_out():
    def credits(name, pairs):
        values = ", ".join("(%s::jsonb, %s::jsonb)" for _ in pairs)
        params = [json.dumps(s) if s is not None else None for pair in pairs for s in pair]
        sql = f"WITH changed(old, new) AS (VALUES {values}) {credits_sql(kind(name), 'changed')}"
        return {(key, t, v): n for key, t, v, n in fetch(sql, params)}

    station = key_of(CAPTURES, "monitoring.deployment", "detections_count")
    sets = key_of(CAPTURES, "monitoring.sourceimagecollection", "source_images_processed_count")
    assert credits(
        CAPTURES,
        [
            ({station: [2, 10]}, {station: [2, 11]}),  # moved: 2 from station 10 to 11
            ({station: [2, 10]}, {station: [3, 10]}),  # and one more at 10
            ({station: [1, 12], "gone0000": [5, 12]}, {station: [1, 12]}),  # sums to 0
            (None, {sets: [1, 3, 4]}),  # a new ledger: 1 to each of its sets
        ],
    ) == {
        (station, 10, None): -1,
        (station, 11, None): 2,
        (sets, 3, None): 1,
        (sets, 4, None): 1,
        (None, None, None): 4,  # the number of changed ledgers
    }
    taxa = key_of(OCCURRENCES, "monitoring.deployment", "taxa_count")
    # A distinct entry [1, target, value] credits the pair (target, value), not the value.
    assert credits(OCCURRENCES, [({taxa: [1, 7, 40]}, {taxa: [1, 8, 40]})]) == {
        (taxa, 7, 40): -1,
        (taxa, 8, 40): 1,
        (None, None, None): 1,
    }


@pytest.mark.django_db
def test_entry_targets_skip_the_amount_and_read_a_distinct_entrys_target_only():
    def targets(name, entry: dict) -> list[str]:
        expression = entry_targets_sql("e", kind(name))
        sql = f"SELECT t FROM jsonb_each(%s::jsonb) e, jsonb_array_elements_text({expression}) t"
        return [t for (t,) in fetch(sql, [json.dumps(entry)])]

    sets = key_of(CAPTURES, "monitoring.sourceimagecollection", "source_images_processed_count")
    assert targets(CAPTURES, {sets: [1, 3, 4]}) == ["3", "4"]
    taxa = key_of(OCCURRENCES, "monitoring.deployment", "taxa_count")
    occurrences = key_of(OCCURRENCES, "monitoring.deployment", "occurrences_count")
    assert targets(OCCURRENCES, {taxa: [1, 7, 40]}) == ["7"]  # the taxon is no target
    assert targets(OCCURRENCES, {occurrences: [1, 7]}) == ["7"]


@pytest.mark.django_db
def test_marks_for_many_items_carry_chunk_ids_each(marks):
    sql = mark_items_sql(kind(CAPTURES), "(SELECT generate_series(1, 4500) AS id)", "id")
    with connection.cursor() as cursor:
        cursor.execute(sql)
    rows = fetch("SELECT target, ids, field, deltas FROM counts_dirtymark")
    assert sorted(len(ids) for _t, ids, _f, _d in rows) == [500, CHUNK, CHUNK]
    assert sorted(i for _t, ids, _f, _d in rows for i in ids) == list(range(1, 4501))
    assert all(ids == sorted(ids) for _t, ids, _f, _d in rows)
    assert {kind_of(*row) for row in rows} == {Kind.ITEM}
    assert {row[0] for row in rows} == {CAPTURES}


@pytest.mark.django_db
def test_marking_the_ledgered_items_reads_the_ledger_of_the_kind_only(world, marks):
    k = kind(CAPTURES)
    sql = mark_ledgered_sql(k)
    assert f"FROM counts_ledger WHERE kind = '{CAPTURES}'" in sql
    assert f'"{k.table.db_table}"' not in sql  # not every item: only those that credited
    rows = fetch("SELECT item_id FROM counts_ledger WHERE kind = %s", [CAPTURES])
    ledgered = {i for (i,) in rows}
    assert ledgered and world.i3.pk not in ledgered
    with connection.cursor() as cursor:
        cursor.execute(sql)
    assert marks.items() == {CAPTURES: ledgered}
