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
- **The lease** (``counts.operate.lease``): until the last chunk commits, the items not swept
  yet, and rows not yet recounted, are covered by nothing a drain would see. The backfill first
  commits marks covering them that fall due only if it dies (the workers then take over,
  exactly, only slower): for each swept kind an "every item" mark naming the new counts' keys,
  ended once that kind is swept, and an "every row" mark for the target, ended after its
  recount, or at once if :func:`decide` (which runs under the lease) finds none needed. A
  migration backfilling several targets takes them all before the first.

A re-run of ``migrate`` after a failure starts the backfill again from the first chunk; what
the first run credited is found equal to the truth and costs a comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from django.db import connections

from counts.base.names import LEDGER_TABLE, MARK_TABLE, q
from counts.compile.item_sql import entries_sql, entry_targets_sql
from counts.declare.graph import Graph, app_graph
from counts.declare.kinds import kinds_feeding
from counts.declare.modes import ledger_key
from counts.operate import item_sweep
from counts.operate.lease import Lease
from counts.operate.target_pass import ModelReport, recount_model
from counts.run import multiplicity

logger = logging.getLogger(__name__)


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


def _sweep_kinds(graph: Graph, job: Plan, lease: Lease, chunk: int, step, using: str) -> int:
    """Sweep each of ``job``'s kinds for its keys, every lease held left out of the stale
    items, and end the job's lease of the kind once swept; returns the items checked.

    Ended there, the lease stops making every item of the kind stale for a recount of the new
    counts (the job's own recount, below, included): its entries are the truth now, and an
    item changed since carries its own mark. The other targets' leases name their own keys."""
    rows = 0
    for kind, keys in job.kinds.items():
        # Every item of a new count differs: claim them all rather than compare first (which
        # would build each item's truth twice).
        swept = item_sweep.sweep_keys(
            graph,
            kind,
            keys,
            lock_all=True,
            chunk=chunk,
            using=using,
            progress=step,
            ignored=lease.ids(),
        )
        lease.end(job.label, kind.mark_target)
        rows += swept.checked
    return rows


@dataclass
class Plan:
    """What one target's backfill does (:func:`plan`, then :func:`decide` under its lease)."""

    label: str
    #: The counts filled.
    names: list[str]
    #: Their columns.
    columns: list[str]
    #: ``{item kind: the new counts' ledger keys it feeds}``: swept.
    kinds: dict
    #: Whether its rows are recounted after the sweep: until :func:`decide` says otherwise.
    recounts: bool = True

    def covers(self) -> list[tuple[str, str, list[str] | None]]:
        """What its lease covers (:meth:`Lease.take`): the new keys of each kind swept, and
        every row of the target until :func:`decide` finds no recount needed."""
        items = [(self.label, kind.mark_target, keys) for kind, keys in self.kinds.items()]
        return [*items, (self.label, self.label, None)]


def plan(label: str, names: list[str] | None, graph: Graph) -> Plan:
    """The backfill of the counts ``names`` of ``label`` (all of its counts when None)."""
    specs = [s for s in graph.specs_for(label) if names is None or s.name in names]
    wanted = {ledger_key(s.key) for s in specs}
    kinds = {
        kind: sorted(wanted & set(kind.keys_for(label))) for kind in kinds_feeding(graph, label)
    }
    kinds = {kind: keys for kind, keys in kinds.items() if keys}
    return Plan(label, [s.name for s in specs], [s.column for s in specs], kinds)


def decide(job: Plan, lease: Lease, graph: Graph, using: str) -> None:
    """Whether ``job`` recounts its rows, told under its lease; if not, end its every-row mark.

    Under the lease, because of what a recount by the formula writes meanwhile (a drain's, or
    "Recompute now" of a row): the new keys' lease makes every item stale for it, so it keeps
    the column equal to what the entries credit, and the verdict stands until the sweep.
    Without the lease, a recount in between would write the truth over a column no entry
    backs, the check would pass, and the sweep would credit the truth a second time."""
    swept = {
        p.column
        for kind in job.kinds
        for p in kind.parts_for(job.label)
        if p.column in job.columns and _credited_by_its_entries(graph, kind, p, using)
    }
    job.recounts = any(column not in swept for column in job.columns)
    if not job.recounts:
        lease.end(job.label, job.label)


def run(
    job: Plan,
    lease: Lease,
    *,
    chunk: int,
    using: str,
    graph: Graph,
    progress: Callable[[str, int], None] | None = None,
) -> None:
    """Carry ``job`` out under ``lease`` (taken with its :meth:`Plan.covers`, perhaps among
    other jobs'), renewed after every chunk; each of the job's marks ends when its part is
    done."""

    def step(phase: str, rows: int) -> None:
        lease.renew()
        if progress:
            progress(phase, rows)

    rows = _sweep_kinds(graph, job, lease, 5 * chunk, step, using)
    if job.recounts:
        recount = ModelReport(job.label)
        recount_model(graph, recount, False, chunk, step, using, lock_all=True)
        rows += recount.checked
    lease.end(job.label)
    if rows:  # a fresh database's first migrations have nothing to say
        logger.info("%s: backfilled %s", job.label, ", ".join(job.names))


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
    job = plan(label, names, graph)
    lease = Lease.take(job.covers(), using)
    decide(job, lease, graph, using)
    run(job, lease, chunk=chunk, using=using, graph=graph, progress=progress)
