"""Write the migration that brings installed triggers in line with the declarations.

Called by ``manage.py makemigrations`` (which the counts app extends) and by
``manage.py counts makemigrations``. It reads the newest :class:`SyncCountTriggers` in the
migration graph, compiles the triggers the declarations need now, and when they differ writes a
migration holding both sets, plus a chunked backfill of any count that is new or redefined.
"""

from __future__ import annotations

import hashlib
import os

from django.db import migrations
from django.db.migrations.autodetector import MigrationAutodetector
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.writer import MigrationWriter

from counts.apps import graph
from counts.operations import BackfillCounts, SyncCountTriggers
from counts.triggers import compile_triggers


def fingerprints() -> dict[str, str]:
    """A short hash of each count's declaration; a changed one needs a backfill."""
    return {
        spec.key: hashlib.sha1(
            repr(
                (spec.path, spec.filter.deconstruct() if spec.filter else None, spec.distinct)
            ).encode()
        ).hexdigest()[:12]
        for spec in graph().specs
    }


def _latest_sync(loader: MigrationLoader) -> SyncCountTriggers | None:
    latest = None
    seen = set()
    for leaf in sorted(loader.graph.leaf_nodes()):
        for key in loader.graph.forwards_plan(leaf):
            if key in seen:
                continue
            seen.add(key)
            for op in loader.graph.nodes[key].operations:
                if isinstance(op, SyncCountTriggers):
                    latest = op
    return latest


def pending_migration():
    """``(app_label, migration)`` needed to sync triggers, or None when they are in sync."""
    loader = MigrationLoader(None, ignore_no_migrations=True)
    latest = _latest_sync(loader)
    wanted = [t.as_dict() for t in compile_triggers(graph())]
    prints = fingerprints()
    before = latest.triggers if latest else []
    before_prints = latest.counts if latest else {}
    if wanted == before and prints == before_prints:
        return None
    changed_targets = sorted(
        {key.rsplit(".", 1)[0] for key, fp in prints.items() if before_prints.get(key) != fp}
    )
    app_label = sorted(graph().targets)[0].split(".")[0]
    involved = {app_label, "counts"}
    for routes in graph().routes.values():
        for route in routes:
            involved.add(route.table.label.split(".")[0])
    dependencies = []
    for label in sorted(involved):
        leaves = loader.graph.leaf_nodes(label)
        if leaves:
            dependencies.append(leaves[0])
    operations = [SyncCountTriggers(triggers=wanted, previous=before, counts=prints)]
    if changed_targets:
        operations.append(BackfillCounts(targets=changed_targets))
    leaf = loader.graph.leaf_nodes(app_label)
    number = (MigrationAutodetector.parse_number(leaf[0][1]) or 0) + 1 if leaf else 1
    name = f"{number:04d}_count_triggers"
    migration = type(
        "Migration",
        (migrations.Migration,),
        {"operations": operations, "dependencies": dependencies},
    )(name, app_label)
    return app_label, migration


def write(app_label: str, migration) -> str:
    """Write the migration file (non-atomic: the backfill commits chunk by chunk)."""
    writer = MigrationWriter(migration)
    text = writer.as_string().replace(
        "class Migration(migrations.Migration):\n",
        "class Migration(migrations.Migration):\n    atomic = False\n",
        1,
    )
    path = writer.path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    return path


__all__ = ["pending_migration", "write"]
