"""Running a bulk pass's slices side by side: ``counts reconcile --jobs N``.

Every transaction of a bulk pass (an item chunk, a target chunk) already stands on its own: it
claims its rows with ``SKIP LOCKED``, keeps invariants I, J and M at its commit, and may race
drains in any order. Two such transactions of *one* pass racing each other are no different
from a pass racing a drain, so a pass can be cut into key ranges (*slices*) run at once on
separate connections, and stays exact for the same reason.

Why bother: the engine runs every statement without parallel workers (their start-up cost more
than it saved on a chunk's statements, ``counts.run.engine_transaction``), so a pass used one
core of the database server, while the hand-written statement it is measured against used
three. On a 2-core machine at 10^6, a dry reconcile took 40-44 s on two connections instead
of 62-72 s on one, a rebuild from a wiped state 76-118 s instead of 142-227 s (measured side
by side; docs/engine.md §6.6); on a larger server the slices go further.

The default stays one job: the scheduler's nightly reconcile should leave the cores to the
application; an operator repairing a restore, or ``seed_demo`` with nothing else running, asks
for more.

Threads, not processes: the work is mostly PostgreSQL's, so the GIL matters little (a
rebuild's credits, summed in Python, are where it shows), and each thread gets its own
connection from Django (connections are per thread) and closes it when it is done. A slice
that fails stops the others at their next chunk (:class:`Slices` checks as each chunk reports
its progress), and its error is raised once all have stopped: nothing is left half-written,
since every chunk is its own transaction.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from django.db import connections

from counts.base.names import q
from counts.declare.graph import Graph
from counts.operate import item_sweep, target_pass


class Stopped(Exception):
    """Raised in a slice when another slice of the pass failed: it stops at its next chunk."""


def bounds(cursor, table: str, pk: str, parts: int) -> list[tuple[int | None, int | None]]:
    """``parts`` key ranges ``(lo, hi]`` covering every id of ``table``, the first open below
    and the last open above (so orphans outside the ids, e.g. ledgers of deleted items, are
    in one of them). Cut evenly between the smallest and largest id: ids are a sequence's, so
    even cuts hold even numbers of rows, and two index probes cost nothing (a quantile would
    read the whole index)."""
    cursor.execute(f"SELECT min({q(pk)}), max({q(pk)}) FROM {q(table)}")
    low, high = cursor.fetchone()
    if parts <= 1 or low is None or high - low < parts:
        return [(None, None)]
    cuts = [low + (high - low) * i // parts for i in range(1, parts)]
    return list(zip([None, *cuts], [*cuts, None], strict=True))


@dataclass
class _Task:
    label: str
    run: Callable[[Callable[[str, int], None]], object]


class Slices:
    """A pool of ``jobs`` threads running the slices of one stage of a pass.

    Each slice is ``run(progress)``: it calls ``progress(label, rows so far)`` after each
    chunk, as a whole pass does; the rows of a label's slices are summed for the caller's
    ``progress``, which is called from one thread at a time, and told when a label's last
    slice is done (``progress.finish(label)``, when it has one: several bars at once)."""

    def __init__(self, jobs: int, progress: Callable[[str, int], None] | None, using: str):
        self.jobs = jobs
        self.progress = progress
        self.using = using
        self._lock = threading.Lock()
        self._failed: list[BaseException] = []

    def run(self, tasks: Iterable[tuple[str, Callable]]) -> list:
        """Run ``tasks`` (``(label, run)``, biggest first) and return their results in order."""
        tasks = [_Task(label, run) for label, run in tasks]
        results: list = [None] * len(tasks)
        left = defaultdict(int)
        rows: dict[tuple[str, int], int] = {}
        for task in tasks:
            left[task.label] += 1
        queue = list(enumerate(tasks))

        def worker() -> None:
            try:
                while not self._failed:
                    with self._lock:
                        if not queue:
                            return
                        n, task = queue.pop(0)
                    progress = self._reporter(task.label, n, rows)
                    progress(task.label, 0)  # the slice starts: its phase too, if first
                    results[n] = task.run(progress)
                    self._done(task.label, left)
            except BaseException as error:  # handed to the caller's thread
                with self._lock:
                    if not isinstance(error, Stopped):
                        self._failed.append(error)
            finally:
                connections[self.using].close()

        threads = [
            threading.Thread(target=worker, name=f"counts-slice-{i}", daemon=True)
            for i in range(min(self.jobs, len(tasks)))
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        except BaseException:
            # Ctrl-C in the caller: the slices stop at their next chunk (each chunk is its own
            # transaction; one cut short by the exit is rolled back by the server).
            self._failed.append(Stopped("interrupted"))
            raise
        if self._failed:
            raise self._failed[0]
        return results

    def _reporter(self, label: str, n: int, rows: dict) -> Callable[[str, int], None]:
        def progress(_label: str, checked: int) -> None:
            if self._failed:
                raise Stopped(f"{label}: another slice of the pass failed")
            with self._lock:
                rows[(label, n)] = checked
                if self.progress:
                    total = sum(v for (lbl, _n), v in rows.items() if lbl == label)
                    self.progress(label, total)

        return progress

    def _done(self, label: str, left: dict) -> None:
        with self._lock:
            left[label] -= 1
            finish = getattr(self.progress, "finish", None)
            if not left[label] and finish is not None:
                finish(label)


def sweep_kinds(graph: Graph, kinds: dict, options: dict, progress, jobs: int) -> dict:
    """``{kind: SweepReport}``: ``counts.operate.item_sweep.sweep_keys`` of each kind (``kinds``:
    ``{kind: ledger keys}``, ``options`` its keyword arguments) cut into ``jobs`` key ranges,
    run side by side, the slices' reports summed."""
    tasks, owners = [], []
    with connections[options["using"]].cursor() as cursor:
        for kind, keys in kinds.items():
            for within in bounds(cursor, kind.table.db_table, kind.table.pk, jobs):
                tasks.append((kind.mark_target, _sweeper(graph, kind, keys, options, within)))
                owners.append(kind)
    swept = {kind: item_sweep.SweepReport(kind.mark_target) for kind in kinds}
    parts = Slices(jobs, progress, options["using"]).run(tasks)
    for kind, part in zip(owners, parts, strict=True):
        whole = swept[kind]
        whole.checked += part.checked
        whole.differed += part.differed
        whole.held += part.held
        for key, amount in part.credits.items():
            whole.credits[key] += amount
    return swept


