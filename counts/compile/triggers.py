"""Compile the dependency graph into PostgreSQL statement-level triggers.

Every function here is pure: graph in, SQL text out. Tests assert the text; migrations store it;
``counts status`` compares the hash stored in ``COMMENT ON TRIGGER`` with the compiled one.

Shape of the generated code, per watched table and operation (one trigger per operation: a
trigger with transition tables may serve only one event, and may not use ``UPDATE OF``):

- ``AFTER INSERT`` / ``AFTER DELETE`` read ``new_rows`` / ``old_rows``; ``AFTER UPDATE`` keeps
  only rows whose read columns changed, from both sides, so a moved detection dirties the old
  image's targets and the new one's; ``AFTER TRUNCATE`` marks every row of each target.
- Nothing but the transition tables is read: own-row counts get exact amounts (delta marks),
  item counts get the items' ids (item marks, ``counts.run.items``), counts kept in full get the
  rows' own link values, which the drain resolves to target rows (``counts.run.routes``).
- One ``counts_dirtymark`` row per count, item kind or route per statement, however many rows
  changed.
"""

from __future__ import annotations

from counts.base.names import ENGINE_SETTING, MARK_TABLE, OPERATIONS, literal, q
from counts.compile.compiled import CompiledTrigger, object_name
from counts.compile.guards import compile_guards
from counts.compile.item_sql import mark_ledgered_sql
from counts.compile.trigger_rows import (
    changed_rows,
    delta_rows,
    first_hop,
    full_routes,
    item_rows,
    routes_for,
    via_key,
)
from counts.declare.graph import Graph, Route
from counts.declare.jobs import jobs_on
from counts.declare.modes import ItemCount, OwnRow
from counts.declare.spec import Table


def _incremental_statements(graph: Graph, table: Table, operation: str) -> list[str]:
    lines = []
    deltas = delta_rows(graph, table, operation)
    if deltas:
        lines.append(
            f"INSERT INTO {MARK_TABLE} (target, field, ids, deltas)"
            " SELECT s.target, s.field, array_agg(s.id ORDER BY s.id), array_agg(s.d ORDER BY s.id)"
            f" FROM ({' UNION ALL '.join(deltas)}) s GROUP BY s.target, s.field;"
        )
    # A setting, a link on the way to it, or a link row several steps from the items changed:
    # one job mark per job, expanded into items by the drain (``counts.declare.jobs``).
    lines += [
        job.trigger_sql(operation) for job in jobs_on(graph, table) if operation in job.operations
    ]
    items = item_rows(graph, table, operation)
    if items:
        lines.append(
            f"INSERT INTO {MARK_TABLE} (target, ids)"
            " SELECT s.target, array_agg(DISTINCT s.id ORDER BY s.id)"
            f" FROM ({' UNION ALL '.join(items)}) s GROUP BY s.target;"
        )
    return lines


def _truncate_statements(graph: Graph, table: Table, full_routes: list[Route]) -> list[str]:
    """Every row of the own-row and full targets is recounted; every credited item of the
    item kinds the table feeds is recomputed (an item with no ledger row had nothing to lose).
    """
    labels = {r.target.label for r in full_routes}
    kinds = set()
    # A link job's rows are gone: its items can only lose targets, so the credited ones do.
    every = sorted({job.kind for job in jobs_on(graph, table) if not job.values})
    for spec in graph.specs:
        mode = spec.mode
        if isinstance(mode, OwnRow) and mode.table == table:
            labels.add(spec.target.label)
        # An item table's own TRUNCATE cascades to its children and through rows, whose
        # triggers mark the items; it matters by itself only where it holds the link.
        if isinstance(mode, ItemCount) and (
            (mode.kind == table and mode.own_columns)
            or table in (mode.measure.child, *mode.link.tables)
        ):
            kinds.add(mode.mark_target)
    lines = [
        f"INSERT INTO {MARK_TABLE} (target, ids) VALUES ({literal(label)}, NULL);"
        for label in sorted(labels)
    ]
    all_kinds = graph.kinds
    lines += [mark_ledgered_sql(all_kinds[kind]) + ";" for kind in sorted(set(kinds) - set(every))]
    # Rows on the way to a setting are gone: every item of the kind may read another now.
    lines += [
        f"INSERT INTO {MARK_TABLE} (target, ids) VALUES ({literal(kind)}, NULL);" for kind in every
    ]
    return lines


