"""Changing the engine's tables in a migration without queueing the application behind a reader.

``SyncCountTriggers`` (``counts.operations``) hands its difference of triggers here, and
``LockedSQL`` its statements on the engine's own tables. Every table the step changes is
locked first, all locks within one ``lock_timeout`` budget
(``COUNTS_TRIGGER_LOCK_TIMEOUT_MS``); a lock not granted in time rolls the whole step back
(never a mix of old and new triggers) and it is tried again after a jittered backoff, naming
the sessions that held the tables. Inside an atomic migration it is tried once.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import DatabaseError, transaction

from counts.base.errors import MigrationError, first_line
from counts.base.names import q
from counts.compile.compiled import ACCESS_EXCLUSIVE, SHARE_ROW_EXCLUSIVE, CompiledTrigger

logger = logging.getLogger(__name__)


#: Milliseconds the trigger step waits, all its table locks together, before it rolls back
#: (setting ``COUNTS_TRIGGER_LOCK_TIMEOUT_MS``). While it waits for a table, later readers and
#: writers that conflict with the lock it asked for queue behind it: this bounds their wait.
TRIGGER_LOCK_TIMEOUT_MS = 2000


#: Tries before the step gives up (``COUNTS_TRIGGER_LOCK_ATTEMPTS``); one inside a transaction.
TRIGGER_LOCK_ATTEMPTS = 8


#: Pause after the first failed try (``COUNTS_TRIGGER_LOCK_BACKOFF_MS``), doubled after each
#: further one up to :data:`TRIGGER_LOCK_BACKOFF_MAX_MS`, times a random 0.5-1 (jitter).
TRIGGER_LOCK_BACKOFF_MS = 500


TRIGGER_LOCK_BACKOFF_MAX_MS = 15_000


#: Errors after which the whole step is rolled back and tried again, by SQLSTATE.
RETRIED = {"55P03": "lock timeout", "40P01": "deadlock"}


#: Granted locks (``pg_locks.mode``) that make a request for each lock we take wait.
_TABLE_LOCKS = (
    "AccessShareLock",
    "RowShareLock",
    "RowExclusiveLock",
    "ShareUpdateExclusiveLock",
    "ShareLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
)


CONFLICTS = {
    # Every mode but the two that only readers and SELECT FOR UPDATE take.
    SHARE_ROW_EXCLUSIVE: frozenset(_TABLE_LOCKS) - {"AccessShareLock", "RowShareLock"},
    ACCESS_EXCLUSIVE: frozenset(_TABLE_LOCKS),
}


_STRENGTH = {SHARE_ROW_EXCLUSIVE: 1, ACCESS_EXCLUSIVE: 2}


def _compiled(rows) -> dict[tuple[str, str], CompiledTrigger]:
    triggers = (CompiledTrigger(**row) for row in rows)
    return {(t.table, t.name): t for t in triggers}


def _setting(name: str, default: int) -> int:
    return int(getattr(settings, name, default))


@dataclass
class Plan:
    """What one step runs, and the locks it needs."""

    statements: list[str] = field(default_factory=list)
    #: ``{table: lock mode}``, the strongest any of its statements needs.
    locks: dict[str, str] = field(default_factory=dict)

    def add(self, table: str, sql: str, lock: str) -> None:
        self.statements.append(sql)
        if _STRENGTH[lock] > _STRENGTH.get(self.locks.get(table, ""), 0):
            self.locks[table] = lock

    @classmethod
    def of(cls, install, remove) -> Plan:
        """Drop what ``remove`` has and ``install`` has not, then install what changed."""
        wanted, gone = _compiled(install), _compiled(remove)
        plan = cls()
        for key, trigger in gone.items():
            if key not in wanted:
                plan.add(trigger.table, trigger.uninstall_sql, trigger.uninstall_lock)
        for key, trigger in wanted.items():
            if gone.get(key) != trigger:
                plan.add(trigger.table, trigger.install_sql, trigger.install_lock)
        return plan


class LockNotGranted(MigrationError):
    """A step could not lock its tables in time; nothing of it was applied."""


@dataclass
class _Attempt:
    """One try: the table it was waiting for when it failed (None: not waiting for a lock)."""

    waiting_for: str | None = None


def _lock_timeout(cursor, ms: int) -> None:
    cursor.execute("SELECT set_config('lock_timeout', %s, true)", [f"{max(1, ms)}ms"])


def _run(schema_editor, plan: Plan, timeout: int, attempt: _Attempt, restore: bool) -> None:
    """Lock, then install, in the transaction (or savepoint) the caller opened."""
    with schema_editor.connection.cursor() as cursor:
        if restore:  # a savepoint: leave the enclosing transaction's setting as it was
            cursor.execute("SELECT current_setting('lock_timeout')")
            (before,) = cursor.fetchone()
        # A table dropped since (with its triggers) has nothing left to drop: not locked.
        cursor.execute(
            "SELECT t FROM unnest(%s::text[]) t WHERE to_regclass(quote_ident(t)) IS NOT NULL",
            [sorted(plan.locks)],
        )
        tables = sorted(row[0] for row in cursor.fetchall())
        deadline = time.monotonic() + timeout / 1000
        for table in tables:
            # One budget for all the locks: the longest anyone queues behind this step.
            _lock_timeout(cursor, int((deadline - time.monotonic()) * 1000))
            attempt.waiting_for = table
            cursor.execute(f"LOCK TABLE {q(table)} IN {plan.locks[table]} MODE")
        attempt.waiting_for = None
        _lock_timeout(cursor, timeout)
        for sql in plan.statements:
            schema_editor.execute(sql, params=None)
        if restore:
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", [before])


def _collect(schema_editor, plan: Plan, timeout: int) -> None:
    """The statements for ``sqlmigrate``, in a transaction of their own unless in one."""
    own = not schema_editor.atomic_migration
    statements = [f"SET LOCAL lock_timeout = '{timeout}ms';"]
    statements += [f"LOCK TABLE {q(t)} IN {plan.locks[t]} MODE;" for t in sorted(plan.locks)]
    for sql in (["BEGIN;"] if own else []) + statements + plan.statements:
        schema_editor.execute(sql, params=None)
    if own:
        schema_editor.execute("COMMIT;", params=None)


def _holders(connection, plan: Plan, tables: list[str]) -> str:
    """The sessions holding a lock that conflicts with ours on ``tables``, as one phrase."""
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT DISTINCT c.relname, l.pid, l.mode, a.state,"
                " extract(epoch FROM now() - a.xact_start), left(a.query, 80)"
                " FROM pg_locks l"
                " JOIN pg_class c ON c.oid = l.relation"
                " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()"
                " AND l.database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND l.relation IN (SELECT to_regclass(quote_ident(t)) FROM unnest(%s::text[]) t)"
                " ORDER BY 1, 2",
                [tables],
            )
            rows = cursor.fetchall()
    except DatabaseError as exc:  # the warning matters more than its details
        return f"holders unknown: {first_line(exc)}"
    found = []
    for table, pid, mode, state, seconds, query in rows:
        if mode not in CONFLICTS[plan.locks[table]]:
            continue
        age = f" for {seconds:.0f} s" if seconds is not None else ""
        found.append(f"pid {pid} holds {mode} on {table}, {state or 'unknown'}{age}: {query!r}")
    return "; ".join(found) or "no holder seen any more"


def apply(schema_editor, install, remove) -> None:
    """Install ``install`` and remove what only ``remove`` has, as the module docstring says."""
    apply_plan(schema_editor, Plan.of(install, remove), "count triggers")


def apply_plan(schema_editor, plan: Plan, what: str) -> None:
    """Run ``plan`` in one transaction once its locks are granted; ``what`` names it in logs."""
    if not plan.statements:
        return
    timeout = _setting("COUNTS_TRIGGER_LOCK_TIMEOUT_MS", TRIGGER_LOCK_TIMEOUT_MS)
    if schema_editor.collect_sql:  # sqlmigrate: what would run
        _collect(schema_editor, plan, timeout)
        return
    connection = schema_editor.connection
    nested = connection.in_atomic_block or not connection.get_autocommit()
    attempts = 1 if nested else _setting("COUNTS_TRIGGER_LOCK_ATTEMPTS", TRIGGER_LOCK_ATTEMPTS)
    backoff = _setting("COUNTS_TRIGGER_LOCK_BACKOFF_MS", TRIGGER_LOCK_BACKOFF_MS)
    for number in range(1, max(1, attempts) + 1):
        attempt = _Attempt()
        try:
            with transaction.atomic(using=connection.alias):
                _run(schema_editor, plan, timeout, attempt, restore=nested)
            return
        except DatabaseError as exc:
            reason = RETRIED.get(getattr(exc.__cause__, "sqlstate", None))
            if reason is None:
                raise
            tables = [attempt.waiting_for] if attempt.waiting_for else sorted(plan.locks)
            where = ", ".join(f"{plan.locks[t]} on {t}" for t in tables)
            held = _holders(connection, plan, tables)
            if nested:
                raise LockNotGranted(
                    f"{what}: {reason} after {timeout} ms waiting for {where}"
                    f" ({held}); this step runs inside a transaction (an atomic migration),"
                    " so it was not retried and the migration is rolled back: run migrate"
                    " again once that session is done"
                ) from exc
            if number >= attempts:
                raise LockNotGranted(
                    f"{what}: {reason} waiting for {where} ({held}) on each of"
                    f" {attempts} tries of {timeout} ms; nothing was changed: run migrate"
                    " again once that session is done"
                ) from exc
            pause = min(backoff * 2 ** (number - 1), TRIGGER_LOCK_BACKOFF_MAX_MS)
            pause = pause * random.uniform(0.5, 1.0) / 1000
            logger.warning(
                "%s: %s after %d ms waiting for %s (%s); rolled back, nothing"
                " changed; try %d of %d in %.1f s",
                what,
                reason,
                timeout,
                where,
                held,
                number + 1,
                attempts,
                pause,
            )
            time.sleep(pause)
