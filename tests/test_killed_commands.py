"""A command killed while its qemu-img runs leaves no qemu-img behind, and no row "running".

Real ``manage.py`` processes on the test database file, real backups of real domains, and the
real qemu-img for every call but one: the call under test is a stand-in earlier on PATH that
stays (sleeping, or blocked opening a FIFO) until it is killed. What is tested is process
clean-up, so the stand-in only has to be a child that would outlive a careless parent.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from django.db import connection

from backups import interrupt, jobs, reconcile, requests
from backups.archive import check as archive_check
from backups.models import Backup, BackupPolicy, BackupRun, PruneLock, Restore, RunStatus
from tests.domains import DiskSpec
from tests.helpers import alive, children_of, new_name, push, restore_now, wait_until

pytestmark = [pytest.mark.libvirt]
BASE_DIR = Path(__file__).resolve().parent.parent
QEMU_IMG = shutil.which("qemu-img")
GONE_WITHIN = 5  # seconds after the kill for every child to be gone
STALL_WITHIN = 60  # seconds for the command to reach the stalled qemu-img call
KEEP_ALL = {"keep_last": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}


class Command:
    """One ``manage.py`` process whose qemu-img call matching ``stall`` (a shell pattern
    against its arguments) stalls until killed."""

    def __init__(self, tmp_path: Path, args: list[str], *, stall: str, env: dict, fifo=False):
        self.tmp = tmp_path
        self.marker = tmp_path / "stalled.pid"
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        fake = bin_dir / "qemu-img"
        wait = f"exec cat {tmp_path / 'fifo'} >/dev/null" if fifo else "exec sleep 300"
        if fifo:
            os.mkfifo(tmp_path / "fifo")
        pattern = stall.replace(" ", "\\ ")  # a case pattern: spaces escaped
        fake.write_text(
            "#!/bin/sh\n"
            f'case "$*" in {pattern}) echo $$ > {self.marker}; {wait};; esac\n'
            f'exec {QEMU_IMG} "$@"\n'
        )
        fake.chmod(0o755)
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        full_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        full_env |= {
            "DJANGO_SETTINGS_MODULE": "vmbackup_site.settings",
            "VMBACKUP_DATA_DIR": str(data),
            "VMBACKUP_SQLITE_PATH": str(connection.settings_dict["NAME"]),
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.out, self.err = tmp_path / "stdout", tmp_path / "stderr"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(BASE_DIR / "manage.py"), *args],
                cwd=BASE_DIR,
                env=full_env,
                stdout=out,
                stderr=err,
                start_new_session=True,  # a signal reaches this command only, as kill(1) does
            )

    def wait_for_stall(self) -> set[int]:
        """The command's children once the stalled call runs (recorded before any kill:
        afterwards they belong to init)."""

        def stalled() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"ended before the stalled qemu-img call:\n{self.output()}")
            return self.marker.exists() and bool(self.marker.read_text().strip())

        try:
            wait_until(stalled, STALL_WITHIN, lambda: f"no stalled qemu-img call:\n{self.output()}")
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        children = children_of(self.proc.pid)
        assert int(self.marker.read_text()) in children
        return children

    def kill(self, signum: int) -> int:
        os.kill(self.proc.pid, signum)
        return self.proc.wait(timeout=60)

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def assert_all_gone(pids: set[int]) -> None:
    def left() -> list[int]:
        return [p for p in pids if alive(p)]

    wait_until(lambda: not left(), GONE_WITHIN, lambda: f"left behind by the command: {left()}")


def exit_code(signum: int) -> int:
    """TERM: the command ends itself, 128 + the signal; KILL: the kernel ended it."""
    return 128 + signum if signum != signal.SIGKILL else -signal.SIGKILL


@pytest.fixture
def backup(transactional_db, domains, backup_root, synced):
    """An offline backup of a small shut-off domain (committed: the commands read it)."""
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 2, 0xA1)])])
    vm = synced(dom)
    run = requests.request_backup(vm, method="offline", enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    return run.backup


@pytest.fixture
def env(backup_root):
    return {"VMBACKUP_ROOT": str(backup_root)}


BOTH = pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])


@BOTH
@pytest.mark.parametrize("fifo", [False, True], ids=["running", "blocked-on-fifo"])
def test_a_killed_vmbackup_verify_leaves_no_qemu_img(backup, env, tmp_path, signum, fifo):
    status = backup.verify_status
    cmd = Command(
        tmp_path, ["vmbackup_verify", str(backup.pk)], stall="check *", env=env, fifo=fifo
    )
    children = cmd.wait_for_stall()

    assert cmd.kill(signum) == exit_code(signum), cmd.output()

    assert_all_gone(children)
    backup.refresh_from_db()
    assert backup.verify_status == status  # a check cut short is no verdict
    if signum == signal.SIGTERM:
        assert "vmbackup_verify was stopped by SIGTERM" in cmd.stderr()


@BOTH
def test_a_killed_vmbackup_restore_leaves_no_qemu_img_and_an_interrupted_restore(
    backup, env, restore_root, tmp_path, signum
):
    args = ["vmbackup_restore", str(backup.pk), "--name", new_name(), "--wait"]
    env["VMBACKUP_RESTORE_ROOTS"] = str(restore_root)
    cmd = Command(tmp_path, args, stall="convert *", env=env)
    children = cmd.wait_for_stall()

    assert cmd.kill(signum) == exit_code(signum), cmd.output()

    assert_all_gone(children)
    restore = Restore.objects.get(backup=backup)
    if signum == signal.SIGTERM:  # at once, what it made removed
        assert restore.status == RunStatus.INTERRUPTED
        assert restore.error == "vmbackup_restore was stopped by SIGTERM"
        assert "vmbackup_restore was stopped by SIGTERM" in cmd.stderr()
    else:  # nothing could run: reconcile finds its worker gone
        assert restore.status == RunStatus.RUNNING
        assert restore.worker.endswith(f":{cmd.proc.pid}")
        assert restore.pk in reconcile.reconcile().restores_interrupted
        restore.refresh_from_db()
        assert restore.status == RunStatus.INTERRUPTED
    assert not list(restore_root.iterdir())


@BOTH
def test_a_killed_vmbackup_run_leaves_no_qemu_img_and_an_interrupted_run(
    backup, env, tmp_path, signum
):
    vm = backup.vm
    cmd = Command(tmp_path, ["vmbackup_run", vm.name, "--method", "offline", "--wait"],
                  stall="convert *", env=env)  # fmt: skip
    children = cmd.wait_for_stall()

    assert cmd.kill(signum) == exit_code(signum), cmd.output()

    assert_all_gone(children)
    run = BackupRun.objects.exclude(pk=backup.run_id).get(vm=vm)
    if signum == signal.SIGKILL:
        assert run.status == RunStatus.RUNNING
        assert run.pk in reconcile.reconcile().interrupted
        run.refresh_from_db()
    assert run.status == RunStatus.INTERRUPTED
    if signum == signal.SIGTERM:
        assert run.error == "vmbackup_run was stopped by SIGTERM"
    assert not list(Path(backup.path).parent.glob(".*.partial"))


@BOTH
def test_a_vmbackup_run_killed_mid_pull_ends_the_job_and_its_socket_directory(
    transactional_db, domains, backup_root, synced, env, tmp_path, signum
):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 2, 0xA1)])], start=True)
    vm = synced(dom)
    cmd = Command(tmp_path, ["vmbackup_run", vm.name, "--method", "push", "--wait"],
                  stall="convert *--image-opts*", env=env)  # fmt: skip
    children = cmd.wait_for_stall()
    run = BackupRun.objects.get(vm=vm)
    begin = next(e for e in run.journal if e["step"] == "backup-begin")
    sockets = Path(begin["socket"]).parent
    assert begin["mode"] == "pull" and sockets.is_dir()

    assert cmd.kill(signum) == exit_code(signum), cmd.output()

    assert_all_gone(children)
    if signum == signal.SIGKILL:  # the export is still up: reconcile ends it
        assert sockets.is_dir()
        assert run.pk in reconcile.reconcile().interrupted
    run.refresh_from_db()
    assert run.status == RunStatus.INTERRUPTED
    assert not sockets.exists()
    assert domains.lookup(dom).jobStats().get("type", 0) == 0
    if signum == signal.SIGTERM:  # after a KILL the next backup drops the checkpoint
        assert domains.lookup(dom).listAllCheckpoints() == []
    assert not list(backup_root.rglob(".*.partial"))


def test_a_vmbackup_run_stopped_mid_snapshot_commits_its_overlay_at_once(
    transactional_db, domains, backup_root, synced, env, tmp_path
):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 2, 0xA1)])], start=True)
    vm = synced(dom)
    cmd = Command(tmp_path, ["vmbackup_run", vm.name, "--method", "snapshot", "--wait"],
                  stall="convert *", env=env)  # fmt: skip
    children = cmd.wait_for_stall()
    assert ".overlay." in domains.lookup(dom).XMLDesc(0)

    assert cmd.kill(signal.SIGTERM) == 128 + signal.SIGTERM, cmd.output()

    assert_all_gone(children)
    run = BackupRun.objects.get(vm=vm)
    assert run.status == RunStatus.INTERRUPTED
    assert run.error == "vmbackup_run was stopped by SIGTERM"
    assert ".overlay." not in domains.lookup(dom).XMLDesc(0)  # no reconcile needed
    assert not list(dom.dir.glob(".vmbackup-*"))
    assert not list(backup_root.rglob(".*.partial"))


@pytest.fixture
def chain(transactional_db, domains, backup_root, synced):
    """A full and an incremental; the policy keeps one, so a prune folds the full away."""
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 2, 0xA1)])], start=True)
    vm = synced(dom)
    policy = BackupPolicy.objects.create(name="p", schedule="", full_every=10, **KEEP_ALL)
    policy.vms.add(vm)
    backups = [push(vm, policy).backup, push(vm, policy).backup]
    BackupPolicy.objects.filter(pk=policy.pk).update(keep_last=1)
    return vm, backups


def test_a_vmbackup_run_stopped_in_its_prune_keeps_its_backup(chain, env, tmp_path):
    """The backup is published when the run's own retention folds the chain: it stands,
    the run succeeded, and the fold cut short is finished or undone by reconcile."""
    vm, backups = chain
    cmd = Command(tmp_path, ["vmbackup_run", vm.name, "--method", "push", "--wait"],
                  stall="rebase *.fold*", env=env)  # fmt: skip
    children = cmd.wait_for_stall()

    assert cmd.kill(signal.SIGTERM) == 128 + signal.SIGTERM, cmd.output()

    assert_all_gone(children)
    run = BackupRun.objects.get(vm=vm, backup__isnull=False, pk__gt=backups[-1].run_id)
    assert run.status == RunStatus.SUCCEEDED
    assert "prune-stopped" in [entry["step"] for entry in run.journal]
    assert len(reconcile.reconcile().folds) == 1
    for backup in [*backups, run.backup]:
        assert archive_check.verify(backup.path).ok, archive_check.verify(backup.path).errors


@BOTH
def test_a_killed_vmbackup_prune_leaves_no_qemu_img_and_no_lock(chain, env, tmp_path, signum):
    vm, backups = chain
    cmd = Command(tmp_path, ["vmbackup_prune"], stall="check *", env=env)
    children = cmd.wait_for_stall()

    assert cmd.kill(signum) == exit_code(signum), cmd.output()

    assert_all_gone(children)
    if signum == signal.SIGKILL:
        reconcile.reconcile()
    assert not PruneLock.objects.exists()
    assert not Backup.objects.filter(pruned_at__isnull=False).exists()


# ------------------------------------------------------------------ a prune that skipped


def prune_command(tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env |= {
        "DJANGO_SETTINGS_MODULE": "vmbackup_site.settings",
        "VMBACKUP_DATA_DIR": str(tmp_path),
        "VMBACKUP_SQLITE_PATH": str(connection.settings_dict["NAME"]),
    }
    return subprocess.run(
        [sys.executable, str(BASE_DIR / "manage.py"), "vmbackup_prune"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def vm(transactional_db, host):
    from backups.models import VirtualMachine

    vm = VirtualMachine.objects.create(host=host, name="web1", uuid=str(uuid.uuid4()))
    BackupPolicy.objects.create(name="p", schedule="").vms.add(vm)
    return vm


def test_a_prune_that_skipped_a_vm_names_it_and_exits_3(vm, tmp_path):
    BackupRun.objects.create(vm=vm, status=RunStatus.RUNNING)

    done = prune_command(tmp_path)

    assert done.returncode == 3, done.stdout + done.stderr
    assert "web1: skipped, a backup or prune of it is running" in done.stderr


def test_a_prune_with_nothing_in_its_way_exits_0(vm, tmp_path):
    done = prune_command(tmp_path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped" not in done.stderr


def test_every_qemu_img_runs_in_the_thread_that_runs_the_job(
    db, domains, backup_root, synced, restore_root, monkeypatch
):
    """PR_SET_PDEATHSIG fires when the thread that forked ends: a qemu-img started from
    the hashing pool would be killed when the pool is shut down, or outlive the job."""
    from backups import qemu_img, verify

    threads, real = set(), qemu_img._execute

    def execute(*args, **kwargs):
        threads.add(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(qemu_img, "_execute", execute)
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 2, 0xA1)])])
    run = requests.request_backup(synced(dom), method="offline", enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    assert verify.verify_backup(run.backup).startswith("ok")
    assert restore_now(run.backup, restore_root).status == RunStatus.SUCCEEDED

    assert threads == {threading.main_thread()}


# ------------------------------------------------------------------ every catchable signal


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
def test_a_command_stopped_before_its_job_began_ends_its_row(vm, signum, capsys):
    """Ctrl-C, a closed terminal or kill(1): the same clean end, and the handlers the
    command found are back afterwards."""
    before = signal.getsignal(signum)
    run = BackupRun.objects.create(vm=vm)
    with pytest.raises(SystemExit) as exited:
        with interrupt.Guard("vmbackup_run") as guard:
            guard.queued(run)
            os.kill(os.getpid(), signum)
            # a fixed sleep on purpose: it stands for the command's work, which the
            # handler must interrupt long before it ends
            time.sleep(10)

    name = signal.Signals(signum).name
    assert exited.value.code == 128 + signum
    assert f"vmbackup_run was stopped by {name}" in capsys.readouterr().err
    run.refresh_from_db()
    assert run.status == RunStatus.INTERRUPTED
    assert run.error == f"vmbackup_run was stopped by {name}"
    assert signal.getsignal(signum) == before
