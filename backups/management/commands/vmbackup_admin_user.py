"""The first admin user: its password is shown once, when it is made, and kept in a file
only root can read (``<data dir>/admin_password``); ``--reset`` sets and shows a new one.

Printing it on every start (as ``make run`` used to) put it in every log and terminal
scrollback; a file written and then chmod-ed was readable in between.
"""

import os
import pwd
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError


def write_password(path, password: str) -> None:
    """A new file, 0600 from its creation (O_EXCL: nothing planted there is followed or
    reused); a reset replaces the old file by rename."""
    tmp = path.with_name(f".{path.name}.new")
    if os.path.lexists(tmp):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(fd, 0o600)
        handle.write(password + "\n")
    os.replace(tmp, path)


class Command(BaseCommand):
    help = "Create the first admin user (once) and print its password; --reset sets a new one."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument("--reset", action="store_true", help="set a new password and print it")

    def handle(self, *args, username="admin", reset=False, **options):
        users = get_user_model()
        password_file = settings.DATA_DIR / "admin_password"
        user = users.objects.filter(username=username).first()
        if user is not None and not reset:
            self.stdout.write(
                f"Admin {username!r} exists; its password was shown when it was created. "
                f"Forgotten? manage.py vmbackup_admin_user --reset"
            )
            return
        if user is None and reset:
            raise CommandError(f"no user {username!r}; run without --reset to create it")
        password = secrets.token_urlsafe(12)
        if user is None:
            users.objects.create_superuser(username, "", password)
        else:
            user.set_password(password)
            user.save(update_fields=["password"])
        write_password(password_file, password)
        self.stdout.write(
            f"Log in as {username!r} with the password {password} "
            f"(shown once; also in {password_file}, readable only by its owner, "
            f"{_owner(password_file)})"
        )


def _owner(path) -> str:
    """Who can read the password file: root under `make run`, the service user under the
    systemd units."""
    uid = os.stat(path).st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
