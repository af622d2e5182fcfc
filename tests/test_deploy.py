"""scripts/install.sh into temporary directories: the units it writes point at what it
installed, a second run changes nothing, and the web unit's command, started by hand exactly
as systemd starts it (its user, its environment file, its working directory), serves the
login page as an unprivileged user with a venv that user can execute.

The unprivileged user is ``nobody`` (--no-user): it exists everywhere, so a killed test run
leaves no system user behind.
"""

import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import free_port

BASE = Path(__file__).resolve().parent.parent
USER = "nobody"
UNITS = (
    "vmbackup-web.service",
    "vmbackup-worker.service",
    "vmbackup-worker@.service",
    "vmbackup-events.service",
    "vmbackup-events@.service",
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="install.sh runs as root"),
    pytest.mark.skipif(not shutil.which("rsync"), reason="install.sh copies with rsync"),
]


def unit(path: Path) -> dict[str, list[str]]:
    """A unit file's settings: name -> every value given (in order)."""
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile as systemd reads it (comments and blanks skipped)."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            env[key] = value
    return env


def snapshot(*dirs: Path) -> dict[str, tuple]:
    """Mode, owner, size and mtime of everything under ``dirs`` (the database excepted:
    its content is rows, compared by the commands' own idempotency)."""
    found = {}
    for top in dirs:
        for path in [top, *top.rglob("*")]:
            if "__pycache__" in path.parts or ".sqlite3" in path.name:
                continue
            st = path.lstat()
            times = () if path.is_dir() else (st.st_size, st.st_mtime_ns)
            found[str(path)] = (st.st_mode, st.st_uid, st.st_gid, *times)
    return found


def install(tmp: Path) -> subprocess.CompletedProcess:
    argv = [
        str(BASE / "scripts/install.sh"),
        *("--prefix", str(tmp / "opt/vmbackup")),
        *("--unit-dir", str(tmp / "systemd")),
        *("--conf-dir", str(tmp / "etc/vmbackup")),
        *("--data-dir", str(tmp / "lib/vmbackup")),
        *("--user", USER, "--no-user", "--no-systemd"),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def installed():
    """Installed twice into a temporary tree the unprivileged user can traverse."""
    tmp = Path(tempfile.mkdtemp(prefix="vmbt-deploy-", dir="/tmp"))
    tmp.chmod(0o755)
    try:
        first = install(tmp)
        dirs = [tmp / "opt/vmbackup", tmp / "systemd", tmp / "etc/vmbackup", tmp / "lib/vmbackup"]
        before = snapshot(*dirs)
        second = install(tmp)
        yield {"tmp": tmp, "first": first, "second": second, "same": before == snapshot(*dirs)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_it_writes_units_whose_commands_and_files_exist(installed):
    tmp = installed["tmp"]
    web = unit(tmp / "systemd/vmbackup-web.service")
    assert web["User"] == [USER] and web["Group"] == ["nogroup"]
    for name in UNITS:
        values = unit(tmp / "systemd" / name)
        assert values["KillMode"] == ["mixed"] and values["KillSignal"] == ["SIGTERM"]
        assert int(values["TimeoutStopSec"][0]) > 0
        assert Path(values["EnvironmentFile"][0]) == tmp / "etc/vmbackup/vmbackup.env"
        assert Path(values["WorkingDirectory"][0]) == tmp / "opt/vmbackup"
        for command in values["ExecStart"] + values.get("ExecStartPre", []):
            program, *args = shlex.split(command.lstrip("-+!"))
            assert os.access(program, os.X_OK), command
            configs = [a for a in args if a.endswith(".py") and "/" in a]
            assert all(Path(a).is_file() for a in configs), command
    for name in ("vmbackup-worker.service", "vmbackup-worker@.service"):
        worker = unit(tmp / "systemd" / name)
        assert worker["User"] == ["root"]
        assert "manage.py vmbackup_reconcile" in worker["ExecStartPre"][0]
        assert worker["ExecStart"][0].endswith("manage.py qcluster")
    assert unit(tmp / "systemd/vmbackup-worker@.service")["Environment"] == ["Q_CLUSTER_NAME=%i"]
    for name in ("vmbackup-events.service", "vmbackup-events@.service"):
        events = unit(tmp / "systemd" / name)
        assert events["User"] == ["root"] and events["Restart"] == ["always"]
        assert events["TimeoutStopSec"] == ["15"]
        assert events["ExecStart"][0].endswith("manage.py vmbackup_events")
    assert unit(tmp / "systemd/vmbackup-events@.service")["Environment"] == ["Q_CLUSTER_NAME=%i"]
    # the venv is made from a Python every user may run, not one under /root
    venv_python = (tmp / "opt/vmbackup/.venv/bin/python").resolve()
    assert not str(venv_python).startswith("/root")
    assert "not enabled" in installed["first"].stdout


def test_it_keeps_data_and_secrets_private_to_the_web_user(installed):
    tmp = installed["tmp"]
    nobody = pwd.getpwnam(USER)
    data = (tmp / "lib/vmbackup").stat()
    assert (data.st_uid, data.st_mode & 0o777) == (nobody.pw_uid, 0o700)
    database = (tmp / "lib/vmbackup/vmbackup.sqlite3").stat()
    assert (database.st_uid, database.st_mode & 0o777) == (nobody.pw_uid, 0o600)
    for secret in ("etc/vmbackup/vmbackup.env", "etc/vmbackup/secret_key"):
        st = (tmp / secret).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, nobody.pw_gid, 0o640)
    code = (tmp / "opt/vmbackup/manage.py").stat()
    assert code.st_uid == 0 and not code.st_mode & 0o022  # the web user cannot change it


def test_it_changes_nothing_on_a_second_run(installed):
    assert installed["same"]
    said = [line for line in installed["second"].stdout.splitlines() if line.strip()]
    assert not [line for line in said if any(w in line for w in ("copied", "wrote", "Apply"))]


@pytest.mark.timeout(120)
def test_it_serves_the_login_page_with_the_web_units_own_command(installed):
    tmp = installed["tmp"]
    web = unit(tmp / "systemd/vmbackup-web.service")
    env_path = Path(web["EnvironmentFile"][0])
    port = free_port()
    text = env_path.read_text()
    env_path.write_text(
        text.replace("VMBACKUP_BIND=127.0.0.1:8000", f"VMBACKUP_BIND=127.0.0.1:{port}")
    )
    user = pwd.getpwnam(web["User"][0])
    env = {  # what systemd gives a service with User=, plus its EnvironmentFile
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin",
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "HOME": user.pw_dir,
        "SHELL": user.pw_shell,
        **env_file(env_path),
    }
    log = tmp / "web.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            shlex.split(web["ExecStart"][0]),
            cwd=web["WorkingDirectory"][0],
            env=env,
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            umask=0o077,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        status, deadline = 0, time.monotonic() + 60
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/login/",
            headers={"X-Forwarded-Proto": "https"},  # as the nginx example sets it
        )
        while status != 200 and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    status, body = response.status, response.read()
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        assert status == 200, log.read_text()
        assert b"csrfmiddlewaretoken" in body
        uid_line = Path(f"/proc/{proc.pid}/status").read_text().split("Uid:")[1].split()
        assert int(uid_line[0]) == user.pw_uid != 0
    finally:
        proc.send_signal(signal.SIGTERM)  # KillMode=mixed: the main process only
        proc.wait(timeout=30)
        env_path.write_text(text)