def function_body(
    graph: Graph, table: Table, routes: list[Route], operation: str
) -> tuple[str, list[str]]:
    """The PL/pgSQL between BEGIN and END for one table and operation, and its variables.

    Own-row deltas and item marks come from the statement's own rows; only counts the engine
    recounts in full (``routes``) still climb to their target rows.
    """
    if operation == "truncate":
        lines = _truncate_statements(graph, table, routes)
        return "\n".join([*lines, "RETURN NULL;"]), []
    selects = []
    for route in routes:
        if operation == "update":
            # Old and new versions of the changed rows: a moved occurrence marks both stations.
            old, new = (changed_rows(route.table, route.columns, s) for s in ("old", "new"))
            source = f"({old} UNION ALL {new})"
        else:
            source = "new_rows" if operation == "insert" else "old_rows"
        column, probes = first_hop(route)
        via = literal(via_key(route)) if probes else "NULL"
        selects.append(
            f"SELECT {literal(route.target.label)} AS target, {via}::text AS field,"
            f" src.{q(column)} AS id FROM {source} src WHERE src.{q(column)} IS NOT NULL"
        )
    paths = [
        "-- " + " > ".join([r.target.label] + [h.child.db_table for h in r.chain]) for r in routes
    ]
    lines = _incremental_statements(graph, table, operation)
    if selects:
        # Full counts: the rows' own link values, resolved to target rows by the drain, in a
        # snapshot taken after this transaction commits (``counts.run.routes``).
        lines.append(
            f"INSERT INTO {MARK_TABLE} (target, field, ids)"
            " SELECT s.target, s.field, array_agg(DISTINCT s.id ORDER BY s.id)"
            f" FROM ({' UNION ALL '.join(selects)}) s GROUP BY s.target, s.field;"
        )
    return "\n".join([*paths, *lines, "RETURN NULL;"]), []


def compile_trigger(graph: Graph, table: Table, routes: tuple[Route, ...], operation: str):
    """Install SQL for one table and operation, or None when nothing needs it."""
    chosen = routes_for(routes, operation)
    if operation == "truncate":
        needed = bool(chosen) or bool(_truncate_statements(graph, table, []))
    else:
        needed = bool(chosen) or bool(_incremental_statements(graph, table, operation))
    if not needed:
        return None
    name = object_name(table.db_table, operation)
    body, variables = function_body(graph, table, chosen, operation)
    referencing = {
        "insert": "REFERENCING NEW TABLE AS new_rows",
        "update": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "delete": "REFERENCING OLD TABLE AS old_rows",
        "truncate": "",
    }[operation]
    # The engine's own writes (cached columns, under its setting) never change what a count
    # reads, so an UPDATE trigger skips its body for them: a drain writing four target rows
    # would otherwise run four trigger bodies that find nothing (0.16 ms each, measured).
    when = ""
    if operation == "update":
        when = f" WHEN (current_setting({literal(ENGINE_SETTING)}, true) IS DISTINCT FROM 'on')"
    declare = "".join(f"{v} bigint[];\n" for v in variables)
    if declare:
        declare = f"DECLARE\n{declare}"
    install = (
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $counts$\n"
        f"{declare}BEGIN\n{body}\nEND;\n$counts$;\n"
        f"DROP TRIGGER IF EXISTS {name} ON {q(table.db_table)};\n"
        f"CREATE TRIGGER {name} AFTER {operation.upper()} ON {q(table.db_table)}"
        f"{' ' + referencing if referencing else ''} FOR EACH STATEMENT{when}"
        f" EXECUTE FUNCTION {name}();"
    )
    return CompiledTrigger(name, table.db_table, operation, install)


def watched_tables(graph: Graph) -> dict[str, Table]:
    """Every table whose writes can change a count: full routes, own rows, items' inputs."""

    tables = {routes[0].table.db_table: routes[0].table for routes in graph.routes.values()}
    for job in graph.jobs:
        tables.setdefault(job.table.db_table, job.table)
    for spec in graph.specs:
        mode = spec.mode
        found = []
        if isinstance(mode, OwnRow):
            found = [mode.table]
        elif isinstance(mode, ItemCount):
            found = [mode.kind, mode.measure.child, *mode.link.tables]
        for t in found:
            tables.setdefault(t.db_table, t)
    return dict(sorted(tables.items()))


def compile_mark_triggers(graph: Graph) -> list[CompiledTrigger]:
    """The triggers that write marks, in a stable order."""
    compiled = []
    routes = full_routes(graph)
    for db_table, table in watched_tables(graph).items():
        for operation in OPERATIONS:
            trigger = compile_trigger(graph, table, routes.get(db_table, ()), operation)
            if trigger is not None:
                compiled.append(trigger)
    return compiled


def compile_triggers(graph: Graph) -> list[CompiledTrigger]:
    """Every trigger the graph needs, in a stable order: marks, then the columns' guards."""
    return compile_mark_triggers(graph) + compile_guards(graph)
