"""Write the migrations that bring installed triggers in line with the declarations.

Called by ``manage.py makemigrations`` (which the counts app extends) and by
``manage.py counts makemigrations``. The steps:

1. **Replay.** Every :class:`SyncCountTriggers` in the migration graph, in graph order, is
   applied to an empty set (:func:`installed_after`): the result is what a database migrated to
   the newest migrations has installed, trigger by trigger, with the app whose migration
   installed it, plus the fingerprint of every count those migrations backfilled. Old operations
   that hold a complete set replay like any other: their ``previous`` names what they removed.
2. **Compare** with the triggers compiled from today's declarations.
3. **Write one migration per app that changed**, holding only the difference: the new versions
   of added or changed triggers, the old versions of changed or removed ones (so it reverses
   exactly), the fingerprints that changed, and a chunked backfill of the app's new counts.

Ownership: a trigger belongs to the app of the table it is on (a through table to the app of
its M2M field's model); a count and its backfill to the app of its target. So an app with
counts gets its own trigger migrations, and installing or removing it never touches another
app's. A trigger on app A's table can serve counts of app B (B counts rows of A): when B adds
such a count, A's trigger SQL changes and the writer writes a migration in A (depending on B's
newest migration, where B's column is added), then B's migration with the backfill (depending
on A's new migration, so the triggers feeding B's count are live before it is backfilled).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field

from django.apps import apps
from django.db import migrations
from django.db.migrations.autodetector import MigrationAutodetector
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.writer import MigrationWriter

from counts.base.sql_text import pieces
from counts.compile.triggers import compile_triggers
from counts.declare.graph import app_graph
from counts.declare.modes import FULL, ITEM, OWN_ROW
from counts.declare.refusals import refuse_unsupported
from counts.operations import BackfillCounts, SyncCountTriggers

Key = tuple[str, str]  # (table, trigger name)
MODES = (OWN_ROW, ITEM, FULL)


def describe(mode) -> str:
    """How a count is kept, as ``counts status`` says it."""
    if mode.mode == ITEM:
        return f"{ITEM} ({mode.kind.label})"
    if mode.mode == FULL:
        return f"{FULL} ({mode.why})"
    return mode.mode


def fingerprint(spec, mode: str) -> str:
    """A short hash of a count's declaration and of how it is kept (``mode``): a changed one
    needs a backfill (a count that becomes incremental needs its ledgers filled)."""
    declared = (spec.path, spec.filter.deconstruct() if spec.filter else None, spec.distinct)
    kept = (mode,) if mode != FULL else ()
    return hashlib.sha1(repr(declared + kept).encode()).hexdigest()[:12]


def fingerprints() -> dict[str, str]:
    """Each count's :func:`fingerprint` as declared and kept today."""
    return {spec.key: fingerprint(spec, spec.mode.mode) for spec in app_graph().specs}


def mode_change_notices(app_labels=()) -> list[str]:
    """:func:`mode_changes` of the migration graph on disk, for the apps ``app_labels`` (all
    when empty)."""
    lines = mode_changes(installed_after(MigrationLoader(None, ignore_no_migrations=True)))
    return [line for line in lines if not app_labels or line.split(".")[0] in app_labels]


def mode_changes(installed: Installed) -> list[str]:
    """One line for each count whose declaration is unchanged but which the next trigger
    migration keeps another way (another count's declaration, or a new engine version, moved
    it): its backfill rewrites the column, which nobody asked for, so makemigrations says so."""
    lines = []
    for spec in app_graph().specs:
        was, now = installed.counts.get(spec.key), spec.mode.mode
        if was is None or was == fingerprint(spec, now):
            continue
        for mode in MODES:
            if mode != now and was == fingerprint(spec, mode):
                lines.append(
                    f"{spec.key} was kept as {mode} and will be kept as {describe(spec.mode)},"
                    " though its declaration did not change; the migration recomputes it"
                    " (see `manage.py counts status`)"
                )
    return lines


