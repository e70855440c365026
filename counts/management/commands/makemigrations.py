"""Django's ``makemigrations``, followed by the count-trigger migration when one is due.

So that adding a cached count stays one declaration plus ``manage.py makemigrations``: the
schema migration adds the column, this adds the triggers and the backfill.
"""

from django.core.management.commands.makemigrations import Command as DjangoMakemigrations

from counts.migrations_writer import pending_migration, write


class Command(DjangoMakemigrations):
    def handle(self, *app_labels, **options):
        super().handle(*app_labels, **options)
        pending = pending_migration()
        if pending is None:
            return
        app_label, migration = pending
        if options.get("check_changes") or options.get("dry_run"):
            self.stdout.write(f"Count triggers out of date: {app_label}.{migration.name} needed")
            if options.get("check_changes"):
                raise SystemExit(1)
            return
        path = write(app_label, migration)
        self.stdout.write(f"Count triggers: wrote {path}")
