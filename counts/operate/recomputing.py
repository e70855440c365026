"""Recomputing given rows now, in full, under the same row locks as a drain.

"Recompute now" (the admin action, ``counts.recompute``) and reconcile's repairs recount rows
by the formula (``counts.run.aggregate``) rather than from marks. They claim rows the way a drain
does (:func:`claim`: ``SKIP LOCKED``, the held ones marked again for the workers), so none of
them ever waits on a row lock held by a writer or a drain.
"""

from __future__ import annotations

from collections import defaultdict

from counts.base.errors import UnknownTargetError
from counts.declare.graph import Graph, app_graph
from counts.run import aggregate
from counts.run.engine_transaction import engine_transaction
from counts.run.marks import defer


def _recompute(
    cursor, graph: Graph, label: str, ids: list[int], using: str
) -> tuple[int, int, int]:
    """Lock what can be locked, recompute and write it, mark the rest again for later.

    Returns:
        (rows recomputed, rows whose counts changed, rows deferred because someone holds them)
    """
    statement = aggregate.compile_recompute(graph, label, using)
    locked, held = claim(cursor, statement, label, ids)
    changes = aggregate.run(cursor, statement, locked, write=True)
    return len(locked), len(changes), held


def claim(
    cursor, statement, label: str, ids: list[int], compare_held: bool = False
) -> tuple[list[int], int]:
    """Lock the rows of ``ids`` nobody else holds; mark the held ones again, due a little later.

    "Recompute now" and the bulk passes' target recounts claim rows this way, so neither waits
    on a row lock. ``compare_held``: a held row is compared first, without a lock, and marked
    only if it differs (rows claimed before they were compared: an exact row a drain happens
    to hold is left to it, as a pass comparing first would leave it). Returns (ids locked,
    rows deferred).
    """
    locked = aggregate.lock(cursor, statement, ids)
    held = aggregate.held_elsewhere(cursor, statement, ids, locked)
    if held and compare_held:
        held = [c.pk for c in aggregate.run(cursor, statement, held, write=False)]
    if held:
        defer(cursor, label, held)
    return locked, len(held)


def recompute_rows(
    ids_by_label: dict[str, list[int]], using: str = "default", graph: Graph | None = None
) -> tuple[int, int]:
    """Recompute the given rows now, under the same locks as a drain.

    A row another transaction holds is marked instead, for the workers to recompute once it is
    free: "Recompute now" never hangs on an admin form left open.

    Returns:
        (rows recomputed, rows whose stored counts changed)
    """
    graph = graph or app_graph()
    recomputed = changed = 0
    with engine_transaction(using) as cursor:
        for label in sorted(ids_by_label):
            if label not in graph.targets:
                raise UnknownTargetError(label)
            ids = sorted(set(ids_by_label[label]))
            done, written, _deferred = _recompute(cursor, graph, label, ids, using)
            recomputed += done
            changed += written
    return recomputed, changed


def recompute(rows) -> tuple[int, int]:
    """Recompute the cached counts of a queryset or an iterable of instances, synchronously.

    Returns:
        (rows recomputed, rows whose stored counts changed)
    """
    ids: dict[str, list[int]] = defaultdict(list)
    if hasattr(rows, "model") and hasattr(rows, "values_list"):
        ids[rows.model._meta.label_lower] = list(rows.values_list("pk", flat=True))
    else:
        for obj in rows:
            ids[obj._meta.label_lower].append(obj.pk)
    return recompute_rows(dict(ids))
