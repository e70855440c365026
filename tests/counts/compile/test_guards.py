"""The guards that make the cached columns the engine's (``counts.compile.guards``).

Pinned, as text: the column guard keeps every cached column and ``counts_updated_at`` unless the
transaction-local engine setting (``base.names.ENGINE_SETTING``) is exactly ``on``, fires only
when one of them changes and lets the rest of the update through; a row inserted with made-up
counts gets a RECOUNT mark; the key guard refuses primary-key changes of every row the engine
names by id; one trigger per table and guard, in a stable order. Run: a raw update keeps the
counts unless the setting is on, and renumbering a row on the way to a setting is refused.
(``tests/test_engine_owns_columns.py`` covers the ORM's write paths end to end.)
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from django.apps import apps
from django.db import NotSupportedError, connection, transaction

from counts.apps import graph
from counts.base.mark import Kind, kind_of
from counts.base.names import ENGINE_SETTING, FRESHNESS_FIELD
from counts.compile.compiled import object_name
from counts.compile.guards import (
    GUARD_OPERATIONS,
    compile_guards,
    keep_columns,
    keep_key,
    keyed_tables,
    mark_made_up,
)
from counts.declare.graph import Graph
from counts.declare.resolve import resolve_all

STATION_COLUMNS = [s.column for s in graph().specs_for("monitoring.deployment")]


def when(sql: str) -> str:
    return re.search(r"FOR EACH ROW WHEN \((.*)\) EXECUTE FUNCTION", sql).group(1)


def test_one_guard_of_each_kind_per_table_in_a_stable_order():
    g = graph()
    guards = compile_guards(g)
    assert set(Counter((t.table, t.operation) for t in guards).values()) == {1}
    assert {t.operation for t in guards} == set(GUARD_OPERATIONS)
    targets = {t.db_table for t in g.targets.values()}
    assert {t.table for t in guards if t.operation == "own"} == targets
    assert {t.table for t in guards if t.operation == "made"} == targets
    assert {t.table for t in guards if t.operation == "key"} == set(keyed_tables(g))
    for t in guards:
        assert t.name == object_name(t.table, t.operation)
        assert t.sql.count("CREATE TRIGGER") == 1 and " FOR EACH ROW WHEN (" in t.sql
    rebuilt = compile_guards(Graph.build(resolve_all(apps.get_models())))
    assert [t.as_dict() for t in rebuilt] == [t.as_dict() for t in guards]


def test_cached_columns_keep_their_values_unless_the_engine_setting_is_on():
    sql = keep_columns("monitoring_deployment", STATION_COLUMNS).sql
    guarded = {*STATION_COLUMNS, FRESHNESS_FIELD}
    assert 'BEFORE UPDATE ON "monitoring_deployment" FOR EACH ROW' in sql
    # ``true``: a session that never set it reads NULL instead of failing; anything but 'on'
    # (NULL, 'off', 'true') keeps the columns.
    assert f"IF current_setting('{ENGINE_SETTING}', true) IS DISTINCT FROM 'on' THEN" in sql
    assert set(re.findall(r'NEW\."(\w+)" := OLD\."\1";', sql)) == guarded
    assert len(re.findall(r":= OLD\.", sql)) == len(guarded)  # nothing else is put back
    # Fired only when one of them changes: a rename never runs the function.
    assert set(re.findall(r'OLD\."(\w+)" IS DISTINCT FROM NEW\."\1"', when(sql))) == guarded
    assert when(sql).count(" OR ") == len(guarded) - 1
    assert "RETURN NEW;" in sql  # the rest of the update goes through (NULL would skip it)


def test_a_row_inserted_with_made_up_counts_gets_a_recount_mark():
    sql = mark_made_up("monitoring.deployment", "monitoring_deployment", "id", STATION_COLUMNS).sql
    assert 'AFTER INSERT ON "monitoring_deployment" FOR EACH ROW' in sql
    made_up = set(re.findall(r'NEW\."(\w+)" IS DISTINCT FROM 0', when(sql)))
    assert made_up == set(STATION_COLUMNS)
    assert f'NEW."{FRESHNESS_FIELD}" IS NOT NULL' in when(sql)
    insert = re.search(r"INSERT INTO counts_dirtymark \((.*?)\) VALUES \((.*?)\);", sql)
    assert insert.groups() == ("target, ids", "'monitoring.deployment', ARRAY[NEW.\"id\"]")
    assert kind_of("monitoring.deployment", [1], None, None) is Kind.RECOUNT


def test_primary_keys_cannot_change_where_the_engine_names_rows_by_id():
    g = graph()
    keyed = keyed_tables(g)
    assert set(keyed) >= {t.db_table for t in g.targets.values()}  # stored counts, marks
    assert set(keyed) >= {k.table.db_table for k in g.kinds.values()}  # ledgers
    # Job marks name these rows (a link job's marks name its rows' links, unless they are ids).
    on_the_way = {job.table.db_table for job in g.jobs if job.values in (None, job.table.pk)}
    assert on_the_way == {
        "monitoring_project",
        "monitoring_deployment",
        "counts_testapp_library",
        "counts_testapp_shelf",
        "counts_testapp_book",  # a link job's marks name books by id (a library's tags)
    }
    assert set(keyed) >= on_the_way
    # Rows nobody names by id are free to be renumbered: children, through rows.
    assert not {"monitoring_detection", "monitoring_sourceimagecollection_images"} & set(keyed)
    sql = keep_key("monitoring_project", "id").sql
    assert 'BEFORE UPDATE OF "id" ON "monitoring_project" FOR EACH ROW' in sql
    assert when(sql) == 'OLD."id" IS DISTINCT FROM NEW."id"'
    assert "RAISE EXCEPTION USING ERRCODE = 'feature_not_supported'" in sql


@pytest.mark.django_db
def test_raw_sql_keeps_the_counts_unless_the_engine_setting_is_on(world):
    w = world

    def stored(cursor):
        cursor.execute(
            "SELECT captures_count, counts_updated_at FROM monitoring_deployment WHERE id = %s",
            [w.d1.pk],
        )
        return cursor.fetchone()

    update = (
        "UPDATE monitoring_deployment SET captures_count = 99, counts_updated_at = now(),"
        " name = %s WHERE id = %s"
    )
    with connection.cursor() as cursor:
        before = stored(cursor)
        for setting in ("off", "true", ""):
            cursor.execute("SELECT set_config(%s, %s, true)", [ENGINE_SETTING, setting])
            cursor.execute(update, [f"renamed {setting}", w.d1.pk])
        cursor.execute("SELECT name FROM monitoring_deployment WHERE id = %s", [w.d1.pk])
        assert cursor.fetchone()[0] == "renamed "  # the rename went through
        assert stored(cursor) == before  # counts and freshness alike
        cursor.execute("SELECT set_config(%s, 'on', true)", [ENGINE_SETTING])
        cursor.execute(update, ["by the engine", w.d1.pk])
        assert stored(cursor)[0] == 99 and stored(cursor)[1] != before[1]
        cursor.execute("SELECT set_config(%s, '', true)", [ENGINE_SETTING])


@pytest.mark.django_db
def test_renumbering_a_row_on_the_way_to_a_setting_is_refused(world, marks):
    w = world
    refused = pytest.raises(NotSupportedError, match="primary key of monitoring_project")
    with refused, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE monitoring_project SET id = id + 1000 WHERE id = %s", [w.p1.pk])
    with connection.cursor() as cursor:  # an update that keeps the key is no concern of it
        cursor.execute("UPDATE monitoring_project SET id = id, name = 'x' WHERE id = %s", [w.p1.pk])
    assert marks.count() == 0
