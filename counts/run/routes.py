"""Resolving the marks of counts recounted in full: from the written rows to target rows.

A trigger records, for a count kept in full, only the link values of its own rows (the
projects whose threshold changed, the occurrences' stations) with the route they start
(``field = 'via:<hash>'``); the drain walks the rest of the route here, one indexed probe per
hop, in its own snapshot. So no writer reads another table, and a threshold change costs the
writer one mark, however many rows the project holds.

Why resolving late is exact: say change X alters target T's count. The drain resolves X's
mark in a snapshot S taken after X committed. If X's rows are linked to T in S, X resolves to
T and T is recounted at a snapshot that contains X. If the link was broken after X (a station
moved to another project), the move's own old values mark T, and T's recount after the move no
longer needs X. If the link was made after X, the change that made it marks T with its new
values, and T's recount sees X, which committed first. Resolving in the writer instead reads
the links in the writer's snapshot, which a concurrent change can make wrong for good.
"""

from __future__ import annotations

from counts.base.names import q
from counts.compile.trigger_rows import first_hop, full_routes, via_key


def routes_by_key(graph) -> dict[str, object]:

    found = {}
    for routes in full_routes(graph).values():
        for route in routes:
            found[via_key(route)] = route
    return found


def resolve(cursor, graph, key: str, ids: list[int]) -> list[int] | None:
    """Target ids the values ``ids`` at the start of route ``key`` lead to now (None: the
    route no longer exists, so the mark means nothing)."""
    route = routes_by_key(graph).get(key)
    if route is None:
        return None
    _column, probes = first_hop(route)
    for probe in probes:
        if not ids:
            return []
        cursor.execute(
            f"SELECT DISTINCT t.{q(probe.select)} FROM {q(probe.table.db_table)} t"
            f" WHERE t.{q(probe.where)} = ANY(%s) AND t.{q(probe.select)} IS NOT NULL",
            [ids],
        )
        ids = [row[0] for row in cursor.fetchall()]
    return sorted(ids)
