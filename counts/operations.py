"""Migration operations that install the compiled triggers and backfill counts.

Migrations store the compiled SQL itself (``CompiledTrigger.as_dict``), so a migration keeps
doing what it did when it was written, whatever the declarations say later. A
:class:`SyncCountTriggers` holds a difference: the new version of each trigger it adds or
changes, and the old version of each it changes or removes, so it applies and reverses exactly.
The first migrations written (``monitoring`` 0002 and 0003) hold complete sets on both sides,
which is the same thing with nothing left out; ``counts.management.migrations_writer`` replays them
all to know what is installed and writes only what changed since.
"""

from __future__ import annotations

import logging

from django.db import connections
from django.db.migrations.operations.base import Operation

from counts.base import checkpoints
from counts.base.errors import MigrationError
from counts.base.names import FRESHNESS_FIELD, q
from counts.declare.graph import app_graph
from counts.declare.kinds import kinds_feeding
from counts.declare.refusals import refuse_unsupported
from counts.operate import backfill
from counts.operate.lease import Lease
from counts.operate.progress import backfill_progress
from counts.run.item_backfill import mark_every_item
from counts.run.marks import mark_all
from counts.surfaces import trigger_install
from counts.surfaces.trigger_install import LockNotGranted

logger = logging.getLogger(__name__)


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
    ``COUNTS_TRIGGER_LOCK_TIMEOUT_MS`` for all its locks together (``lock_timeout``), then
    rolls back, logs a warning naming the table and the sessions holding it, pauses
    (``COUNTS_TRIGGER_LOCK_BACKOFF_MS``, doubling) and tries again,
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
        # The SQL is written clause by clause (``SqlText``): a diff of the next migration shows
        # which clauses changed.
        kwargs = {"triggers": self.triggers, "counts": self.counts}
        if self.previous:
            kwargs["previous"] = self.previous
        return self.__class__.__qualname__, [], kwargs

    def state_forwards(self, app_label, state):
        """Triggers live in the database only; model state is unchanged."""

    @staticmethod
    def _apply(schema_editor, install, remove) -> None:
        trigger_install.apply(schema_editor, install, remove)

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


class LockedSQL(Operation):
    """SQL that changes one of the engine's own tables, under the trigger step's lock policy.

    Every write of the application inserts a mark (``counts_dirtymark``), so a migration that
    alters that table waiting behind one long reader would queue every writer behind it. Like
    :class:`SyncCountTriggers` it locks ``table`` in ``lock`` mode first, within
    ``COUNTS_TRIGGER_LOCK_TIMEOUT_MS``, rolls back and retries after a backoff, and raises
    :class:`LockNotGranted` naming the holders when out of tries; it runs in a transaction of
    its own (the migration is ``atomic = False``) so all of ``sql`` applies or none does.
    """

    reversible = True
    reduces_to_sql = True
    atomic = False

    def __init__(self, table: str, lock: str, sql: str, reverse_sql: str) -> None:
        self.table, self.lock, self.sql, self.reverse_sql = table, lock, sql, reverse_sql

    def deconstruct(self):
        return self.__class__.__qualname__, [self.table, self.lock, self.sql, self.reverse_sql], {}

    def state_forwards(self, app_label, state):
        """The engine's tables are changed in the database only."""

    def _apply(self, schema_editor, sql: str) -> None:
        plan = trigger_install.Plan()
        plan.add(self.table, sql, self.lock)
        trigger_install.apply_plan(schema_editor, plan, f"changing {self.table}")

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        self._apply(schema_editor, self.sql)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        self._apply(schema_editor, self.reverse_sql)

    def describe(self):
        return f"Change {self.table} ({self.lock} lock, taken without queueing writers)"


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
    for spec in app_graph().specs_for(label):
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
        alias = schema_editor.connection.alias
        if connections[alias].in_atomic_block:
            raise MigrationError(
                "BackfillCounts must run in a migration with atomic = False"
                f" ({app_label}: it commits chunk by chunk)"
            )
        graph = app_graph()
        labels = [label for label in self.targets if label in graph.targets]  # not removed since
        jobs = {
            label: backfill.plan(label, self.names(label), graph)
            for label in labels
            if computable(label, to_state)
        }
        # Every target's lease before the first backfill starts: killed between two targets,
        # the later ones' new counts (zeros, no entry) would be covered by no mark, and the
        # workers alone would never fill them. Each decides under it whether it recounts.
        lease = Lease.take([c for job in jobs.values() for c in job.covers()], using=alias)
        for job in jobs.values():
            backfill.decide(job, lease, graph, alias)
        for label in labels:
            checkpoints.reach("backfill.next_target", label=label)
            if label in jobs:
                with backfill_progress(label, using=alias) as progress:
                    backfill.run(
                        jobs[label],
                        lease,
                        chunk=self.chunk,
                        using=alias,
                        graph=graph,
                        progress=progress,
                    )
            else:
                self._leave_to_workers(label, alias, to_state)
        lease.end()

    @staticmethod
    def _leave_to_workers(label: str, alias: str, to_state) -> None:
        """Mark every row of ``label``, and every item feeding it, for the workers."""
        mark_all(label, using=alias)
        # An item kind whose table a later migration creates has no item and no
        # ledger yet: that migration's backfill fills its counts.
        tables = None if to_state is None else _columns(to_state)
        with connections[alias].cursor() as cursor:
            for kind in kinds_feeding(app_graph(), label):
                if tables is None or kind.table.db_table in tables:
                    mark_every_item(cursor, kind)
        # On an empty table (a fresh install) there is nothing an operator must wait
        # for, so only a table with rows is worth a warning.
        logger.log(
            logging.WARNING if _has_rows(alias, label) else logging.INFO,
            "%s: counts not backfilled here (a later migration changes their columns);"
            " every row is marked for recompute",
            label,
        )

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        """Nothing to undo: the columns go with the schema migration that added them."""

    def describe(self):
        return f"Backfill cached counts of {', '.join(self.targets)}"


def _has_rows(alias: str, label: str) -> bool:
    table = app_graph().targets[label].db_table
    with connections[alias].cursor() as cursor:
        cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {q(table)})")
        return cursor.fetchone()[0]


__all__ = ["BackfillCounts", "LockNotGranted", "SyncCountTriggers", "computable"]