def _key(row: dict) -> Key:
    return (row["table"], row["name"])


def trigger_operations(loader: MigrationLoader):
    """``(app_label, operation)`` for every trigger sync in the graph, in a valid apply order."""
    seen = set()
    for leaf in sorted(loader.graph.leaf_nodes()):
        for node in loader.graph.forwards_plan(leaf):
            if node in seen:
                continue
            seen.add(node)
            for op in loader.graph.nodes[node].operations:
                if isinstance(op, SyncCountTriggers):
                    yield node[0], op


@dataclass
class Installed:
    """What the migrations leave installed: triggers (with their owning app) and fingerprints."""

    triggers: dict[Key, tuple[str, dict]] = field(default_factory=dict)
    counts: dict[str, str] = field(default_factory=dict)

    def apply(self, app_label: str, op: SyncCountTriggers) -> None:
        """Replay one operation exactly as ``SyncCountTriggers.database_forwards`` applies it."""
        new = {_key(row): row for row in op.triggers}
        for row in op.previous:
            if _key(row) not in new:
                self.triggers.pop(_key(row), None)
        for key, row in new.items():
            self.triggers[key] = (app_label, row)
        for name, fingerprint in op.counts.items():
            if fingerprint is None:
                self.counts.pop(name, None)
            else:
                self.counts[name] = fingerprint


def installed_after(loader: MigrationLoader) -> Installed:
    """Replay every trigger migration in the graph."""
    state = Installed()
    for app_label, op in trigger_operations(loader):
        state.apply(app_label, op)
    return state


def table_apps() -> dict[str, str]:
    """App label of every table Django knows, auto-created M2M through tables included."""
    return {m._meta.db_table: m._meta.app_label for m in apps.get_models(include_auto_created=True)}


@dataclass
class Change:
    """What one app's next trigger migration holds."""

    triggers: list[dict] = field(default_factory=list)
    previous: list[dict] = field(default_factory=list)
    counts: dict[str, str | None] = field(default_factory=dict)
    reads: set[str] = field(default_factory=set)  # apps whose tables its triggers read or mark

    @property
    def backfill(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k, fp in self.counts.items() if fp is not None})

    @property
    def backfilled_counts(self) -> list[str]:
        """The count keys (``label.name``) this migration starts serving or serves differently:
        only their entries are backfilled."""
        return sorted(k for k, fp in self.counts.items() if fp is not None)


def changes(installed: Installed) -> dict[str, Change]:
    """Per app, the difference between what is installed and what the declarations need."""
    owner = table_apps()
    wanted = {(t.table, t.name): t.as_dict() for t in compile_triggers(app_graph())}
    found: dict[str, Change] = {}
    for key, row in wanted.items():
        was = installed.triggers.get(key)
        if was is not None and was[1] == row:
            continue
        change = found.setdefault(owner.get(row["table"], was[0] if was else ""), Change())
        change.triggers.append(row)
        if was is not None:
            change.previous.append(was[1])
        for route in app_graph().routes.get(row["table"], ()):
            labels = [route.target.label] + [h.child.label for h in route.chain]
            change.reads.update(label.split(".")[0] for label in labels)
    for key, (app_label, row) in installed.triggers.items():
        if key not in wanted:
            found.setdefault(owner.get(row["table"], app_label), Change()).previous.append(row)
    prints = fingerprints()
    for name in sorted(set(prints) | set(installed.counts)):
        if prints.get(name) != installed.counts.get(name):
            found.setdefault(name.split(".")[0], Change()).counts[name] = prints.get(name)
    return found


def _next_name(loader: MigrationLoader, app_label: str) -> tuple[str, tuple | None]:
    leaves = loader.graph.leaf_nodes(app_label)
    leaf = max(leaves) if leaves else None
    number = (MigrationAutodetector.parse_number(leaf[1]) or 0) + 1 if leaf else 1
    return f"{number:04d}_count_triggers", leaf


