"""What a trigger reads from its own rows (``counts.compile.trigger_rows``), and the routes of the
counts kept in full.

The writers' side of the argument (``docs/engine.md`` §2.2) rests on two properties pinned
here: a trigger's row SQL reads only the statement's transition tables (``new_rows``,
``old_rows``), never a base table, so no concurrent writer can make it record the wrong
targets and it costs nothing but its own rows; and an UPDATE compares old and new rows on the
columns the counts read, so rows whose read columns did not change count for nothing. The row
SQL is also run against stand-in transition tables (temporary tables of the same names). The
routes of full counts climb one indexed probe per hop, and are named stably.
"""

from __future__ import annotations

import re

import pytest
from django.apps import apps
from django.db import connection

from counts.apps import graph
from counts.base.mark import ROUTE_PREFIX, Kind, kind_of
from counts.compile.trigger_rows import (
    changed_rows,
    delta_rows,
    first_hop,
    full_routes,
    item_rows,
    routes_for,
    via_key,
)
from counts.compile.triggers import compile_mark_triggers, watched_tables
from counts.declare.graph import Graph
from counts.declare.modes import Full
from counts.declare.resolve import resolve_all

ROWS = {"insert": {"new_rows"}, "delete": {"old_rows"}, "update": {"new_rows", "old_rows"}}
#: ``FROM x`` / ``JOIN x`` where x is a relation name (not a subquery, not ``IS DISTINCT FROM``).
READ = re.compile(r"(?<!DISTINCT )\b(?:FROM|JOIN)\s+(?!\()(\"[^\"]+\"|\w+)")


def all_tables() -> set[str]:
    return {m._meta.db_table for m in apps.get_models()}


def row_sql(table, operation) -> list[str]:
    g = graph()
    return delta_rows(g, table, operation) + item_rows(g, table, operation)


def test_row_sql_reads_only_the_statements_transition_tables():
    quoted = {f'"{t}"' for t in all_tables()}
    seen = 0
    for table in watched_tables(graph()).values():
        for operation, allowed in ROWS.items():
            for sql in row_sql(table, operation):
                seen += 1
                assert set(READ.findall(sql)) == allowed, (table.db_table, operation, sql)
                assert not any(name in sql for name in quoted), (table.db_table, operation)
    assert seen > 30  # every watched table of both apps, not a vacuous loop


def test_no_mark_trigger_joins_a_transition_table_to_a_base_table():
    """The compiled bodies as installed (own-row, item, job and route statements alike)."""
    bare = all_tables()
    for trigger in compile_mark_triggers(graph()):
        body = trigger.sql.split("$counts$")[1]
        read = {name.strip('"') for name in READ.findall(body)}
        if trigger.operation == "truncate":  # no rows to read: every ledgered item instead
            assert read <= {"counts_ledger"}, trigger.name
        else:
            assert read <= {"new_rows", "old_rows"}, (trigger.name, read & bare)


def test_update_rows_are_those_whose_read_columns_differ_null_safely():
    table = graph().kinds["item:monitoring.sourceimage"].table
    columns = frozenset({"deployment_id", "event_id"})
    new, old = changed_rows(table, columns, "new"), changed_rows(table, columns, "old")
    assert new.startswith("(SELECT s.* FROM new_rows s WHERE NOT EXISTS (SELECT 1 FROM old_rows o")
    assert old.startswith("(SELECT s.* FROM old_rows s WHERE NOT EXISTS (SELECT 1 FROM new_rows o")
    for sql in (new, old):
        assert 'o."id" = s."id"' in sql  # the same row, by its key (which cannot change)
        for column in columns:  # NULL to NULL is no change; NULL to a value is one
            assert f'o."{column}" IS NOT DISTINCT FROM s."{column}"' in sql
        assert '"path"' not in sql  # a column no count reads never makes a row count
    for operation in ("insert", "delete"):
        assert all("NOT EXISTS" not in sql for sql in row_sql(table, operation))


def test_own_row_amounts_are_summed_per_target_and_zero_sums_left_out():
    g = graph()
    table = graph().kinds["item:monitoring.sourceimage"].table
    for operation, signs in (("insert", {"1"}), ("delete", {"-1"}), ("update", {"1", "-1"})):
        selects = delta_rows(g, table, operation)
        assert len(selects) == 2  # the capture's station and night: one statement per count
        for sql in selects:
            assert set(re.findall(r", (-?1) AS d FROM", sql)) == signs
            assert sql.endswith("GROUP BY x.id HAVING sum(x.d) <> 0")
            assert re.search(r'WHERE r\."(deployment|event)_id" IS NOT NULL', sql)


@pytest.fixture
def transition(db):
    """Stand-in transition tables for captures: temporary tables named like the real ones
    (the temporary schema is searched first), gone with the test's transaction."""
    with connection.cursor() as cursor:
        for name in ("old_rows", "new_rows"):
            cursor.execute(
                f"CREATE TEMP TABLE {name} AS SELECT * FROM monitoring_sourceimage WHERE false"
            )
    return connection


def run(selects: list[str]) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(" UNION ALL ".join(selects))
        return sorted(cursor.fetchall())


