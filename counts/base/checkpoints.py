"""Named checkpoints: the steps where tests, and checks from outside, pause, fail or kill the
engine, without patching private functions that the next rename breaks.

The engine calls :func:`reach` at each step listed in :data:`NAMES`. Unused, that is one
truth test of an empty dict. A test installs an action in-process::

    with checkpoints.at("bulk.between_transactions", checkpoints.fail):
        counts.reconcile()

or, across processes, names actions in the environment of a ``manage.py`` it starts::

    COUNTS_CHECKPOINTS="bulk.between_transactions@3=kill"       # SIGKILL at the 3rd time
    COUNTS_CHECKPOINTS="drain.before_commit=fail"               # raise CheckpointFailure
    COUNTS_CHECKPOINTS="bulk.before_model=pause:/tmp/gate"      # wait, see :func:`pause_at`

The names are a stable interface (``docs/engine.md`` lists them); a step that moves keeps its
name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

#: Every checkpoint the engine reaches, and where.
NAMES = {
    "drain.taken": "a drain took its marks and locked their items",
    "drain.before_targets": "a drain computed its credits, before writing any target row",
    "drain.before_commit": "a drain wrote everything, before its commit",
    "sweep.marks_read": "a bulk item pass read a chunk's waiting marks, before comparing its items",
    "sweep.locked": "a bulk item pass locked a chunk's ledger rows, before reading their truth",
    "recount.before_formula": "target rows are locked, before the recount's formula runs",
    "bulk.before_model": "a reconcile, rebuild or backfill starts a model or an item kind",
    "bulk.between_transactions": "a bulk pass committed a chunk, before its next transaction",
    "backfill.next_target": "a migration's backfill took its leases, before its next target",
}

Action = Callable[[str, dict], None]

#: ``{name: action}``: empty unless a test or the environment installed one.
_actions: dict[str, Action] = {}


class CheckpointFailure(RuntimeError):
    """Raised by the ``fail`` action: the step fails as a database error would."""


def reach(name: str, **info) -> None:
    """Run the action installed at ``name``, if any (``info`` tells it where it stands)."""
    if _actions:
        action = _actions.get(name)
        if action is not None:
            action(name, info)


def fail(name: str, info: dict) -> None:
    raise CheckpointFailure(f"checkpoint {name} failed on purpose ({info})")


def kill(name: str, info: dict) -> None:
    """Die at once, as SIGKILL or an OOM kill would: no cleanup, no rollback sent."""
    os.kill(os.getpid(), signal.SIGKILL)


def pause_at(gate: str | Path, timeout: float = 120.0) -> Action:
    """An action that writes ``<gate>.reached`` and waits until ``<gate>`` exists (another
    process creates it to let this one go on), then removes it."""
    gate = Path(gate)

    def pause(name: str, info: dict) -> None:
        Path(f"{gate}.reached").write_text(name)
        deadline = time.monotonic() + timeout
        while not gate.exists():
            if time.monotonic() > deadline:
                raise CheckpointFailure(f"checkpoint {name}: nobody opened {gate}")
            time.sleep(0.01)
        gate.unlink(missing_ok=True)

    return pause


def nth(n: int, action: Action) -> Action:
    """``action`` on the ``n``-th time the checkpoint is reached (1 = the first)."""
    seen = [0]

    def on_nth(name: str, info: dict) -> None:
        seen[0] += 1
        if seen[0] == n:
            action(name, info)

    return on_nth


@contextlib.contextmanager
def at(name: str, action: Action) -> Iterator[None]:
    """Install ``action`` at ``name`` for the block."""
    if name not in NAMES:
        raise KeyError(f"unknown checkpoint {name!r}; known: {', '.join(sorted(NAMES))}")
    previous = _actions.get(name)
    _actions[name] = action
    try:
        yield
    finally:
        if previous is None:
            _actions.pop(name, None)
        else:
            _actions[name] = previous


def _parse(spec: str) -> dict[str, Action]:
    """``name[@n]=kill|fail|pause:<path>``, comma-separated."""
    found: dict[str, Action] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        where, _, what = item.partition("=")
        name, _, count = where.partition("@")
        if name not in NAMES:
            raise KeyError(f"COUNTS_CHECKPOINTS: unknown checkpoint {name!r}")
        if what == "kill":
            action: Action = kill
        elif what == "fail":
            action = fail
        elif what.startswith("pause:"):
            action = pause_at(what.removeprefix("pause:"))
        else:
            raise ValueError(f"COUNTS_CHECKPOINTS: {item!r}: actions are kill, fail, pause:<path>")
        found[name] = nth(int(count), action) if count else action
    return found


_actions.update(_parse(os.environ.get("COUNTS_CHECKPOINTS", "")))
