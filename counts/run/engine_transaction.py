"""The engine's transaction: the one place cached columns may be written.

Drains, "Recompute now", reconcile and backfills all write inside :func:`engine_transaction`.
Its setting (``counts.compile.guards.ENGINE_SETTING``) is what the guard triggers let through; every
other writer of a cached column is refused, so a stale ``save()`` cannot revert a count.
"""

from __future__ import annotations

import contextlib

from django.db import connections, transaction

from counts.base import prepared
from counts.base.names import ENGINE_SETTING, literal
from counts.run.notice import quiet


@contextlib.contextmanager
def engine_transaction(
    using: str = "default",
    lock_timeout_ms: int | None = None,
    lazy: bool = False,
    snapshot: bool = False,
):
    """One recompute transaction (or savepoint): yields a cursor with the engine's settings.

    The engine's setting lets this block, and nothing else, write cached columns (the guard
    triggers keep them otherwise). ``set_config(..., true)`` lasts until the end of the
    *outermost* transaction, and a savepoint's release hands it on to the caller's
    transaction; so it is switched off again before the block ends, or a caller's stale
    ``save()`` later in the same request would slip past the guards. (A rollback undoes it by
    itself.)

    JIT off: a batch's aggregate is estimated expensive enough to be compiled, and compiling it
    (about 135 ms for 500 capture sets) costs more than running it. No parallel workers, for
    the same reason: starting them cost more than they saved on every statement measured (a
    bulk pass's 5,000-capture recount: 55 ms without, 80 ms with; ten stations: 365 / 395 ms).
    The lock timeout, when given, bounds the wait for a lock that ``SKIP LOCKED`` cannot skip
    (a table lock taken by a migration or a ``LOCK TABLE``). Generic plans where allowed, for
    the hot statements run on ``cursor.prepared`` (``counts.base.prepared``: planned once).

    ``lazy``: the settings are applied by ``cursor.engine_on()``, once there is something to
    write; a drain that finds no mark then costs one query and a commit.

    ``snapshot``: one snapshot for every statement (``REPEATABLE READ``), for a reader comparing
    what several statements read (``counts.operate.item_sweep``); not for writing. Inside a
    caller's transaction the caller's isolation stays.
    """
    timeout = "0" if lock_timeout_ms is None else f"{lock_timeout_ms}ms"
    # The outermost transaction takes the settings away with its commit or rollback; a
    # savepoint hands them on to the caller's transaction, so only then are they switched off.
    nested = connections[using].in_atomic_block
    with transaction.atomic(using=using), quiet(using):
        cursor = connections[using].cursor()
        if snapshot and not nested:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        # Inside a caller's transaction, its own settings are put back at the end: a lock
        # timeout it set must outlive a "Recompute now" it ran.
        saved = _current(cursor) if nested else None
        on = []
        plans = GENERIC if prepared.generic_plans(using) else None

        def engine_on(already: bool = False) -> None:
            """Apply the settings (``already``: a statement of the caller's applied them)."""
            if not on and not already:
                cursor.execute(f"SELECT {SETTINGS_SQL}", cursor.engine_params)
            on.append(True)

        cursor.engine_on = engine_on
        cursor.engine_params = [ENGINE_SETTING, timeout, plans]
        # The hot statements' cursor: same connection, same transaction (``counts.base.prepared``),
        # made when the first of them runs.
        cursor.prepared = prepared.Hot(using)
        if not lazy:
            engine_on()
        yield cursor
        if on and nested:
            cursor.execute(f"SELECT {RESTORE_SQL}", [ENGINE_SETTING, *saved])


def _current(cursor) -> tuple:
    """The caller's values of the settings :data:`SETTINGS_SQL` changes besides the engine's."""
    cursor.execute("SELECT " + ", ".join(f"current_setting({literal(name)})" for name in _RESTORED))
    return cursor.fetchone()


#: The engine's transaction settings as one expression (parameters: the engine setting's
#: name, the lock timeout, the plan cache mode or NULL to keep the session's).
SETTINGS_SQL = (
    "concat(set_config(%s, 'on', true), set_config('jit', 'off', true),"
    " set_config('max_parallel_workers_per_gather', '0', true),"
    " set_config('lock_timeout', %s, true),"
    " set_config('plan_cache_mode', coalesce(%s, current_setting('plan_cache_mode')), true))"
)
#: The plan cache mode of an engine transaction whose hot statements are prepared
#: (``counts.base.prepared``): one plan per connection, never one per batch.
GENERIC = "force_generic_plan"
#: What a nested block puts back (parameters: the engine setting's name, then the caller's
#: values of :data:`_RESTORED`): the engine's setting off, the caller's own settings as they were.
_RESTORED = ("jit", "max_parallel_workers_per_gather", "lock_timeout", "plan_cache_mode")
RESTORE_SQL = (
    "concat(set_config(%s, 'off', true), "
    + ", ".join(f"set_config({literal(name)}, %s, true)" for name in _RESTORED)
    + ")"
)
