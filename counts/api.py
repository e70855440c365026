"""The engine's public API: what code outside ``counts`` (workers, the project, bench) uses.

``counts/__init__.py`` serves the same names lazily (``counts.drain()``), so that importing
``counts.fields`` from a models module never pulls in the engine before the app registry is
ready. Import from here once apps are loaded; ``workers`` imports nothing else of the engine
(import-linter holds it to that: ``pyproject.toml``).
"""

from __future__ import annotations

from counts.base.errors import CountsError, first_line
from counts.base.signals import reconciled, status_extras
from counts.declare.graph import Graph, app_graph
from counts.operate.recomputing import recompute, recompute_rows
from counts.operate.reconciling import rebuild, reconcile, target_rows
from counts.run.draining import drain, drain_until_empty
from counts.run.exact import ExactRow, apply_exact, exact, read_exact
from counts.run.marks import (
    LOCKED_RETRY_MS,
    PendingSummary,
    has_pending,
    next_due_seconds,
    pending_summary,
)
from counts.run.multiplicity import value_counts as _value_counts
from counts.run.notice import marks_committed


def drain_labels(graph: Graph | None = None) -> set[str]:
    """Every label a drain message may name: target models and item kinds (``item:<label>``)."""
    graph = graph or app_graph()
    return {*graph.targets, *graph.kinds}


def value_counts(model, field: str, graph: Graph | None = None):
    """Per target and counted value, how many counted items carry it: the grouped count a
    distinct count keeps (``counts.run.multiplicity.value_counts``)."""
    return _value_counts(graph or app_graph(), model, field)


__all__ = [
    "LOCKED_RETRY_MS",
    "CountsError",
    "ExactRow",
    "Graph",
    "PendingSummary",
    "app_graph",
    "apply_exact",
    "drain",
    "drain_labels",
    "drain_until_empty",
    "exact",
    "first_line",
    "has_pending",
    "marks_committed",
    "next_due_seconds",
    "pending_summary",
    "read_exact",
    "rebuild",
    "recompute",
    "recompute_rows",
    "reconcile",
    "reconciled",
    "status_extras",
    "target_rows",
    "value_counts",
]
