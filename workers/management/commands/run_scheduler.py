"""``manage.py run_scheduler``: the Procfile's ``scheduler`` process."""

from django.core.management.base import BaseCommand

from workers.schedule import Scheduler


class Command(BaseCommand):
    help = "Sweep for unannounced dirty marks and reconcile cached counts periodically."

    def handle(self, *args, **options):
        try:
            Scheduler().start()
        except (KeyboardInterrupt, SystemExit):
            self.stdout.write("scheduler stopped")
