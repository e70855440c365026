"""Django's ``makemigrations``, followed by the count-trigger migrations that are due.

So that adding a cached count stays one declaration plus ``manage.py makemigrations``: the
schema migration adds the column, this adds the triggers and the backfill (one migration per
app whose triggers or counts changed; see ``counts.management.migrations_writer``).
"""

from django.core.management.commands.makemigrations import Command as DjangoMakemigrations

from counts.management.migrations_writer import mode_change_notices, pending_migrations, write


class Command(DjangoMakemigrations):
    def handle(self, *app_labels, **options):
        super().handle(*app_labels, **options)
        pending = pending_migrations(app_labels)
        if not pending:
            return
        for line in mode_change_notices(app_labels):
            self.stderr.write(self.style.WARNING(f"Count kept another way: {line}"))
        if options.get("check_changes") or options.get("dry_run"):
            for app_label, migration in pending:
                self.stdout.write(
                    f"Count triggers out of date: {app_label}.{migration.name} needed"
                )
            if options.get("check_changes"):
                raise SystemExit(1)
            return
        for app_label, migration in pending:
            self.stdout.write(f"Count triggers: wrote {write(app_label, migration)}")
