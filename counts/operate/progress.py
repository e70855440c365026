"""Progress of the bulk passes: ``counts reconcile``, ``counts rebuild``, migration backfills.

The passes call ``progress(label, rows so far)`` after each chunk (``counts.reconcile``), the
label a target model (``monitoring.event``) or an item kind whose ledgers are being filled
(``item:monitoring.sourceimage``). A label that differs from the previous call's starts a new
phase and finishes the previous one. :class:`Progress` shows them:

- on a terminal, a tqdm bar per phase with rows, rate and time left, over the phase's total
  when one is known (``counts.target_rows``); a phase without one gets a bar without a total
  (rows and rate);
- elsewhere (a pipe, a log), no bar and no carriage return: one line per phase when it
  finishes, ``<phase>: <rows> rows in <s> s (<rate> rows/s)``.

It never writes to stdout unless given stdout: reports (``--json``) stay parseable. Use it as
a context manager, or call :meth:`Progress.close`: the last phase finishes there.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from tqdm import tqdm

from counts.base.mark import ITEM_PREFIX
from counts.operate.reconciling import target_rows

Totals = Mapping[str, int] | Callable[[], Mapping[str, int]] | None


def phase_name(label: str) -> str:
    """What a phase is called on screen: a model's label, or the item kind's ledger pass."""
    if label.startswith(ITEM_PREFIX):
        return f"{label[len(ITEM_PREFIX) :]} items (ledgers)"
    return label


class Progress:
    """A ``progress(label, rows so far)`` callback: bars on a terminal, lines elsewhere.

    Args:
        stream: Where it writes (the command's stderr).
        totals: ``{label: rows}``, or a function returning it (called once, when the first bar
            starts: a pipe never pays for the counts). Labels it lacks get a bar without total.
        bar: Bars or lines; by default bars exactly when ``stream`` is a terminal.
        overlap: Phases run side by side (``counts reconcile --jobs``): a new label opens a
            bar of its own beside the others, and a phase ends when the pass says so
            (:meth:`finish`) or at :meth:`close`, not when another label reports.
    """

    def __init__(
        self, stream: TextIO, totals: Totals = None, bar: bool | None = None, overlap=False
    ) -> None:
        self.stream = stream
        self.bars = _isatty(stream) if bar is None else bar
        self.overlap = overlap
        self._totals = totals
        #: ``{label: [rows, started, bar]}`` of the phases under way, in the order they began.
        self._open: dict[str, list] = {}
        #: When the last phase ended (or this began): one after another, a phase's time runs
        #: from there, what ran between two phases (an audit) going to the next one.
        self._since = time.monotonic()
        #: No line for a phase that found no rows (a fresh database's migrations backfill
        #: every count once: a line each would bury what ``migrate`` says).
        self.skip_empty = False
        #: ``(phase, rows, seconds)`` of every finished phase, in order.
        self.finished: list[tuple[str, int, float]] = []

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        # A pass that failed leaves its phases unfinished: no line says they were done.
        self.close(report=kind is None)

    def __call__(self, label: str, rows: int) -> None:
        if label not in self._open:
            if not self.overlap:
                self.close()
            self._start(label)
        phase = self._open[label]
        phase[0] = rows
        bar = phase[2]
        if bar is not None:
            if bar.total is not None and rows > bar.total:
                bar.total = rows  # rows added since the total was counted
            bar.update(rows - bar.n)

    def close(self, report: bool = True) -> None:
        """Finish every phase under way (its line, or its bar closed; no line unless
        ``report``)."""
        for label in list(self._open):
            self.finish(label, report)

    def total(self, label: str) -> int | None:
        if callable(self._totals):
            self._totals = self._totals()
        return (self._totals or {}).get(label)

    def _start(self, label: str) -> None:
        bar = None
        if self.bars:
            bar = tqdm(
                total=self.total(label),
                desc=phase_name(label),
                unit="rows",
                file=self.stream,
                leave=True,
                position=len(self._open) if self.overlap else None,
            )
        # Side by side, a phase starts when it first reports (the pass reports each slice's
        # start with 0 rows).
        self._open[label] = [0, time.monotonic() if self.overlap else self._since, bar]

    def finish(self, label: str, report: bool = True) -> None:
        """Finish the phase ``label``: its bar closed, or (``report``) its line written."""
        if label not in self._open:
            return
        rows, since, bar = self._open.pop(label)
        self._since = time.monotonic()
        seconds, phase = self._since - since, phase_name(label)
        self.finished.append((phase, rows, seconds))
        if bar is not None:
            bar.close()
        elif report and (rows or not self.skip_empty):
            rate = rows / max(seconds, 1e-9)
            self.stream.write(f"{phase}: {rows} rows in {seconds:.1f} s ({rate:.0f} rows/s)\n")
            self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def command_progress(stream: TextIO, models=None, jobs: int = 1) -> Progress:
    """Progress for ``counts reconcile|rebuild`` on the command's stderr; bars over the row
    counts of ``models`` (every target when None), several at once with several ``jobs``."""

    def totals():
        return target_rows(models)

    return Progress(stream, totals, overlap=jobs > 1)


def backfill_progress(models=None, stream: TextIO | None = None, using: str = "default"):
    """Progress for a migration's backfill (``BackfillCounts``), on stderr.

    ``migrate`` on a terminal gets bars; a deploy's log gets a line per model. Use it as a
    context manager around the pass::

        with backfill_progress(label, using=alias) as progress:
            reconcile(model=label, chunk=chunk, progress=progress, using=alias)
    """

    def totals():
        return target_rows(models, using=using)

    progress = Progress(sys.stderr if stream is None else stream, totals)
    progress.skip_empty = True
    return progress


__all__ = ["Progress", "backfill_progress", "command_progress", "phase_name"]
