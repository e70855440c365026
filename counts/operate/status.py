"""What ``counts status`` and the admin show operators: backlog and trigger health."""

from __future__ import annotations

import contextlib

from django.conf import settings
from django.core.management.base import CommandError
from django.db import InterfaceError, OperationalError, connection, connections

from counts.base.errors import first_line
from counts.base.signals import status_extras
from counts.compile.triggers import compile_triggers
from counts.declare.graph import app_graph
from counts.run.marks import pending_summary


def trigger_states() -> list[dict]:
    """INSTALLED, OUTDATED (hash differs) or MISSING for every compiled trigger, then
    UNEXPECTED for every ``counts_`` trigger installed that no declaration compiles to.

    An unexpected one is left behind by an app removed from ``INSTALLED_APPS`` without
    ``migrate <app> zero`` first (its trigger migrations are per app), or by a count removed
    without its migration: it keeps writing marks for targets the engine no longer knows.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, t.tgname, obj_description(t.oid, 'pg_trigger')"
            " FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " WHERE t.tgname LIKE 'counts\\_%%' AND NOT t.tgisinternal"
        )
        installed = {(table, name): comment for table, name, comment in cursor.fetchall()}
    rows = []
    for trigger in compile_triggers(app_graph()):
        comment = installed.pop((trigger.table, trigger.name), None)
        if comment is None:
            state = "MISSING"
        elif comment != trigger.hash:
            state = "OUTDATED"
        else:
            state = "INSTALLED"
        rows.append({"table": trigger.table, "name": trigger.name, "state": state})
    for table, name in sorted(installed):
        rows.append({"table": table, "name": name, "state": "UNEXPECTED"})
    return rows


def count_modes() -> list[dict]:
    """How each count is kept: ``own-row`` (exact deltas from the written rows), ``item``
    (credited through the ledgers of one item kind) or ``full`` (recounted, with why)."""
    rows = []
    for spec in app_graph().specs:
        mode = spec.mode
        row = {"count": spec.key, "mode": mode.mode}
        if mode.mode == "item":
            row["items"] = mode.kind.label
        if mode.mode == "full":
            row["why"] = mode.why
        rows.append(row)
    return rows


def job_indexes() -> list[dict]:
    """For each job ranged over a setting, the index its expansion walks: ``INDEXED`` (with
    its name) or ``MISSING``. Without one, a threshold change reads every item of each station
    instead of those between the old and new settings: still exact, no longer cheap."""
    rows = []
    with connection.cursor() as cursor:
        for job in app_graph().jobs:
            if job.range_index is None:
                continue
            cursor.execute(
                "SELECT i.indexrelid::regclass::text FROM pg_index i"
                " WHERE i.indrelid = %s::regclass AND i.indisvalid AND i.indnkeyatts >= 2"
                " AND i.indkey[0] = (SELECT attnum FROM pg_attribute"
                "  WHERE attrelid = i.indrelid AND attname = %s)"
                " AND i.indkey[1] = (SELECT attnum FROM pg_attribute"
                "  WHERE attrelid = i.indrelid AND attname = %s)"
                " ORDER BY 1 LIMIT 1",
                [job.item.db_table, *job.range_index],
            )
            found = cursor.fetchone()
            rows.append(
                {
                    "job": job.key,
                    "table": job.item.db_table,
                    "columns": list(job.range_index),
                    "state": "INDEXED" if found else "MISSING",
                    "index": found[0] if found else None,
                }
            )
    return rows


def database_unreachable(exc: Exception) -> str:
    """One line naming the database that did not answer, and why."""
    db = connection.settings_dict
    reason = first_line(exc)
    reason = reason.rsplit(" failed: ", 1)[-1]
    return (
        f"PostgreSQL at {db['HOST'] or 'localhost'}:{db['PORT'] or 5432}"
        f" (database {db['NAME']}) does not answer: {reason}"
    )


@contextlib.contextmanager
def unreachable_in_one_line(using: str = "default"):
    """Turn an error of a database that does not answer into a ``CommandError`` of one line
    naming it (a management command then prints that line, not 80 lines of traceback). A
    database that answers and fails keeps its traceback."""
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        if connections[using].is_usable():
            raise
        raise CommandError(database_unreachable(exc)) from exc


def stale_alert_s() -> int:
    """Seconds a due mark may wait before ``counts status`` calls its model stale."""
    return getattr(settings, "COUNTS_STALE_ALERT_S", 60)


def stale_models(pending: list[dict]) -> dict[str, float]:
    """``{label: seconds}`` of the models whose oldest due mark has waited longer than
    ``COUNTS_STALE_ALERT_S``: drains are not keeping up, or not running at all."""
    limit = stale_alert_s()
    return {
        row["label"]: row["oldest_due_seconds"]
        for row in pending
        if row["due"] and row["oldest_due_seconds"] >= limit
    }


def status() -> dict:
    """Backlog and triggers, plus the sections ``status_extras`` receivers add.

    A source that does not answer leaves its sections ``None`` and adds one line to
    ``unreachable`` (``{service: line}``), so callers can say so instead of a traceback.
    """
    report: dict = {
        "pending": None,
        "triggers": None,
        "job_indexes": None,
        "queues": None,
        "unreachable": {},
        "stale": {},
        "modes": count_modes(),
    }
    try:
        report["pending"] = [p.__dict__ for p in pending_summary()]
        report["stale"] = stale_models(report["pending"])
        report["triggers"] = trigger_states()
        report["job_indexes"] = job_indexes()
    except (OperationalError, InterfaceError) as exc:
        report["unreachable"]["PostgreSQL"] = database_unreachable(exc)
    for _receiver, extra in status_extras.send(sender=None):
        if extra:
            report["unreachable"].update(extra.pop("unreachable", {}))
            report.update(extra)
    return report
