"""What a trigger reads from its own transition tables: the changed rows, the amounts of
own-row counts, the ids of items, and the first hop of each route a full count's marks take.

Pure text, read only from ``old_rows``/``new_rows``: a trigger never joins a transition table to
a big table (``docs/engine.md`` §2.2). ``counts.run.routes`` resolves route marks with
:func:`first_hop` and :func:`via_key` at drain time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from counts.base.mark import ROUTE_PREFIX
from counts.base.names import literal, q
from counts.declare.graph import ROOT, Graph, Route
from counts.declare.modes import Full, ItemCount, OwnRow
from counts.declare.spec import REVERSE, Table


def changed_rows(table: Table, columns: frozenset[str], side: str) -> str:
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


def routes_for(routes: tuple[Route, ...], operation: str) -> list[Route]:
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
    return [(changed_rows(table, columns, "new"), 1), (changed_rows(table, columns, "old"), -1)]


def delta_rows(graph: Graph, table: Table, operation: str) -> list[str]:
    """``SELECT target, field, id, d`` per own-row count fed by ``table``: exact amounts from
    the statement's own rows, summed per target row (rows whose sum is 0 are left out)."""
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
    sources: dict[tuple[str, str], set[str]] = {}  # (item kind, item column) -> columns read
    for spec in graph.specs:
        mode = spec.mode
        if not isinstance(mode, ItemCount):
            continue
        kind = mode.mark_target
        link, measure = mode.link, mode.measure
        if measure.child == table:
            sources.setdefault((kind, measure.fk), set()).update(measure.columns)
        first = link.first  # through rows, or an occurrence's detections
        if first is not None and first.table == table:
            sources.setdefault((kind, first.where), set()).update({first.where, first.select})
        if mode.kind == table and operation != "insert" and mode.own_columns:
            # An inserted item has no children or memberships yet: nothing to credit.
            sources.setdefault((kind, table.pk), set()).update(mode.own_columns)
    selects = []
    for (kind, column), columns in sorted(sources.items()):
        for relation, _sign in _rows(table, frozenset(columns), operation):
            selects.append(
                f"SELECT {literal(kind)} AS target, r.{q(column)} AS id FROM {relation} r"
                f" WHERE r.{q(column)} IS NOT NULL"
            )
    return selects


def full_routes(graph: Graph) -> dict[str, tuple[Route, ...]]:
    """The routes of the counts recounted in full (the only ones that still climb)."""
    full = Graph.build([s for s in graph.specs if isinstance(s.mode, Full)])
    return full.routes
