"""Private by default: the data dir, the SQLite files and the admin password."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from tests.helpers import assert_private

BASE_DIR = Path(__file__).resolve().parent.parent
SHOW_MODES = """
import json, os, stat
from django.conf import settings
from django.db import connection
with connection.cursor() as cursor:  # a live connection: the WAL and shm files exist now
    cursor.execute("SELECT count(*) FROM django_migrations")
    umask = os.umask(0o077)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in settings.DATA_DIR.iterdir()}
    print(json.dumps({"umask": umask, "modes": modes}))
"""


def manage(data_dir: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "VMBACKUP_SQLITE_PATH"}}
    env |= {"VMBACKUP_DATA_DIR": str(data_dir), "DJANGO_SETTINGS_MODULE": "vmbackup_site.settings"}
    done = subprocess.run(
        [sys.executable, str(BASE_DIR / "manage.py"), *args],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_it_creates_the_data_dir_and_the_database_private(tmp_path):
    os.umask(0o022)  # what a shell usually has: manage.py must not depend on it
    data_dir = tmp_path / "data"
    manage(data_dir, "migrate", "--noinput")
    shown = json.loads(manage(data_dir, "shell", "-c", SHOW_MODES).strip().splitlines()[-1])

    assert shown["umask"] == 0o077
    assert {"vmbackup.sqlite3", "vmbackup.sqlite3-wal", "vmbackup.sqlite3-shm"} <= set(
        shown["modes"]
    )
    assert set(shown["modes"].values()) <= {0o600, 0o700}
    assert_private(data_dir)


def test_it_narrows_a_data_dir_and_database_an_earlier_version_left_open(tmp_path):
    data_dir = tmp_path / "data"
    manage(data_dir, "migrate", "--noinput")
    data_dir.chmod(0o755)
    (data_dir / "vmbackup.sqlite3").chmod(0o644)

    manage(data_dir, "check")

    assert_private(data_dir)


@pytest.fixture
def data_dir(settings, tmp_path):
    settings.DATA_DIR = tmp_path
    return tmp_path


def run_command(*args) -> str:
    from io import StringIO

    out = StringIO()
    call_command("vmbackup_admin_user", *args, stdout=out)
    return out.getvalue()


def test_it_shows_the_admin_password_once_and_keeps_it_private(db, data_dir,
                                                                django_user_model):  # fmt: skip
    first = run_command()
    password = (data_dir / "admin_password").read_text().strip()

    assert password in first
    assert "readable only by its owner, root" in first  # who can read it, not a guess
    assert (data_dir / "admin_password").stat().st_mode & 0o777 == 0o600
    assert django_user_model.objects.get(username="admin").check_password(password)
    again = run_command()
    assert password not in again and "--reset" in again


def test_reset_sets_shows_and_stores_a_new_password(db, data_dir, django_user_model):
    run_command()
    old = (data_dir / "admin_password").read_text().strip()

    out = run_command("--reset")

    new = (data_dir / "admin_password").read_text().strip()
    assert new != old and new in out
    assert django_user_model.objects.get(username="admin").check_password(new)
    assert (data_dir / "admin_password").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in data_dir.iterdir()) == ["admin_password"]


def test_reset_of_a_missing_user_is_an_error(db, data_dir):
    with pytest.raises(CommandError, match="no user 'admin'"):
        run_command("--reset")
    assert not (data_dir / "admin_password").exists()
