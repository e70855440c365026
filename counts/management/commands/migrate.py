"""Django's ``migrate``, with one line instead of a traceback when PostgreSQL does not answer.

A deploy script that runs ``migrate`` against a database that is down (not started yet, a
wrong ``DATABASE_URL``, a failover in progress) got some 80 lines of traceback whose last line
was the reason; operators read logs from the bottom of a scroll-back. ``counts status``,
``reconcile`` and ``rebuild`` already say one line naming the database. Any other failure,
or a database that answers and refuses, keeps Django's traceback.
"""

from django.core.management.base import CommandError
from django.core.management.commands.migrate import Command as DjangoMigrate
from django.db import InterfaceError, OperationalError, connections

from counts.status import database_unreachable


class Command(DjangoMigrate):
    def execute(self, *args, **options):
        try:
            return super().execute(*args, **options)
        except (OperationalError, InterfaceError) as exc:
            if connections[options.get("database") or "default"].is_usable():
                raise
            raise CommandError(database_unreachable(exc)) from exc