STUB = """#!/bin/sh
# systemctl as the upgrade sees it: a web, a worker and the live inventory running; each
# call is logged with which tree was in place at that moment
tree=$(grep -q 'upgraded tree' "{prefix}/README.md" && echo new || echo old)
echo "$* tree=$tree" >> "{log}"
case "$1" in
  list-units)
    echo "vmbackup-worker.service loaded active running vmbackup worker"
    echo "vmbackup-events.service loaded active running vmbackup live inventory" ;;
  is-active) echo active ;;
esac
"""


@pytest.mark.timeout(300)
def test_it_upgrades_in_order_stopping_workers_then_web_and_starting_them_back(installed):
    tmp = installed["tmp"]
    source = tmp / "src"
    excludes = ["--exclude=/.git", "--exclude=/.venv", "--exclude=/var/", "--exclude=__pycache__"]
    subprocess.run(["rsync", "-a", *excludes, f"{BASE}/", f"{source}/"], check=True, timeout=60)
    with (source / "README.md").open("a") as readme:
        readme.write("\nupgraded tree\n")
    log = tmp / "systemctl.log"
    stub = tmp / "systemctl"
    stub.write_text(STUB.format(prefix=tmp / "opt/vmbackup", log=log))
    stub.chmod(0o755)

    argv = [
        str(source / "scripts/install.sh"),
        *("--prefix", str(tmp / "opt/vmbackup")),
        *("--unit-dir", str(tmp / "systemd")),
        *("--conf-dir", str(tmp / "etc/vmbackup")),
        *("--data-dir", str(tmp / "lib/vmbackup")),
        *("--user", USER, "--no-user", "--systemctl", str(stub)),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr

    calls = [line.split(" tree=") for line in log.read_text().splitlines()]
    acting = [(call, tree) for call, tree in calls if call.startswith(("stop", "start"))]
    assert acting == [
        ("stop vmbackup-worker.service vmbackup-events.service", "old"),
        ("stop vmbackup-web.service", "old"),
        ("start vmbackup-web.service", "new"),
        ("start vmbackup-worker.service vmbackup-events.service", "new"),
    ]
    assert "upgraded tree" in (tmp / "opt/vmbackup/README.md").read_text()

    log.unlink()
    again = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    assert not [c for c in calls if c.startswith(("stop", "start", "enable"))]  # nothing to do
