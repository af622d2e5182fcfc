import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the first admin user (once) and print how to log in."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")

    def handle(self, *args, username="admin", **options):
        users = get_user_model()
        password_file = settings.DATA_DIR / "admin_password"
        if not users.objects.filter(username=username).exists():
            password = secrets.token_urlsafe(12)
            users.objects.create_superuser(username, "", password)
            password_file.write_text(password + "\n")
            password_file.chmod(0o600)
        if password_file.exists():
            self.stdout.write(
                f"Log in as {username!r} with the password in {password_file} "
                f"({password_file.read_text().strip()})"
            )
        else:
            self.stdout.write(f"User {username!r} exists; its password was set elsewhere.")