@pytest.mark.django_db
def test_an_update_counts_only_rows_whose_read_columns_changed(world, transition):
    w = world
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO old_rows SELECT * FROM monitoring_sourceimage WHERE id = ANY(%s)",
            [[w.i1.pk, w.i2.pk, w.i4.pk, w.i5.pk]],
        )
        # One statement: every path changes; i1 moves to another night; i2 and i4 swap
        # stations; i5 (no night: NULL before and after) changes nothing else.
        cursor.execute("INSERT INTO new_rows SELECT * FROM old_rows")
        cursor.execute("UPDATE new_rows SET path = path || '.new'")
        cursor.execute("UPDATE new_rows SET event_id = %s WHERE id = %s", [w.e2.pk, w.i1.pk])
        cursor.execute("UPDATE new_rows SET deployment_id = %s WHERE id = %s", [w.d2.pk, w.i2.pk])
        cursor.execute("UPDATE new_rows SET deployment_id = %s WHERE id = %s", [w.d1.pk, w.i4.pk])
    table = graph().kinds["item:monitoring.sourceimage"].table
    # The swap sums to zero per station: no amount at all; the night moved by one.
    assert run(delta_rows(graph(), table, "update")) == [
        ("monitoring.event", "captures_count", w.e1.pk, -1),
        ("monitoring.event", "captures_count", w.e2.pk, 1),
    ]
    items = {i for _target, i in run(item_rows(graph(), table, "update"))}
    assert items == {w.i1.pk, w.i2.pk, w.i4.pk}  # not i5: nothing it credits can change


def test_items_are_marked_from_their_children_memberships_and_own_links():
    g = graph()
    tables = {t.db_table: t for t in watched_tables(g).values()}

    def marked(table, operation):
        sql = " ".join(item_rows(g, tables[table], operation))
        return set(re.findall(r"'(item:[\w.]+)' AS target, r\.\"(\w+)\" AS id", sql))

    captures, occurrences = "item:monitoring.sourceimage", "item:monitoring.occurrence"
    for operation in ("insert", "update", "delete"):
        # A detection names its occurrence too: the first step from it to the capture sets.
        assert marked("monitoring_detection", operation) == {
            (captures, "source_image_id"),
            (occurrences, "occurrence_id"),
        }
        assert marked("monitoring_sourceimagecollection_images", operation) == {
            (captures, "sourceimage_id")
        }
    # An inserted capture has no detection or set yet; once there, its own links matter.
    assert marked("monitoring_sourceimage", "insert") == set()
    assert marked("monitoring_sourceimage", "update") == {(captures, "id")}
    # An occurrence is measured by its own filter: it is its own child, marked on insert too.
    assert marked("monitoring_occurrence", "insert") == {("item:monitoring.occurrence", "id")}


def test_full_routes_are_those_of_the_counts_kept_in_full():
    g = graph()
    routes = full_routes(g)
    full = {s.target.label for s in g.specs if isinstance(s.mode, Full)}
    assert full == {"counts_testapp.library"}
    assert {r.target.label for rs in routes.values() for r in rs} == full
    assert set(routes) == {"counts_testapp_shelf", "counts_testapp_book", "counts_testapp_review"}
    for table, rs in routes.items():  # a changed child moves the count on insert and delete
        assert all(r.table.db_table == table for r in rs)
        assert routes_for(rs, "insert") == routes_for(rs, "delete") == list(rs)


def test_via_keys_name_each_route_stably_as_a_route_mark():
    routes = [r for rs in full_routes(graph()).values() for r in rs]
    keys = [via_key(r) for r in routes]
    assert len(set(keys)) == len(keys)
    assert all(re.fullmatch(rf"{ROUTE_PREFIX}[0-9a-f]{{12}}", k) for k in keys)
    assert {kind_of(r.target.label, [1], via_key(r), None) for r in routes} == {Kind.ROUTE}
    rebuilt = full_routes(Graph.build(resolve_all(apps.get_models())))
    assert [via_key(r) for rs in rebuilt.values() for r in rs] == keys


@pytest.mark.django_db
def test_first_hop_climbs_by_indexed_probes_to_the_target_ids(library):
    w = library
    start = {  # a changed row of each table on the way, and the library it counts towards
        "counts_testapp_shelf": (w.science, w.school),
        "counts_testapp_book": (w.emma, w.city),
        "counts_testapp_review": (w.r4, w.school),
    }
    for table, [route] in full_routes(graph()).items():
        column, probes = first_hop(route)
        row, library = start[table]
        ids = [getattr(row, column)]  # the changed row's own column, read from it alone
        with connection.cursor() as cursor:
            for probe in probes:
                cursor.execute(
                    "SELECT count(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid ="
                    " i.indrelid AND a.attnum = i.indkey[0] WHERE i.indrelid = %s::regclass"
                    " AND a.attname = %s",
                    [probe.table.db_table, probe.where],
                )
                assert cursor.fetchone()[0] >= 1, (table, probe)  # one index probe per hop
                cursor.execute(
                    f'SELECT DISTINCT "{probe.select}" FROM "{probe.table.db_table}"'
                    f' WHERE "{probe.where}" = ANY(%s)',
                    [ids],
                )
                ids = [r[0] for r in cursor.fetchall()]
        assert ids == [library.pk], table
    assert first_hop(full_routes(graph())["counts_testapp_shelf"][0])[1] == []
