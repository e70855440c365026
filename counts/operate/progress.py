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
    """

    def __init__(self, stream: TextIO, totals: Totals = None, bar: bool | None = None) -> None:
        self.stream = stream
        self.bars = _isatty(stream) if bar is None else bar
        self._totals = totals
        self._label: str | None = None
        self._rows = 0
        self._since = time.monotonic()
        self._bar = None
        #: No line for a phase that found no rows (a fresh database's migrations backfill
        #: every count once: a line each would bury what ``migrate`` says).
        self.skip_empty = False
        #: ``(phase, rows, seconds)`` of every finished phase, in order.
        self.finished: list[tuple[str, int, float]] = []

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, label: str, rows: int) -> None:
        if label != self._label:
            self._finish()
            self._start(label)
        self._rows = rows
        if self._bar is not None:
            if self._bar.total is not None and rows > self._bar.total:
                self._bar.total = rows  # rows added since the total was counted
            self._bar.update(rows - self._bar.n)

    def close(self) -> None:
        """Finish the current phase (its line, or its bar closed)."""
        self._finish()

    def total(self, label: str) -> int | None:
        if callable(self._totals):
            self._totals = self._totals()
        return (self._totals or {}).get(label)

    def _start(self, label: str) -> None:
        self._label, self._rows = label, 0
        if self.bars:
            self._bar = tqdm(
                total=self.total(label),
                desc=phase_name(label),
                unit="rows",
                file=self.stream,
                leave=True,
            )

    def _finish(self) -> None:
        if self._label is None:
            return
        now = time.monotonic()
        seconds, phase = now - self._since, phase_name(self._label)
        self.finished.append((phase, self._rows, seconds))
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._rows or not self.skip_empty:
            rate = self._rows / max(seconds, 1e-9)
            self.stream.write(
                f"{phase}: {self._rows} rows in {seconds:.1f} s ({rate:.0f} rows/s)\n"
            )
            self.stream.flush()
        self._label, self._since = None, now


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def command_progress(stream: TextIO, models=None) -> Progress:
    """Progress for ``counts reconcile|rebuild`` on the command's stderr; bars over the row
    counts of ``models`` (every target when None)."""

    def totals():
        return target_rows(models)

    return Progress(stream, totals)


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
