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

from django.db import connections, transaction
from django.db.migrations.operations.base import Operation

from counts.apps import graph
from counts.errors import MigrationError
from counts.fields import FRESHNESS_FIELD
from counts.triggers import CompiledTrigger

logger = logging.getLogger(__name__)


def _compiled(rows) -> dict[tuple[str, str], CompiledTrigger]:
    triggers = (CompiledTrigger(**row) for row in rows)
    return {(t.table, t.name): t for t in triggers}


class SyncCountTriggers(Operation):
    """Install ``triggers`` and drop what ``previous`` has and ``triggers`` has not.

    Args:
        triggers: Compiled triggers (``CompiledTrigger.as_dict``) added or changed here.
        previous: What they replace: the old version of each changed or removed trigger.
            Reversing installs these again and drops the triggers this operation added.
        counts: ``{count key: declaration fingerprint}`` of the counts this migration starts
            serving or serves differently (``None``: a count that went away); the writer
            replays them to tell which counts need a backfill.
    """

    reversible = True
    reduces_to_sql = True
    atomic = True

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
        wanted, gone = _compiled(install), _compiled(remove)
        with transaction.atomic(using=schema_editor.connection.alias):
            for key, trigger in gone.items():
                if key not in wanted:
                    schema_editor.execute(trigger.uninstall_sql, params=None)
            for key, trigger in wanted.items():
                if gone.get(key) != trigger:
                    schema_editor.execute(trigger.install_sql, params=None)

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
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

    def __init__(self, targets, chunk=1000):
        self.targets = list(targets)
        self.chunk = chunk

    def deconstruct(self):
        return self.__class__.__qualname__, [], {"targets": self.targets, "chunk": self.chunk}

    def state_forwards(self, app_label, state):
        """Data only."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        from counts.item_backfill import mark_every_item
        from counts.items import kinds_feeding
        from counts.marks import mark_all
        from counts.reconciling import reconcile

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
                # Item counts: reconcile fills their ledgers from the truth first, so the
                # recount that follows and what the ledgers say was credited agree.
                reconcile(model=label, chunk=self.chunk, using=alias)
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
