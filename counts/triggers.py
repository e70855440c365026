"""Compile the dependency graph into PostgreSQL statement-level triggers.

Every function here is pure: graph in, SQL text out. Tests assert the text; migrations store it;
``counts status`` compares the hash stored in ``COMMENT ON TRIGGER`` with the compiled one.

Shape of the generated code, per watched table and operation (one trigger per operation: a
trigger with transition tables may serve only one event, and may not use ``UPDATE OF``):

- ``AFTER INSERT`` / ``AFTER DELETE`` read ``new_rows`` / ``old_rows``; ``AFTER UPDATE`` keeps
  only rows whose read columns changed, from both sides, so a moved detection dirties the old
  image's targets and the new one's; ``AFTER TRUNCATE`` marks every row of each target.
- Nothing but the transition tables is read: own-row counts get exact amounts (delta marks),
  item counts get the items' ids (item marks, ``counts.items``), counts kept in full get the
  rows' own link values, which the drain resolves to target rows (``counts.routes``).
- One ``counts_dirtymark`` row per count, item kind or route per statement, however many rows
  changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from counts.graph import ROOT, Graph, Route
from counts.mark import ROUTE_PREFIX
from counts.spec import REVERSE, Table

#: Table the triggers write to (``counts.models.DirtyMark``).
MARK_TABLE = "counts_dirtymark"
#: Table locks, weakest first: what ``CREATE [OR REPLACE] TRIGGER`` takes (writers wait, readers
#: do not), and what ``DROP TRIGGER`` takes (everyone waits).
SHARE_ROW_EXCLUSIVE = "SHARE ROW EXCLUSIVE"
ACCESS_EXCLUSIVE = "ACCESS EXCLUSIVE"
#: Operations, in the order triggers are compiled.
OPERATIONS = ("insert", "update", "delete", "truncate")
_SHORT = {
    "insert": "ins",
    "update": "upd",
    "delete": "del",
    "truncate": "trunc",
    "own": "own",
    "made": "made",
    "key": "key",
}


@dataclass(frozen=True)
class CompiledTrigger:
    """One trigger and its function, ready to install or compare.

    ``sql`` creates the function and the trigger; ``install_sql`` adds the comment carrying
    ``hash``, which is how an installed trigger is told apart from an outdated one.
    """

    name: str
    table: str
    operation: str
    sql: str

    @property
    def hash(self) -> str:
        return hashlib.sha1(self.sql.encode()).hexdigest()

    @property
    def install_sql(self) -> str:
        """``sql`` with its trigger replaced in place, then the comment carrying ``hash``.

        ``sql`` (what migrations store, and what ``hash`` covers) drops the trigger and creates
        it again; ``DROP TRIGGER`` takes an ``ACCESS EXCLUSIVE`` lock on the table, which waits
        for every open reader and queues every later one behind it. ``CREATE OR REPLACE
        TRIGGER`` (PostgreSQL 14) takes ``SHARE ROW EXCLUSIVE``, which readers never wait for,
        and is as idempotent: installing a trigger that is there already replaces it.
        """
        drop_create = (
            f"DROP TRIGGER IF EXISTS {self.name} ON {q(self.table)};\nCREATE TRIGGER {self.name} "
        )
        sql = self.sql.replace(drop_create, f"CREATE OR REPLACE TRIGGER {self.name} ", 1)
        return f"{sql}\nCOMMENT ON TRIGGER {self.name} ON {q(self.table)} IS {literal(self.hash)};"

    @property
    def install_lock(self) -> str:
        """The table lock ``install_sql`` needs (``counts.operations`` takes it up front)."""
        return ACCESS_EXCLUSIVE if "DROP TRIGGER" in self.install_sql else SHARE_ROW_EXCLUSIVE

    @property
    def uninstall_sql(self) -> str:
        """Drop the trigger and its function; nothing to drop is no error (idempotent)."""
        return (
            f"DROP TRIGGER IF EXISTS {self.name} ON {q(self.table)};\n"
            f"DROP FUNCTION IF EXISTS {self.name}();"
        )

    #: The table lock ``uninstall_sql`` needs: ``DROP TRIGGER`` takes ``ACCESS EXCLUSIVE``.
    uninstall_lock = ACCESS_EXCLUSIVE

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "table": self.table,
            "operation": self.operation,
            "sql": self.sql,
        }


def q(identifier: str) -> str:
    """Quote an SQL identifier."""
    return '"' + identifier.replace('"', '""') + '"'


def literal(value: str) -> str:
    """Quote an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def object_name(table: str, operation: str) -> str:
    """Predictable trigger/function name under PostgreSQL's 63-character limit."""
    name = f"counts_{_SHORT[operation]}_{table}"
    if len(name) > 63:
        digest = hashlib.sha1(table.encode()).hexdigest()[:8]
        name = f"{name[:54]}_{digest}"
    return name.lower()


