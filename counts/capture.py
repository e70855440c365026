"""After-commit notice: "this transaction may have left marks for these targets".

Triggers write the marks; this module only tells the rest of the system, once per transaction
and after it commits, which target models to look at. ``workers`` subscribes to
:data:`marks_committed` and turns it into a debounced message; the engine knows no queue.

It works by an execute wrapper on every database connection: after a write statement that names
a watched table, the transaction gets one ``on_commit`` notice (found again and widened on later
writes, dropped by Django with the transaction on rollback). Writes from plain ``psycopg`` or
another client are not seen here; their marks are found by the scheduler's sweep.
"""

from __future__ import annotations

import logging
import re

from django.db.backends.signals import connection_created
from django.dispatch import Signal

logger = logging.getLogger(__name__)

#: Sent after a transaction that wrote watched tables commits; kwargs ``targets`` (frozenset of
#: model labels) and ``using`` (database alias).
marks_committed = Signal()

_WRITE = re.compile(r"^\s*(?:WITH\b.*?\)\s*)?(INSERT|UPDATE|DELETE|TRUNCATE|MERGE)\b", re.I | re.S)
#: Characters of a write statement searched for watched table names.
HEAD = 4096
#: Connection attribute set while the engine writes cached columns itself.
QUIET_ATTR = "_counts_quiet"


class _Notice:
    """The on_commit callback of one transaction; collects targets until it runs."""

    def __init__(self, targets: frozenset[str], using: str) -> None:
        self.targets = set(targets)
        self.using = using
        self.__qualname__ = "counts.capture.notice"  # read by Django when a callback fails

    def __call__(self) -> None:
        marks_committed.send(sender=_Notice, targets=frozenset(self.targets), using=self.using)


class WriteWatcher:
    """Execute wrapper that notices writes to watched tables."""

    def __init__(self, table_targets: dict[str, frozenset[str]]) -> None:
        self.table_targets = table_targets
        names = sorted(table_targets, key=len, reverse=True)
        self.pattern = (
            re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else None
        )

    def targets_of(self, sql: str) -> frozenset[str]:
        """Targets a statement may dirty, judged from its text (cheap; never parses SQL)."""
        if self.pattern is None or not _WRITE.match(sql):
            return frozenset()
        found: set[str] = set()
        # The written table is named right after INSERT INTO / UPDATE / DELETE FROM: no need to
        # scan the megabyte of VALUES a bulk insert carries.
        for table in set(self.pattern.findall(sql, 0, HEAD)):
            found |= self.table_targets[table]
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
    watcher = WriteWatcher({t: graph.targets_of_table(t) for t in graph.routes})

    def attach(sender, connection, **kwargs):
        if not any(isinstance(w, WriteWatcher) for w in connection.execute_wrappers):
            connection.execute_wrappers.append(watcher)

    connection_created.connect(attach, weak=False, dispatch_uid="counts.capture.attach")
    from django.db import connections

    for conn in connections.all(initialized_only=True):
        attach(None, conn)
