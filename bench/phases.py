"""Where a bulk pass of the engine spends its time, read from its checkpoints and progress.

``counts.reconcile()``, ``counts.rebuild()`` and ``counts.operate.backfill.backfill()`` call their
``progress`` callback after every chunk's commit, and reach named checkpoints (a stable
interface, ``counts.base.checkpoints.NAMES``) where a phase starts (``bulk.before_model``: an item
kind's sweep or a model's recount) and, inside each chunk, once its rows are locked
(``sweep.locked``, ``recount.before_formula``). Stamping each with ``time.perf_counter()``
splits a pass, untouched, into:

- per phase (item kind or target model): its seconds and chunks, split into **lock** (chunk
  start → rows locked: the bound or id query, for items the candidates and the comparing read
  that picks those to lock, then the claim with its inserts of empty ledgers) and **work**
  (rows locked → commit: the truth read again, the ledger writes, the credits, the recount;
  for a backfill also its lease renewal, made in its progress callback);
- **between** phases: what runs after one phase's last commit and before the next phase starts
  (after an item kind: its distinct counts' multiplicity audit; after the last phase: the
  rebuild's deletion of covered marks, the backfill's end of lease).

An item chunk that locks nothing (a dry pass; a repair of a chunk found exact) has no
lock/work split. Stamping costs a clock read and a list append per event: nothing next to a
chunk's statements.
"""

from __future__ import annotations

import contextlib
import time

from counts.base import checkpoints

_LOCKED = ("sweep.locked", "recount.before_formula")


class Phases:
    """Collects stamped events during a pass; :meth:`summary` turns them into seconds."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str | None]] = []
        self.started = self.ended = 0.0

    def _stamp(self, name: str, info: dict) -> None:
        self.events.append((time.perf_counter(), name, info.get("label") or info.get("kind")))

    def progress(self, label: str, rows: int) -> None:
        self.events.append((time.perf_counter(), "progress", label))

    @contextlib.contextmanager
    def watching(self):
        """Stamp the pass run in this block (pass :meth:`progress` as its progress callback)."""
        with contextlib.ExitStack() as stack:
            for name in ("bulk.before_model", *_LOCKED):
                stack.enter_context(checkpoints.at(name, self._stamp))
            self.started = time.perf_counter()
            try:
                yield self
            finally:
                self.ended = time.perf_counter()

    def summary(self) -> dict:
        """``{"phases": {name: {seconds, chunks, lock_s, work_s}}, "between": {after name:
        seconds}, "before_s": seconds before the first phase}``."""
        phases: dict[str, dict] = {}
        between: dict[str, float] = {}
        current: str | None = None
        chunk_start = locked = None
        last_progress = None
        first = None
        for at, name, label in self.events:
            if name == "bulk.before_model":
                if current is not None and last_progress is not None:
                    between[current] = between.get(current, 0.0) + at - last_progress
                if first is None:
                    first = at
                current = label
                empty = {"seconds": 0.0, "chunks": 0, "lock_s": 0.0, "work_s": 0.0}
                phases.setdefault(label, empty)
                chunk_start, locked, last_progress = at, None, None
            elif name in _LOCKED and current is not None:
                locked = at
            elif name == "progress" and current is not None and chunk_start is not None:
                phase = phases[current]
                phase["seconds"] += at - chunk_start
                phase["chunks"] += 1
                if locked is not None:
                    phase["lock_s"] += locked - chunk_start
                    phase["work_s"] += at - locked
                chunk_start, locked, last_progress = at, None, at
        if current is not None and last_progress is not None:
            between[current] = between.get(current, 0.0) + self.ended - last_progress
        return {
            "before_s": round((first or self.ended) - self.started, 3),
            "phases": {
                k: {f: round(v, 3) if isinstance(v, float) else v for f, v in p.items()}
                for k, p in phases.items()
            },
            "between_s": {k: round(v, 3) for k, v in between.items()},
        }
