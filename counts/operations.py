"""Migration operations that install the compiled triggers and backfill counts.

Migrations store the compiled SQL itself (``CompiledTrigger.as_dict``), so a migration keeps
doing what it did when it was written, whatever the declarations say later. A
:class:`SyncCountTriggers` holds a difference: the new version of each trigger it adds or
changes, and the old version of each it changes or removes, so it applies and reverses exactly.
The first migrations written (``monitoring`` 0002 and 0003) hold complete sets on both sides,
which is the same thing with nothing left out; ``counts.migrations_writer`` replays them all to
know what is installed and writes only what changed since.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import DatabaseError, connections, transaction
from django.db.migrations.operations.base import Operation

from counts.apps import graph
from counts.checks import refuse_unsupported
from counts.errors import MigrationError, first_line
from counts.fields import FRESHNESS_FIELD
from counts.triggers import ACCESS_EXCLUSIVE, SHARE_ROW_EXCLUSIVE, CompiledTrigger, q

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
class _Plan:
    """What one application of a :class:`SyncCountTriggers` runs, and the locks it needs."""

    statements: list[str] = field(default_factory=list)
    #: ``{table: lock mode}``, the strongest any of its statements needs.
    locks: dict[str, str] = field(default_factory=dict)

    def add(self, table: str, sql: str, lock: str) -> None:
        self.statements.append(sql)
        if _STRENGTH[lock] > _STRENGTH.get(self.locks.get(table, ""), 0):
            self.locks[table] = lock

    @classmethod
    def of(cls, install, remove) -> _Plan:
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
    """The trigger step could not lock its tables in time; nothing of it was applied."""


@dataclass
class _Attempt:
    """One try: the table it was waiting for when it failed (None: not waiting for a lock)."""

    waiting_for: str | None = None


class SyncCountTriggers(Operation):
    """Install ``triggers`` and drop what ``previous`` has and ``triggers`` has not.

    Args:
        triggers: Compiled triggers (``CompiledTrigger.as_dict``) added or changed here.
        previous: What they replace: the old version of each changed or removed trigger.
            Reversing installs these again and drops the triggers this operation added.
        counts: ``{count key: declaration fingerprint}`` of the counts this migration starts
            serving or serves differently (``None``: a count that went away); the writer
            replays them to tell which counts need a backfill.

    **All or nothing, never a queue.** The step is one transaction: either every trigger of it
    is in place or none changed, never a mix of old and new. It first locks the tables it
    changes, in name order (two deploys racing serialize instead of deadlocking), each in the
    mode its statements need: ``SHARE ROW EXCLUSIVE`` where triggers are installed or
    replaced (``CREATE OR REPLACE TRIGGER``; it blocks writers for the few milliseconds the
    step takes, never readers) and ``ACCESS EXCLUSIVE`` where one is dropped (``DROP
    TRIGGER`` needs it). A lock request waits for every conflicting holder and makes every
    later conflicting request wait behind it, so behind one long transaction on a table the
    application would queue behind the migration: the step waits at most
    ``COUNTS_TRIGGER_LOCK_TIMEOUT_MS`` (:data:`TRIGGER_LOCK_TIMEOUT_MS`) for all its locks
    together (``lock_timeout``), then rolls back, logs a warning naming the table and the
    sessions holding it, pauses (:data:`TRIGGER_LOCK_BACKOFF_MS`, doubling) and tries again,
    ``COUNTS_TRIGGER_LOCK_ATTEMPTS`` times in all before it raises :class:`LockNotGranted`.

    Inside a transaction already (a migration with ``atomic = True``, whose schema editor holds
    one, or a test's), the step runs in a savepoint and tries once: a retry would keep that
    transaction's earlier locks while it pauses, which is the queue this avoids. A lock not
    granted in time rolls the savepoint back and raises :class:`LockNotGranted`, which rolls
    the whole migration back; run ``migrate`` again (migrations ``counts makemigrations``
    writes are ``atomic = False``, where the step retries by itself).

    **Idempotent.** Installing replaces (``CREATE OR REPLACE``), dropping skips what is gone
    (``IF EXISTS``): ``migrate`` run again after a later operation of the same non-atomic
    migration failed (a backfill) applies this step again and goes on.
    """

    reversible = True
    reduces_to_sql = True
    #: Not wrapped by Django in a non-atomic migration: the step runs its own transaction, so it
    #: can roll back and retry (see above).
    atomic = False

    def __init__(self, triggers, previous=(), counts=None):
        self.triggers = list(triggers)
        self.previous = list(previous)
        #: Fingerprints of the count declarations changed here, to spot new ones.
        self.counts = dict(counts or {})

    def deconstruct(self):
        kwargs = {"triggers": self.triggers, "counts": self.counts}
        if self.previous:
            kwargs["previous"] = self.previous
        return self.__class__.__qualname__, [], kwargs

    def state_forwards(self, app_label, state):
        """Triggers live in the database only; model state is unchanged."""

    @staticmethod
    def _apply(schema_editor, install, remove) -> None:
        plan = _Plan.of(install, remove)
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
                        f"count triggers: {reason} after {timeout} ms waiting for {where}"
                        f" ({held}); this step runs inside a transaction (an atomic migration),"
                        " so it was not retried and the migration is rolled back: run migrate"
                        " again once that session is done"
                    ) from exc
                if number >= attempts:
                    raise LockNotGranted(
                        f"count triggers: {reason} waiting for {where} ({held}) on each of"
                        f" {attempts} tries of {timeout} ms; nothing was changed: run migrate"
                        " again once that session is done"
                    ) from exc
                pause = min(backoff * 2 ** (number - 1), TRIGGER_LOCK_BACKOFF_MAX_MS)
                pause = pause * random.uniform(0.5, 1.0) / 1000
                logger.warning(
                    "count triggers: %s after %d ms waiting for %s (%s); rolled back, nothing"
                    " changed; try %d of %d in %.1f s",
                    reason,
                    timeout,
                    where,
                    held,
                    number + 1,
                    attempts,
                    pause,
                )
                time.sleep(pause)

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        # ``migrate --skip-checks`` must not install triggers for a declaration the checks
        # refuse (they would break the application's own writes): refused here too.
        refuse_unsupported()
        self._apply(schema_editor, self.triggers, self.previous)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        self._apply(schema_editor, self.previous, self.triggers)

    def describe(self):
        dropped = {(r["table"], r["name"]) for r in self.previous} - {
            (r["table"], r["name"]) for r in self.triggers
        }
        return f"Install {len(self.triggers)} cached-count triggers, drop {len(dropped)}"

    @property
    def migration_name_fragment(self):
        return "count_triggers"


def _lock_timeout(cursor, ms: int) -> None:
    cursor.execute("SELECT set_config('lock_timeout', %s, true)", [f"{max(1, ms)}ms"])


def _run(schema_editor, plan: _Plan, timeout: int, attempt: _Attempt, restore: bool) -> None:
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


def _collect(schema_editor, plan: _Plan, timeout: int) -> None:
    """The statements for ``sqlmigrate``, in a transaction of their own unless in one."""
    own = not schema_editor.atomic_migration
    statements = [f"SET LOCAL lock_timeout = '{timeout}ms';"]
    statements += [f"LOCK TABLE {q(t)} IN {plan.locks[t]} MODE;" for t in sorted(plan.locks)]
    for sql in (["BEGIN;"] if own else []) + statements + plan.statements:
        schema_editor.execute(sql, params=None)
    if own:
        schema_editor.execute("COMMIT;", params=None)


def _holders(connection, plan: _Plan, tables: list[str]) -> str:
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


def _columns(state) -> dict[str, set[str]]:
    """Columns of every table in a migration state (auto-created M2M tables included)."""
    return {
        model._meta.db_table: {f.column for f in model._meta.local_concrete_fields}
        for model in state.apps.get_models(include_auto_created=True)
    }


def computable(label: str, state) -> bool:
    """Whether today's declarations of ``label`` can be computed on the schema of ``state``.

    A database that skips releases migrates through several count-adding migrations in one
    go; an earlier migration's backfill runs while columns that today's declarations write
    (a later count) or read (a later filter) do not exist yet. Only when every column the
    counts of ``label`` write and read is there can they be computed now.
    """
    if state is None:
        return True
    columns = _columns(state)
    for spec in graph().specs_for(label):
        needed = {spec.target.db_table: {spec.column, FRESHNESS_FIELD}}
        for chain, read in spec.reads.items():
            table = chain[-1].child if chain else spec.target
            needed.setdefault(table.db_table, set()).update(read)
        for table, wanted in needed.items():
            if not wanted <= columns.get(table, set()):
                return False
    return True


class BackfillCounts(Operation):
    """Recompute the named targets' counts for every existing row, chunk by chunk.

    Put it in a migration with ``atomic = False``: each chunk commits on its own, so a
    900k-image capture set never sits in one giant transaction.

    It computes with the engine as deployed, which may be newer than this migration. When the
    schema at this point lacks a column today's counts of a target write or read (a later
    migration adds it), the target gets an "every row" mark instead: the later migration's
    backfill, or the workers, recompute it once the column exists. Replaying any sequence of
    count-adding migrations on a database holding data therefore succeeds and ends exact.
    """

    reversible = True
    reduces_to_sql = False
    atomic = False

    def __init__(self, targets, chunk=1000, counts=None):
        self.targets = list(targets)
        self.chunk = chunk
        #: Count keys (``label.name``) to backfill; None (migrations written before it was
        #: recorded): every count of the targets.
        self.counts = None if counts is None else list(counts)

    def deconstruct(self):
        kwargs = {"targets": self.targets, "chunk": self.chunk}
        if self.counts is not None:
            kwargs["counts"] = self.counts
        return self.__class__.__qualname__, [], kwargs

    def state_forwards(self, app_label, state):
        """Data only."""

    def names(self, label: str) -> list[str] | None:
        if self.counts is None:
            return None
        return [key.rsplit(".", 1)[1] for key in self.counts if key.rsplit(".", 1)[0] == label]

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        from counts.backfill import backfill  # the app graph is read at run time
        from counts.item_backfill import mark_every_item
        from counts.items import kinds_feeding
        from counts.marks import mark_all
        from counts.progress import backfill_progress

        alias = schema_editor.connection.alias
        if connections[alias].in_atomic_block:
            raise MigrationError(
                "BackfillCounts must run in a migration with atomic = False"
                f" ({app_label}: it commits chunk by chunk)"
            )
        for label in self.targets:
            if label not in graph().targets:
                continue  # the count was removed later: nothing to fill
            if computable(label, to_state):
                with backfill_progress(label, using=alias) as progress:
                    backfill(
                        label, self.names(label), chunk=self.chunk, using=alias, progress=progress
                    )
            else:
                mark_all(label, using=alias)
                with connections[alias].cursor() as cursor:
                    for kind in kinds_feeding(graph(), label):
                        mark_every_item(cursor, kind)
                logger.warning(
                    "%s: counts not backfilled here (a later migration changes their columns);"
                    " every row is marked for recompute",
                    label,
                )

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        """Nothing to undo: the columns go with the schema migration that added them."""

    def describe(self):
        return f"Backfill cached counts of {', '.join(self.targets)}"
