"""Django's ``migrate``, with one line instead of a traceback when PostgreSQL does not answer.

A deploy script that runs ``migrate`` against a database that is down (not started yet, a
wrong ``DATABASE_URL``, a failover in progress) got some 80 lines of traceback whose last line
was the reason; operators read logs from the bottom of a scroll-back. ``counts status``,
``reconcile`` and ``rebuild`` already say one line naming the database. Any other failure,
or a database that answers and refuses, keeps Django's traceback.
"""

from django.core.management.commands.migrate import Command as DjangoMigrate

from counts.operate.status import unreachable_in_one_line


class Command(DjangoMigrate):
    def execute(self, *args, **options):
        with unreachable_in_one_line(options.get("database") or "default"):
            return super().execute(*args, **options)
