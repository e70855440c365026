"""The target pass of reconcile, rebuild and backfill: every row of one model recounted by range.

Each chunk of rows, taken in id order by keyset pagination, is one short transaction that
recounts its rows by the formula (``counts.run.aggregate``, ranged form) and writes those that
differ, having claimed them as "Recompute now" does (``SKIP LOCKED``; a held row is marked for
the drains). Chunks are sized from what the previous one cost, so that no transaction holds
its row locks for long whether a row is a capture (microseconds) or a capture set (its half a
million memberships); and how rows are claimed follows the same measure (see
:func:`recount_model`).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from counts.base import checkpoints
from counts.base.names import q
from counts.compile.item_sql import in_range
from counts.declare.graph import Graph
from counts.operate.recomputing import claim
from counts.run import aggregate
from counts.run.engine_transaction import engine_transaction

#: Seconds one transaction of a target pass aims at: a pass starts with a few rows and sizes
#: its chunks from what the previous ones cost, never over ``chunk`` rows. A station's
#: recount reads every capture of it, a capture's its own detections: the same number of rows
#: can cost a thousand times more, and no transaction should hold its row locks for long.
BUDGET_S = 0.25
#: Rows of a pass's first transaction.
FIRST_CHUNK = 16
#: Seconds of recount per row from which a repair that finds most rows drifted claims rows
#: before recounting them, rather than comparing first: comparing first recounts every row
#: that differs twice (a rebuild's twelve capture sets of 10^6: 5.4 s each time). Cheap rows
#: (a capture's, a few microseconds) are always compared first: locking costs more than that.
CLAIM_FIRST_S = 0.0005


@dataclass
class ModelReport:
    label: str
    checked: int = 0
    #: ``{row id: fields}`` found wrong, by the item pass's credits or the row's recount.
    cells: dict = field(default_factory=lambda: defaultdict(set))
    examples: list = field(default_factory=list)  # a few Change objects, for the log

    @property
    def drifted_rows(self) -> int:
        return len(self.cells)

    @property
    def drift(self) -> Counter:
        """``{field: rows that were wrong}``."""
        return Counter(f for fields in self.cells.values() for f in fields)

    def as_dict(self) -> dict:
        return {
            "checked": self.checked,
            "drifted_rows": self.drifted_rows,
            "drift": dict(self.drift),
        }


def recount_model(
    graph: Graph,
    model_report: ModelReport,
    dry_run: bool,
    chunk: int,
    progress,
    using: str,
    lock_all=False,
    expect_drift=False,
    within: tuple[int | None, int | None] = (None, None),
) -> None:
    """One target model's pass, ``chunk`` rows per transaction in id order.

    A repair compares first, without locks, and claims and writes only the rows that differ:
    at rest it locks and writes nothing (locking every row of 10^6 took 3 s and 200 MB of WAL
    a pass; a set's row locked for its whole recount would keep drains from it meanwhile).
    Where drift is the rule, comparing first reads each drifted row twice, which costly rows
    (:data:`CLAIM_FIRST_S` a row or more) cannot afford: a capture set's recount reads its half
    a million memberships (a rebuild's twelve sets of 10^6: 5.4 s each time). So once a chunk
    finds most of its rows drifted, the next chunks of costly rows are claimed first and
    recounted once; ``expect_drift`` (a rebuild, run after a restore or a load) starts so.
    ``lock_all``: claim and recount every row, as a pass that then drops the marks it covered
    must (a rebuild's marked models, a backfill ending its lease): only a lock attempt finds a
    row a drain is still writing, and the held ones are marked again. ``within``: only the
    rows of ``(lo, hi]`` (None: open), one slice of a pass on several connections."""
    label = model_report.label
    # Ranged: each transaction takes the next ids in key order, a whole range of them.
    statement = aggregate.compile_recompute(graph, label, using, ranged=True)
    checkpoints.reach("bulk.before_model", label=label)
    (last, end), size = within, min(chunk, FIRST_CHUNK)
    costly, drifting = True, expect_drift  # the first chunk's cost is not known yet
    while True:
        started = time.perf_counter()
        first = costly and drifting
        with engine_transaction(using) as cursor:
            ids = _next_ids(cursor, statement, last, size, end)
            if not ids:
                break
            claimed, checked, differed = _claim_rows(
                cursor, statement, label, ids, dry_run, lock_all, first
            )
            checkpoints.reach("recount.before_formula", label=label, ids=len(claimed))
            changes = aggregate.run(cursor, statement, claimed, write=not dry_run)
        seconds = time.perf_counter() - started
        costly = seconds / len(ids) >= CLAIM_FIRST_S
        drifting = 2 * (len(changes) if differed is None else differed) >= len(ids)
        size = next_size(size, len(ids), seconds, chunk)
        last = ids[-1]
        model_report.checked += len(checked)
        for change in changes:
            model_report.cells[change.pk].update(change.fields)
        model_report.examples.extend(changes[: max(0, 5 - len(model_report.examples))])
        if progress:
            progress(label, model_report.checked)
        checkpoints.reach("bulk.between_transactions", label=label, last=last)


def _claim_rows(cursor, statement, label: str, ids, dry_run: bool, lock_all: bool, first: bool):
    """``(rows to recount, rows checked, rows a comparison found differing or None)`` for one
    chunk of :func:`recount_model`: claimed all (``lock_all``), claimed before comparing
    (``first``), or compared first and only those that differ claimed."""
    if dry_run:
        return ids, ids, None
    if lock_all:
        claimed, _held = claim(cursor, statement, label, ids)
        return claimed, claimed, None
    if first:
        return claim(cursor, statement, label, ids, compare_held=True)[0], ids, None
    differ = [c.pk for c in aggregate.run(cursor, statement, ids, write=False)]
    claimed = claim(cursor, statement, label, differ)[0] if differ else []
    return claimed, ids, len(differ)


def next_size(size: int, rows: int, seconds: float, most: int) -> int:
    """Rows for the next transaction: what fits in :data:`BUDGET_S` at the last one's cost per
    row, at most four times the last and at most ``most``."""
    per_row = seconds / max(rows, 1)
    fits = int(BUDGET_S / per_row) if per_row > 0 else most
    return max(1, min(most, fits, 4 * size))


def _next_ids(cursor, statement, last: int | None, chunk: int, end: int | None) -> list[int]:
    """The next ``chunk`` ids after ``last``, up to ``end`` (keyset pagination: no offset to
    walk past)."""
    cursor.execute(
        f"SELECT {q(statement.pk)} FROM {q(statement.table)}"
        f" WHERE {in_range(q(statement.pk), (last, end))}"
        f" ORDER BY {q(statement.pk)} LIMIT %s",
        [chunk],
    )
    return [row[0] for row in cursor.fetchall()]
