"""What ``counts status`` and the admin show operators: backlog and trigger health."""

from __future__ import annotations

from django.db import connection

from counts.apps import graph
from counts.marks import pending_summary
from counts.signals import status_extras
from counts.triggers import compile_triggers


def trigger_states() -> list[dict]:
    """INSTALLED, OUTDATED (hash differs) or MISSING for every compiled trigger."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, t.tgname, obj_description(t.oid, 'pg_trigger')"
            " FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " WHERE t.tgname LIKE 'counts\\_%%' AND NOT t.tgisinternal"
        )
        installed = {(table, name): comment for table, name, comment in cursor.fetchall()}
    rows = []
    for trigger in compile_triggers(graph()):
        comment = installed.get((trigger.table, trigger.name))
        if comment is None:
            state = "MISSING"
        elif comment != trigger.hash:
            state = "OUTDATED"
        else:
            state = "INSTALLED"
        rows.append({"table": trigger.table, "name": trigger.name, "state": state})
    return rows


def status() -> dict:
    report = {
        "pending": [p.__dict__ for p in pending_summary()],
        "triggers": trigger_states(),
        "queues": None,
    }
    for _receiver, extra in status_extras.send(sender=None):
        if extra:
            report.update(extra)
    return report