def _sweeper(graph: Graph, kind, keys, options: dict, within):
    def run(progress):
        return item_sweep.sweep_keys(graph, kind, keys, progress=progress, within=within, **options)

    return run


def recount_models(graph: Graph, labels, options: dict, claim_all, progress, jobs: int) -> list:
    """``counts.operate.target_pass.recount_model`` of every row of ``labels``, each model cut
    into ``jobs`` key ranges run side by side; a ``ModelReport`` per slice, in order.
    ``options``: ``dry_run``, ``chunk``, ``using``, ``expect_drift``; ``claim_all``: the labels
    whose every row is claimed."""
    tasks = []
    with connections[options["using"]].cursor() as cursor:
        for label in labels:
            table = graph.targets[label]
            for within in bounds(cursor, table.db_table, table.pk, jobs):
                report = target_pass.ModelReport(label)
                tasks.append(
                    (label, _recounter(graph, report, options, label in claim_all, within))
                )
    return Slices(jobs, progress, options["using"]).run(tasks)


def _recounter(graph: Graph, report, options: dict, lock_all: bool, within):
    def run(progress):
        target_pass.recount_model(
            graph,
            report,
            options["dry_run"],
            options["chunk"],
            progress,
            options["using"],
            lock_all,
            expect_drift=options["expect_drift"],
            within=within,
        )
        return report

    return run
