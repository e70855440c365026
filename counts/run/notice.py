"""After-commit notice: "this transaction may have left marks for these targets".

Triggers write the marks; this module only tells the rest of the system, once per transaction
and after it commits, which target models to look at. ``workers`` subscribes to
:data:`marks_committed` and turns it into a debounced message; the engine knows no queue.

It works by an execute wrapper on every database connection (``execute`` and ``executemany``
alike): after a statement that writes a watched table, the transaction gets one ``on_commit``
notice (found again and widened on later writes, dropped by Django with the transaction on
rollback). The notice names only the targets whose routes need that operation on that table, the
same rule the triggers are compiled from, so inserting a project announces nothing.

Which tables and operations a statement writes is read from its text by
``counts.run.statements``.
"""

from __future__ import annotations

import logging

from django.db import connections
from django.db.backends.signals import connection_created
from django.dispatch import Signal

from counts.base.names import OPERATIONS
from counts.run.statements import ANY_TABLE, statement_writes

logger = logging.getLogger(__name__)

#: Sent after a transaction that wrote watched tables commits; kwargs ``targets`` (frozenset of
#: model labels) and ``using`` (database alias).
marks_committed = Signal()

#: No targets.
_NOTHING: frozenset[str] = frozenset()
#: Connection attribute set while the engine writes cached columns itself.
QUIET_ATTR = "_counts_quiet"


class _Notice:
    """The on_commit callback of one transaction; collects targets until it runs."""

    def __init__(self, targets: frozenset[str], using: str) -> None:
        self.targets = set(targets)
        self.using = using
        self.__qualname__ = "counts.run.notice.notice"  # read by Django when a callback fails

    def __call__(self) -> None:
        marks_committed.send(sender=_Notice, targets=frozenset(self.targets), using=self.using)


class WriteWatcher:
    """Execute wrapper that notices writes to watched tables.

    ``labels`` maps ``(db_table, operation)`` to the target labels such a write can dirty.
    """

    def __init__(self, labels: dict[tuple[str, str], frozenset[str]]) -> None:
        self.labels = {key: targets for key, targets in labels.items() if targets}
        self.everything = frozenset().union(*self.labels.values())

    @classmethod
    def for_graph(cls, graph) -> WriteWatcher:
        """A watcher announcing exactly what the graph's triggers can mark."""
        return cls(
            {
                (table, op): graph.targets_of_operation(table, op)
                for table in graph.routes
                for op in OPERATIONS
            }
        )

    def targets_of(self, sql: str) -> frozenset[str]:
        """Targets a statement may dirty, judged from its text (cheap; never parses SQL)."""
        if not self.labels:
            return frozenset()
        found: set[str] = set()
        for key in statement_writes(sql):
            found |= self.everything if key[0] == ANY_TABLE else self.labels.get(key, _NOTHING)
        return frozenset(found)

    def __call__(self, execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        connection = context["connection"]
        if not getattr(connection, QUIET_ATTR, False):
            targets = self.targets_of(sql)
            if targets:
                notify_on_commit(connection, targets)
        return result


def notify_on_commit(connection, targets: frozenset[str]) -> None:
    """Make sure the current transaction announces ``targets`` once it commits."""
    for _sids, func, _robust in connection.run_on_commit:
        if isinstance(func, _Notice):
            func.targets |= targets
            return
    connection.on_commit(_Notice(targets, connection.alias), robust=True)


def install(graph) -> None:
    """Watch every connection, present and future, for writes to the graph's tables."""
    watcher = WriteWatcher.for_graph(graph)

    def attach(sender, connection, **kwargs):
        if not any(isinstance(w, WriteWatcher) for w in connection.execute_wrappers):
            connection.execute_wrappers.append(watcher)

    connection_created.connect(attach, weak=False, dispatch_uid="counts.run.notice.attach")
    for conn in connections.all(initialized_only=True):
        attach(None, conn)


class quiet:
    """Within this block the engine's own writes announce nothing (they mark nothing either)."""

    def __init__(self, using: str = "default") -> None:
        self.connection = connections[using]

    def __enter__(self):
        self.previous = getattr(self.connection, QUIET_ATTR, False)
        setattr(self.connection, QUIET_ATTR, True)

    def __exit__(self, *exc):
        setattr(self.connection, QUIET_ATTR, self.previous)
