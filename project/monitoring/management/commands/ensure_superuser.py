"""Create (or keep) a superuser for local use; never touches an existing user's password."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create a local superuser if it does not exist yet."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument("--password", default="admin")
        parser.add_argument("--email", default="admin@example.org")

    def handle(self, *args, username, password, email, **options):
        User = get_user_model()
        if User.objects.filter(username=username).exists():
            self.stdout.write(f"superuser {username!r} already exists")
            return
        User.objects.create_superuser(username=username, email=email, password=password)
        self.stdout.write(f"created superuser {username!r}")
