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
from counts.compile.item_sql import entries_sql, entry_targets_sql
from counts.declare.graph import Graph, app_graph
from counts.declare.kinds import kinds_feeding
from counts.declare.modes import ledger_key
from counts.operate import item_sweep
from counts.operate.target_pass import ModelReport, recount_model
from counts.run import multiplicity

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


def _credited_by_its_entries(graph: Graph, kind, part, using: str) -> bool:
    """Whether invariant I holds for ``part``'s column on its own: every row's value, plus the
    amounts queued for it, is what the ledger entries of ``part`` credit it (for a distinct
    count: its pairs counted, and each pair's multiplicity the sum of its entries, M). Then
    sweeping the items (each entry brought to the truth, the difference credited) makes the
    column exact, and the backfill need not recount every row.

    A new column holds it from the start (zeros, no entry) and keeps it whoever writes: the
    workers drain while a deploy migrates, and a drain of an item after the column was added
    writes the new entry and credits the column in one commit. Only a count that was kept
    another way before (own-row amounts, another declaration's entries) holds values no entry
    accounts for, and is recounted after the sweep instead, under the lease. One statement,
    so one snapshot: nothing a drain commits meanwhile can be half seen.
    """
    target = graph.targets[part.label]
    table, pk, column = q(target.db_table), q(target.pk), q(part.column)
    if part.distinct:
        pairs = f"SELECT target_id, value, n FROM {multiplicity.TABLE} WHERE key = %(key)s"
        credited = (
            "credited AS (SELECT target_id AS id, count(*) AS n"
            f"  FROM ({pairs}) m WHERE n > 0 GROUP BY 1),"
            " unsummed AS (SELECT 1"
            f"  FROM ({multiplicity.ledger_sums_sql([part.key], kind.mark_target)}) e"
            f"  FULL JOIN ({pairs}) m USING (target_id, value)"
            "  WHERE coalesce(e.n, 0) <> coalesce(m.n, 0)),"
        )
        also = " AND NOT EXISTS (SELECT 1 FROM unsummed)"
    else:
        # What the entries credit, read as the drains' credits are (``counts.compile.item_sql``).
        credited = (
            "credited AS (SELECT t::bigint AS id, sum((e.value->>0)::bigint) AS n"
            f"  FROM {LEDGER_TABLE} l"
            f"  CROSS JOIN LATERAL {entries_sql('l.state', [part.key])} e(key, value)"
            f"  CROSS JOIN LATERAL jsonb_array_elements_text({entry_targets_sql('e', kind)}) t"
            "  WHERE l.kind = %(kind)s AND l.state ? %(key)s AND e.value IS NOT NULL GROUP BY 1),"
        )
        also = ""
    statement = (
        f"WITH {credited}"
        " queued AS (SELECT u.id, sum(u.d) AS n"
        f"  FROM {MARK_TABLE} m CROSS JOIN LATERAL unnest(m.ids, m.deltas) u(id, d)"
        "  WHERE m.target = %(label)s AND m.field = %(column)s GROUP BY 1)"
        # Only rows that exist: an entry crediting a row since deleted credits nothing.
        f" SELECT NOT EXISTS (SELECT 1 FROM {table} r"
        f"  LEFT JOIN credited c ON c.id = r.{pk} LEFT JOIN queued p ON p.id = r.{pk}"
        f"  WHERE (r.{column} <> 0 OR c.id IS NOT NULL OR p.id IS NOT NULL)"
        f"  AND r.{column} + coalesce(p.n, 0) <> coalesce(c.n, 0)){also}"
    )
    params = {"kind": kind.mark_target, "key": part.key, "label": part.label, "column": part.column}
    with connections[using].cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone()[0]


def _sweep_kinds(graph: Graph, kinds: dict, lease: list[int], chunk: int, step, using: str) -> int:
    """Sweep each kind for its keys, its own lease ignored; returns the items checked.

    The kinds' leases stay until the whole backfill ends, though a kind's items are all swept
    by then: the lease also covers the kind for the counts of the migration's later targets,
    whose backfills have not started (killed here, the workers finish those too once it
    lapses). Its cost: a recount by the formula meanwhile takes every item of the kind as
    stale (``counts.compile.stale_items``), seconds a statement at 10⁶ (docs/engine.md)."""
    rows = 0
    for kind, keys in kinds.items():
        # Every item of a new count differs: claim them all rather than compare first (which
        # would build each item's truth twice).
        swept = item_sweep.sweep_keys(
            graph, kind, keys, lock_all=True, chunk=chunk, using=using, progress=step, ignored=lease
        )
        rows += swept.checked
    return rows


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
        if p.key in wanted and _credited_by_its_entries(graph, kind, p, using)
    }
    recounted = [s for s in specs if s.column not in swept]
    lease = take_lease([k.mark_target for k in kinds] + ([label] if recounted else []), using=using)

    def step(phase: str, rows: int) -> None:
        renew_lease(lease, using)
        if progress:
            progress(phase, rows)

    rows = _sweep_kinds(graph, kinds, lease, 5 * chunk, step, using)
    if recounted:
        recount = ModelReport(label)
        recount_model(graph, recount, False, chunk, step, using, lock_all=True)
        rows += recount.checked
    end_lease(lease, using)
    if rows:  # a fresh database's first migrations have nothing to say
        logger.info("%s: backfilled %s", label, ", ".join(s.name for s in specs))