def pending_migrations(app_labels=()) -> list[tuple[str, migrations.Migration]]:
    """``[(app_label, migration)]`` needed to sync triggers, in the order to write them.

    Apps whose migration backfills come last, each depending on the others written now: a
    count is backfilled only once every trigger that marks it is installed. ``app_labels``
    (``makemigrations monitoring``) limits them to those apps.
    """
    refuse_unsupported()  # even under --skip-checks: no trigger for a refused declaration
    loader = MigrationLoader(None, ignore_no_migrations=True)
    found = changes(installed_after(loader))
    if app_labels:
        found = {app: change for app, change in found.items() if app in app_labels}
    order = sorted(found, key=lambda app: (bool(found[app].backfill), app))
    written: list[tuple[str, str]] = []
    result = []
    for app_label in order:
        change = found[app_label]
        name, leaf = _next_name(loader, app_label)
        dependencies = set(loader.graph.leaf_nodes("counts")[:1])
        for other in change.reads:
            dependencies.update(loader.graph.leaf_nodes(other)[:1])
        if change.backfill:
            dependencies.update(written)
        dependencies = {d for d in dependencies if d[0] != app_label} | ({leaf} if leaf else set())
        operations = [
            SyncCountTriggers(
                triggers=change.triggers, previous=change.previous, counts=change.counts
            )
        ]
        if change.backfill:
            operations.append(
                BackfillCounts(targets=change.backfill, counts=change.backfilled_counts)
            )
        migration = type(
            "Migration",
            (migrations.Migration,),
            {"operations": operations, "dependencies": sorted(dependencies)},
        )(name, app_label)
        result.append((app_label, migration))
        written.append((app_label, name))
    return result


@contextlib.contextmanager
def _sql_placeholders(migration):
    """While the migration is written, each trigger's SQL is a unique token, which
    :func:`write` then replaces by the SQL cut into clauses (``counts.base.sql_text``): a
    reviewer's diff of the next migration shows the clauses that changed, not one 20 KB line.
    Yields ``{token: sql}``; the operations get their SQL back afterwards."""
    found: dict[str, str] = {}
    saved = []
    for op in migration.operations:
        if not isinstance(op, SyncCountTriggers):
            continue
        saved.append((op, op.triggers, op.previous))
        op.triggers, op.previous = _tokens(op.triggers, found), _tokens(op.previous, found)
    try:
        yield found
    finally:
        for op, triggers, previous in saved:
            op.triggers, op.previous = triggers, previous


def _tokens(triggers: list, found: dict[str, str]) -> list:
    out = []
    for trigger in triggers:
        if isinstance(trigger, dict) and "sql" in trigger:
            token = f"@@counts-sql-{len(found)}@@"
            found[token] = trigger["sql"]
            trigger = {**trigger, "sql": token}
        out.append(trigger)
    return out


def write(app_label: str, migration) -> str:
    """Write the migration file, ``atomic = False``: the backfill commits chunk by chunk, and
    the trigger step runs in a transaction of its own, which it can roll back and retry when a
    long transaction holds one of its tables (``SyncCountTriggers``)."""
    writer = MigrationWriter(migration)
    with _sql_placeholders(migration) as sql:
        text = writer.as_string()
    for token, statement in sql.items():
        # One literal per clause, joined back by Python into exactly the compiled text.
        lines = "".join(f"\n                    {p!r}" for p in pieces(statement))
        text = text.replace(repr(token), f"({lines}\n                )", 1)
    text = text.replace(
        "class Migration(migrations.Migration):\n",
        "class Migration(migrations.Migration):\n    atomic = False\n",
        1,
    )
    path = writer.path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    return path


__all__ = ["installed_after", "mode_change_notices", "mode_changes", "pending_migrations", "write"]