def _changed_rows(table: Table, columns: frozenset[str], side: str) -> str:
    """Rows of one transition table whose read columns differ on the other side."""
    this, other = ("old_rows", "new_rows") if side == "old" else ("new_rows", "old_rows")
    same = " AND ".join(
        [f"o.{q(table.pk)} = s.{q(table.pk)}"]
        + [f"o.{q(c)} IS NOT DISTINCT FROM s.{q(c)}" for c in sorted(columns)]
    )
    return f"(SELECT s.* FROM {this} s WHERE NOT EXISTS (SELECT 1 FROM {other} o WHERE {same}))"


@dataclass(frozen=True)
class Probe:
    """One hop up: ``SELECT select FROM table WHERE where = ANY(<ids>)``."""

    table: Table
    select: str
    where: str


def first_hop(route: Route) -> tuple[str, list[Probe]]:
    """The column of the changed rows a route starts from, and the probes that move its
    values one hop up at a time, by index, until they are target ids (none when the values
    are target ids already)."""
    probes: list[Probe] = []
    chain = route.chain
    if route.reached_by == ROOT:
        column = route.target.pk
        held_table, held_column = route.target, route.target.pk
    else:
        last = chain[-1]
        if last.kind == REVERSE:
            column = last.column
            held_table, held_column = last.parent, last.parent.pk
        else:
            column = last.child.pk
            held_table, held_column = last.parent, last.column
        for hop in reversed(chain[:-1]):
            # We hold values of ``held_column`` on rows of hop.child; step to hop.parent.
            child = hop.child
            if hop.kind == REVERSE:
                probes.append(Probe(child, hop.column, held_column))
                held_table, held_column = hop.parent, hop.parent.pk
            else:
                if held_column != child.pk:
                    probes.append(Probe(child, child.pk, held_column))
                held_table, held_column = hop.parent, hop.column
    if held_column != held_table.pk:
        probes.append(Probe(held_table, held_table.pk, held_column))
    return column, probes


def via_key(route: Route) -> str:
    """A stable name for a route, carried by marks the drain resolves (``via:<hash>``)."""
    hops = [(h.kind, h.parent.db_table, h.child.db_table, h.column) for h in route.chain]
    return ROUTE_PREFIX + hashlib.sha1(repr((route.target.label, hops)).encode()).hexdigest()[:12]


def _routes_for(routes: tuple[Route, ...], operation: str) -> list[Route]:
    if operation in ("insert", "delete"):
        return [r for r in routes if r.on_insert_delete]
    if operation == "update":
        return [r for r in routes if r.on_update]
    return [r for r in routes if r.on_insert_delete or r.on_update]


def _rows(table: Table, columns: frozenset[str], operation: str) -> list[tuple[str, int]]:
    """``(relation of rows, sign)`` a statement changed, as far as ``columns`` are concerned."""
    if operation == "insert":
        return [("new_rows", 1)]
    if operation == "delete":
        return [("old_rows", -1)]
    return [(_changed_rows(table, columns, "new"), 1), (_changed_rows(table, columns, "old"), -1)]


def delta_rows(graph: Graph, table: Table, operation: str) -> list[str]:
    """``SELECT target, field, id, d`` per own-row count fed by ``table``: exact amounts from
    the statement's own rows, summed per target row (rows whose sum is 0 are left out)."""
    from counts.modes import OwnRow

    selects = []
    for spec in graph.specs:
        mode = spec.mode
        if not isinstance(mode, OwnRow) or mode.table != table:
            continue
        parts = []
        for relation, sign in _rows(table, mode.columns, operation):
            where = f"r.{q(mode.fk)} IS NOT NULL"
            if mode.predicate:
                where += f" AND ({mode.predicate})"
            parts.append(
                f"SELECT r.{q(mode.fk)} AS id, {sign} AS d FROM {relation} r WHERE {where}"
            )
        selects.append(
            f"SELECT {literal(spec.target.label)} AS target, {literal(spec.column)} AS field,"
            f" x.id, sum(x.d)::int AS d FROM ({' UNION ALL '.join(parts)}) x"
            " GROUP BY x.id HAVING sum(x.d) <> 0"
        )
    return selects


