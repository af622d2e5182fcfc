"""The worker cluster heals itself and stops within its budget (``backups.cluster``).

A real ``manage.py qcluster`` process group on the test database file, real backups of
tiny real domains. Killing idle workers (SIGKILL, as the OOM killer does) used to leave the
queue's read lock held forever; SIGTERM to the group (systemd's stop) used to hang the
main process in ``stop_event.set()``.
"""

import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection
from django.utils import timezone
from django_q.models import OrmQ

from backups import cluster, reconcile, requests
from backups.models import BackupRun, RunStatus
from tests.domains import DiskSpec
from tests.helpers import alive

BASE_DIR = Path(__file__).resolve().parent.parent
QEMU_IMG = shutil.which("qemu-img")
STOP_BUDGET = 60  # VMBACKUP_WORKER_STOP_TIMEOUT given to the cluster; the unit allows 90 s


class Qcluster:
    """One ``manage.py qcluster`` in its own process group, its log kept for messages."""

    def __init__(self, tmp_path: Path, workers: int, bin_dir: Path | None = None, **env):
        self.log_path = tmp_path / "qcluster.log"
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        full_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        full_env |= {
            "DJANGO_SETTINGS_MODULE": "vmbackup_site.settings",
            "VMBACKUP_DATA_DIR": str(data),
            "SECRET_KEY": settings.SECRET_KEY,  # django-q2 signs tasks with it
            "VMBACKUP_SQLITE_PATH": str(connection.settings_dict["NAME"]),
            "VMBACKUP_WORKER_STOP_TIMEOUT": str(STOP_BUDGET),
            "Q_WORKERS": str(workers),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        if bin_dir is not None:
            full_env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(BASE_DIR / "manage.py"), "qcluster"],
                cwd=BASE_DIR,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.findall(pattern, self.log())
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"{pattern!r} x{count} not seen in the cluster's log:\n{self.log()[-4000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            with_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def with_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def wait_for_run(run: BackupRun, statuses: set[str], timeout: float, workers: Qcluster) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        run.refresh_from_db()
        if run.status in statuses:
            return time.monotonic() - start
        time.sleep(0.5)
    pytest.fail(f"run {run.pk} still {run.status} after {timeout:.0f}s:\n{workers.log()[-4000:]}")


@pytest.fixture
def qcluster(transactional_db, tmp_path):
    call_command("createcachetable", verbosity=0)  # the cluster reports its stats there
    started = []

    def start(**kwargs) -> Qcluster:
        started.append(Qcluster(tmp_path, **kwargs))
        started[-1].wait_for(r" running\.")
        return started[-1]

    yield start
    for one in started:
        one.close()


def _hold_forever(queue) -> None:
    queue.get()  # blocks holding the read lock: the state of every idle worker


def test_it_frees_the_queue_of_a_reader_killed_while_it_waits():
    queue = cluster.RobustQueue()
    ctx = multiprocessing.get_context("fork")
    reader = ctx.Process(target=_hold_forever, args=(queue,))
    reader.start()
    time.sleep(0.5)
    os.kill(reader.pid, signal.SIGKILL)
    reader.join()

    queue.put("after")
    assert queue.get(timeout=5) == "after"


def test_a_lock_excludes_another_process_and_times_out():
    lock = cluster.DeathSafeLock()
    ctx = multiprocessing.get_context("fork")
    got = ctx.Value("i", -1)

    def try_lock():
        got.value = int(lock.acquire(timeout=0.2))

    with lock:
        other = ctx.Process(target=try_lock)
        other.start()
        other.join(10)
    assert got.value == 0
    other = ctx.Process(target=try_lock)
    other.start()
    other.join(10)
    assert got.value == 1


