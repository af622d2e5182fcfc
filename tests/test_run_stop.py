"""``make run`` stops: Ctrl-C (SIGINT) or SIGTERM to scripts/run.sh ends the web server, the
django-q2 cluster and the live inventory (``vmbackup_events``), every process of each, within
a bounded time — it used to hang."""

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import alive, descendants, free_port

BASE = Path(__file__).resolve().parent.parent
BOUND = 30  # seconds; run.sh SIGKILLs what is left after VMBACKUP_STOP_TIMEOUT (20)


def login_page(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=5) as response:
            return response.status
    except OSError:
        return 0


@pytest.fixture
def started(tmp_path):
    """scripts/run.sh on a free port with its own data dir and libvirt's test driver."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMBACKUP_", "DATABASE_URL"))}
    env.update(
        VMBACKUP_DATA_DIR=str(tmp_path / "data"),
        VMBACKUP_ROOT=str(tmp_path / "root"),
        VMBACKUP_LIBVIRT_URI="test:///default",
        VMBACKUP_ALLOW_TEST_URI="true",
        Q_WORKERS="2",
    )
    env.pop("REDIS_URL", None)
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        ["scripts/run.sh", f"127.0.0.1:{port}"],
        cwd=BASE,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 120
        # both up: the web answers, and the cluster has its workers (and its stop handler)
        while login_page(port) != 200 or "running." not in (tmp_path / "run.log").read_text():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()
            time.sleep(0.5)
        yield proc, port, tmp_path / "run.log"
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "how",
    [
        pytest.param(lambda proc: os.killpg(proc.pid, signal.SIGINT), id="ctrl-c"),
        pytest.param(lambda proc: proc.send_signal(signal.SIGTERM), id="sigterm"),
    ],
)
def test_it_stops_the_web_server_and_the_cluster_within_a_bound(started, how):
    proc, port, log = started
    processes = descendants(proc.pid)
    commands = {Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ") for p in processes}
    assert any(b"qcluster" in c for c in commands) and any(b"runserver" in c for c in commands)
    assert any(b"vmbackup_events" in c for c in commands)

    begin = time.monotonic()
    how(proc)
    proc.wait(timeout=BOUND)
    while any(alive(p) for p in processes) and time.monotonic() - begin < BOUND:
        time.sleep(0.2)

    left = sorted(p for p in processes if alive(p))
    assert left == [], log.read_text()
    assert time.monotonic() - begin < BOUND
    assert proc.returncode in (130, 143)
    assert login_page(port) == 0
    assert log.read_text().count("stopping the cluster (") == 1  # one stop, not two