def item_rows(graph: Graph, table: Table, operation: str) -> list[str]:
    """``SELECT target, id`` of the items whose contribution a statement on ``table`` may have
    changed, read from its own rows' old and new values only: the item row itself when its
    link column changed, the children's and through rows' item column otherwise."""
    from counts.modes import ItemCount

    sources: dict[tuple[str, str], set[str]] = {}  # (item kind, item column) -> columns read
    for spec in graph.specs:
        mode = spec.mode
        if not isinstance(mode, ItemCount):
            continue
        kind = mode.mark_target
        link, measure = mode.link, mode.measure
        if measure.child == table:
            sources.setdefault((kind, measure.fk), set()).update(measure.columns)
        if link.through == table:
            cols = {link.item_column, link.target_column}
            sources.setdefault((kind, link.item_column), set()).update(cols)
        if link.through is None and mode.kind == table and operation != "insert":
            # An inserted item has no children or memberships yet: nothing to credit.
            sources.setdefault((kind, table.pk), set()).add(link.target_column)
    selects = []
    for (kind, column), columns in sorted(sources.items()):
        for relation, _sign in _rows(table, frozenset(columns), operation):
            selects.append(
                f"SELECT {literal(kind)} AS target, r.{q(column)} AS id FROM {relation} r"
                f" WHERE r.{q(column)} IS NOT NULL"
            )
    return selects


def _incremental_statements(graph: Graph, table: Table, operation: str) -> list[str]:
    lines = []
    deltas = delta_rows(graph, table, operation)
    if deltas:
        lines.append(
            f"INSERT INTO {MARK_TABLE} (target, field, ids, deltas)"
            " SELECT s.target, s.field, array_agg(s.id ORDER BY s.id), array_agg(s.d ORDER BY s.id)"
            f" FROM ({' UNION ALL '.join(deltas)}) s GROUP BY s.target, s.field;"
        )
    if operation == "update":
        from counts.jobs import jobs_on

        # A setting, or a link on the way to it, changed: one job mark per job, expanded into
        # items by the drain (``counts.jobs``).
        lines += [job.trigger_sql() for job in jobs_on(graph, table)]
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
    from counts.item_backfill import mark_ledgered_sql
    from counts.items import item_kinds
    from counts.jobs import jobs_on
    from counts.modes import ItemCount, OwnRow

    labels = {r.target.label for r in full_routes}
    kinds = set()
    every = sorted({job.kind for job in jobs_on(graph, table)})
    for spec in graph.specs:
        mode = spec.mode
        if isinstance(mode, OwnRow) and mode.table == table:
            labels.add(spec.target.label)
        # An item table's own TRUNCATE cascades to its children and through rows, whose
        # triggers mark the items; it matters by itself only where it holds the link.
        if isinstance(mode, ItemCount) and (
            (mode.kind == table and mode.link.through is None)
            or table in (mode.measure.child, mode.link.through)
        ):
            kinds.add(mode.mark_target)
    lines = [
        f"INSERT INTO {MARK_TABLE} (target, ids) VALUES ({literal(label)}, NULL);"
        for label in sorted(labels)
    ]
    all_kinds = item_kinds(graph)
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
            old, new = (_changed_rows(route.table, route.columns, s) for s in ("old", "new"))
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
        # snapshot taken after this transaction commits (``counts.routes``).
        lines.append(
            f"INSERT INTO {MARK_TABLE} (target, field, ids)"
            " SELECT s.target, s.field, array_agg(DISTINCT s.id ORDER BY s.id)"
            f" FROM ({' UNION ALL '.join(selects)}) s GROUP BY s.target, s.field;"
        )
    return "\n".join([*paths, *lines, "RETURN NULL;"]), []


def compile_trigger(graph: Graph, table: Table, routes: tuple[Route, ...], operation: str):
    """Install SQL for one table and operation, or None when nothing needs it."""
    chosen = _routes_for(routes, operation)
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
        from counts.guards import ENGINE_SETTING

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
    from counts.jobs import jobs
    from counts.modes import ItemCount, OwnRow

    tables = {routes[0].table.db_table: routes[0].table for routes in graph.routes.values()}
    for job in jobs(graph):
        tables.setdefault(job.table.db_table, job.table)
    for spec in graph.specs:
        mode = spec.mode
        found = []
        if isinstance(mode, OwnRow):
            found = [mode.table]
        elif isinstance(mode, ItemCount):
            found = [mode.kind, mode.measure.child] + (
                [mode.link.through] if mode.link.through else []
            )
        for t in found:
            tables.setdefault(t.db_table, t)
    return dict(sorted(tables.items()))


def full_routes(graph: Graph) -> dict[str, tuple[Route, ...]]:
    """The routes of the counts recounted in full (the only ones that still climb)."""
    from counts.modes import Full

    full = Graph.build([s for s in graph.specs if isinstance(s.mode, Full)])
    return full.routes


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
    from counts.guards import compile_guards  # guards build on this module's helpers

    return compile_mark_triggers(graph) + compile_guards(graph)
