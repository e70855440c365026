"""A new count's backfill: only the entries of the counts it adds, by range, under a lease.

A migration that adds counts (``counts.operations.BackfillCounts``) must bring them to the
truth for every existing row, on a live database, in short transactions, and must leave a state
that is exact once drained if it dies part-way (``migrate`` interrupted, a deploy, OOM).

- **Items**: the item kinds feeding the new counts are swept (``counts.operate.item_sweep``) for the
  new counts' ledger entries only, each chunk crediting what it writes, as a drain does. The
  new column starts at 0 with no ledger entry behind it, so invariant I holds from the first
  chunk's commit to the last. Entries of the other counts are reconcile's business.
- **Own-row and recounted counts** (no items) are recounted by the formula, row range by row
  range (``counts.operate.reconciling``'s target pass); so is an item count whose column already
  holds values no ledger entry accounts for (a count kept another way before: adding
  ``Project.captures_count`` turns ``Deployment.captures_count`` from own-row amounts into
  an item count), after its entries are swept.
- **The lease**: until the last chunk commits, the items not swept yet, and rows not yet
  recounted, are not covered by anything a drain would see. So the backfill first commits
  "every item" marks for those kinds (and an "every row" mark for a target with own-row
  counts) that are due only after a lease, renewed after every chunk. Drains leave them alone
  while the backfill runs; if it dies, the lease lapses and the workers take over — the marks
  are "every item" and "every row" marks, and draining them is exact, only slower. A finished
  backfill deletes them.

A re-run of ``migrate`` after a failure starts the backfill again from the first chunk; what
the first run credited is found equal to the truth and costs a comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.conf import settings
from django.db import connections, transaction

from counts.base.names import LEDGER_TABLE, MARK_TABLE, q
from counts.declare.graph import Graph, app_graph
from counts.declare.kinds import kinds_feeding
from counts.declare.modes import ledger_key
from counts.operate import item_sweep
from counts.operate.target_pass import ModelReport, recount_model

logger = logging.getLogger(__name__)

#: Seconds a backfill's lease marks wait before drains take them (``COUNTS_BACKFILL_LEASE_S``):
#: how long counts may stay behind after a backfill dies, renewed after every chunk.
LEASE_S = 60.0


def _lease_s() -> float:
    return float(getattr(settings, "COUNTS_BACKFILL_LEASE_S", LEASE_S))


def take_lease(targets: list[str], using: str) -> list[int]:
    """Commit the lease marks (``(target, NULL)`` each, due after the lease); their ids."""
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {MARK_TABLE} (target, ids, not_before)"
            " SELECT t, NULL, now() + make_interval(secs => %s) FROM unnest(%s::text[]) t"
            " RETURNING id",
            [_lease_s(), targets],
        )
        return [row[0] for row in cursor.fetchall()]


def renew_lease(ids: list[int], using: str) -> None:
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute(
            f"UPDATE {MARK_TABLE} SET not_before = now() + make_interval(secs => %s)"
            " WHERE id = ANY(%s)",
            [_lease_s(), ids],
        )


def end_lease(ids: list[int], using: str) -> None:
    with transaction.atomic(using=using), connections[using].cursor() as cursor:
        cursor.execute(f"DELETE FROM {MARK_TABLE} WHERE id = ANY(%s)", [ids])


def _untouched(graph: Graph, kind, part, using: str) -> bool:
    """Whether ``part``'s column is all zeros with no ledger entry and no queued amount behind
    it (a new count):
    then crediting what the sweep writes keeps invariant I from the start. A count that was
    kept another way before (or declared differently) holds values no ledger entry accounts
    for, and is recounted after the sweep instead, under the lease."""
    target = graph.targets[part.label]
    statement = (
        f"SELECT NOT EXISTS (SELECT 1 FROM {LEDGER_TABLE} WHERE kind = %s AND state ? %s)"
        f" AND NOT EXISTS (SELECT 1 FROM {q(target.db_table)} WHERE {q(part.column)} <> 0)"
        # Amounts queued for the column under its old way (own-row deltas) count too.
        f" AND NOT EXISTS (SELECT 1 FROM {MARK_TABLE} WHERE target = %s AND field = %s)"
    )
    with connections[using].cursor() as cursor:
        cursor.execute(statement, [kind.mark_target, part.key, part.label, part.column])
        return cursor.fetchone()[0]


def backfill(
    label: str,
    names: list[str] | None = None,
    *,
    chunk: int = 1000,
    using: str = "default",
    progress: Callable[[str, int], None] | None = None,
    graph: Graph | None = None,
) -> None:
    """Bring the counts ``names`` of ``label`` (all of its counts when None) to the truth for
    every existing row, as the module docstring says (``graph``: the app's when None)."""
    graph = graph or app_graph()
    specs = [s for s in graph.specs_for(label) if names is None or s.name in names]
    wanted = {ledger_key(s.key) for s in specs}
    kinds = {
        kind: sorted(wanted & {p.key for p in kind.parts_for(label)})
        for kind in kinds_feeding(graph, label)
    }
    kinds = {kind: keys for kind, keys in kinds.items() if keys}
    swept = {
        p.column
        for kind in kinds
        for p in kind.parts_for(label)
        if p.key in wanted and _untouched(graph, kind, p, using)
    }
    recounted = [s for s in specs if s.column not in swept]
    lease = take_lease([k.mark_target for k in kinds] + ([label] if recounted else []), using=using)

    def step(phase: str, rows: int) -> None:
        renew_lease(lease, using)
        if progress:
            progress(phase, rows)

    rows = 0
    for kind, keys in kinds.items():
        whole = set(keys) == {p.key for p in kind.parts}
        # Every item of a new count differs: claim them all rather than compare first (which
        # would build each item's truth twice).
        swept = item_sweep.sweep(
            graph,
            kind,
            None if whole else keys,
            lock_all=True,
            chunk=5 * chunk,
            using=using,
            progress=step,
            ignored=lease,
        )
        rows += swept.checked
    if recounted:
        recount = ModelReport(label)
        recount_model(graph, recount, False, chunk, step, using, lock_all=True)
        rows += recount.checked
    end_lease(lease, using)
    if rows:  # a fresh database's first migrations have nothing to say
        logger.info("%s: backfilled %s", label, ", ".join(s.name for s in specs))