@pytest.mark.libvirt
@pytest.mark.slow
def test_it_runs_a_backup_after_every_idle_worker_was_killed(
    qcluster, domains, backup_root, synced, tmp_path
):
    vm = synced(domains.create([DiskSpec("vda", "qcow2", 16, [(0, 2, 0xA1)])]))
    workers = qcluster(workers=2, VMBACKUP_ROOT=str(backup_root))
    pids = [int(p) for p in workers.wait_for(r"ready for work at (\d+)", count=2)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    workers.wait_for(r"reincarnated worker \S+ after death", count=2)

    run = requests.request_backup(vm, method="offline")
    took = wait_for_run(run, {RunStatus.SUCCEEDED, RunStatus.FAILED}, 60, workers)

    assert run.status == RunStatus.SUCCEEDED, run.error
    assert took < 60, f"took {took:.0f}s"
    print(f"backup ran {took:.1f}s after it was requested")


def stalling_qemu_img(tmp_path: Path) -> tuple[Path, Path]:
    """A qemu-img whose ``convert`` (the copy of a disk) stays until killed."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "stalled.pid"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-img"
    fake.write_text(
        "#!/bin/sh\n"
        f'case "$1" in convert) echo $$ > {marker}; exec sleep 300;; esac\n'
        f'exec {QEMU_IMG} "$@"\n'
    )
    fake.chmod(0o755)
    return bin_dir, marker


@pytest.mark.libvirt
@pytest.mark.slow
def test_a_sigterm_to_the_group_ends_the_cluster_with_its_run_undone(
    qcluster, domains, backup_root, synced, tmp_path
):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 2, 0xA1)])], start=True)
    vm = synced(dom)
    bin_dir, marker = stalling_qemu_img(tmp_path)
    workers = qcluster(workers=2, bin_dir=bin_dir, VMBACKUP_ROOT=str(backup_root))
    run = requests.request_backup(vm, method="snapshot")
    deadline = time.monotonic() + 120
    while not (marker.exists() and marker.read_text().strip()):
        assert time.monotonic() < deadline, workers.log()[-4000:]
        time.sleep(0.1)
    stalled = int(marker.read_text())
    assert ".overlay." in domains.lookup(dom).XMLDesc(0)

    start = time.monotonic()
    with_group(workers.proc.pid, signal.SIGTERM)
    code = workers.proc.wait(timeout=STOP_BUDGET + 30)
    took = time.monotonic() - start

    assert code == 0, workers.log()[-4000:]
    assert took < STOP_BUDGET, f"stopped in {took:.0f}s"
    print(f"cluster stopped {took:.1f}s after SIGTERM")
    run.refresh_from_db()
    assert run.status == RunStatus.INTERRUPTED
    assert run.error == "the worker was stopped by SIGTERM"
    assert not alive(stalled)
    assert ".overlay." not in domains.lookup(dom).XMLDesc(0)
    assert not list(dom.dir.glob(".vmbackup-*"))
    assert not list(backup_root.rglob(".*.partial"))
    report = reconcile.reconcile()
    assert (report.interrupted, report.overlays, report.partials) == ([], [], [])


@pytest.mark.libvirt
@pytest.mark.slow
def test_a_run_whose_task_a_dead_cluster_took_runs_at_once(
    qcluster, domains, backup_root, synced, tmp_path
):
    """Its task stays locked in the broker for a day: the cluster's main process finds the
    run waiting and enqueues it again."""
    vm = synced(domains.create([DiskSpec("vda", "qcow2", 16, [(0, 2, 0xA1)])]))
    run = requests.request_backup(vm, method="offline")
    OrmQ.objects.update(lock=timezone.now() + timedelta(days=1))
    BackupRun.objects.filter(pk=run.pk).update(created_at=timezone.now() - timedelta(minutes=10))
    workers = qcluster(workers=1, VMBACKUP_ROOT=str(backup_root), VMBACKUP_QUEUED_ALERT_AFTER="3")

    took = wait_for_run(run, {RunStatus.SUCCEEDED, RunStatus.FAILED}, 60, workers)

    assert run.status == RunStatus.SUCCEEDED, run.error
    assert "requeued" in [e["step"] for e in run.journal]
    print(f"lost run ran {took:.1f}s after the cluster started")
