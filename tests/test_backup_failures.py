"""What a backup does when things go wrong — against the real libvirtd and QEMU."""

import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.db import connection

from backups import archive, jobs, qemu_img, reconcile, requests
from backups.archive import check as archive_check
from backups.models import Backup, BackupRun, RunStatus, VerifyStatus
from tests.domains import BASE, PREFIX, DiskSpec, guest_write, make_dir
from tests.helpers import assert_images_equal, assert_vm_untouched, wait_until

pytestmark = [pytest.mark.libvirt]
ROOT_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_root(settings, _swept):
    """A tiny tmpfs as backup root, mounted before any guest starts (QEMU's own namespace)."""
    mount = make_dir(BASE / f"{PREFIX}tmpfs-{uuid.uuid4().hex[:8]}")

    def mount_it(size_mib: int) -> Path:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(mount)],
            check=True,
            timeout=30,
        )
        settings.VMBACKUP_ROOT = str(mount)
        return mount

    try:
        yield mount_it
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)
        mount.rmdir()


def run_now(vm, method, **options):
    run = requests.request_backup(vm, method=method, enqueue=False, options=options)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    return run


@pytest.mark.django_db
def test_it_refuses_a_destination_too_small_before_writing(domains, small_root, synced):
    root = small_root(8)
    dom = domains.create([DiskSpec("vda", "qcow2", 64, [(0, 20, 0x21)])], start=True)
    run = run_now(synced(dom), "push")
    assert run.status == RunStatus.FAILED
    assert run.error.startswith("refused: not enough space")
    assert list(root.iterdir()) == []  # refused in preflight, before the VM's directory
    assert_vm_untouched(domains, dom, running=True)


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["push", "snapshot"])
def test_it_fails_cleanly_when_the_disk_fills_during_the_write(method, domains, small_root, synced):
    root = small_root(24)
    dom = domains.create([DiskSpec("vda", "qcow2", 64, [(0, 2, 0x31)])], start=True)
    vm = synced(dom)
    first = run_now(vm, method)
    assert first.status == RunStatus.SUCCEEDED, first.error
    guest_write(domains.conn, dom.uuid, 0, "write -P 0x32 4M 40M")

    run = run_now(vm, method, skip_space_check=True)

    assert run.status == RunStatus.FAILED
    assert "No space left on device" in run.error  # QEMU's or qemu-img's strerror(ENOSPC)
    assert archive.list_partials(root) == []
    assert archive.list_backups(root, dom.name) == [Path(first.backup.path)]
    assert archive_check.verify(first.backup.path).ok
    assert_vm_untouched(domains, dom, running=True)
    assert Backup.objects.count() == 1


@pytest.mark.django_db
def test_it_records_the_published_directory_only_after_success(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0x41)])])
    run = run_now(synced(dom), "offline")
    steps = [e["step"] for e in run.journal]
    assert steps.index("verify") < steps.index("publish") < steps.index("published")
    assert Path(run.backup.path).name == f"{archive.stamp(run.started_at)}-{run.pk}"


@pytest.mark.django_db
def test_it_treats_a_duplicate_delivery_as_a_no_op(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0x51)])])
    run = requests.request_backup(synced(dom), method="offline", enqueue=False)
    assert jobs.run_backup(run.pk).startswith("published")
    assert jobs.run_backup(run.pk) == "not claimed (succeeded)"
    assert Backup.objects.filter(vm=run.vm).count() == 1


@pytest.mark.django_db(transaction=True)
def test_it_lets_exactly_one_of_two_simultaneous_triggers_run(domains, backup_root, synced):
    vm = synced(domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0x61)])]))
    barrier = threading.Barrier(2)
    outcomes = []

    def trigger():
        barrier.wait()
        try:
            outcomes.append(requests.request_backup(vm, method="offline", enqueue=False))
        except requests.RunActive as exc:
            outcomes.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=trigger) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runs = [o for o in outcomes if isinstance(o, BackupRun)]
    refused = [o for o in outcomes if isinstance(o, requests.RunActive)]
    assert len(runs) == 1 and len(refused) == 1
    assert "already has an active backup" in str(refused[0])
    assert jobs.run_backup(runs[0].pk).startswith("published")


@pytest.mark.django_db
def test_it_finds_one_flipped_byte_that_qemu_img_check_misses(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 4, 0x71)])])
    run = run_now(synced(dom), "offline")
    image = Path(run.backup.path) / "vda.qcow2"
    with open(image, "r+b") as handle:  # flip a byte inside the guest data, not metadata
        data = handle.read()
        offset = data.index(bytes([0x71]) * 4096) + 100
        handle.seek(offset)
        handle.write(bytes([0x70]))
    assert qemu_img.check(str(image), "qcow2").ok  # qcow2 has no data checksums

    with _raises_command_error():
        call_command("vmbackup_verify", "--all")
    backup = Backup.objects.get(pk=run.backup.pk)
    assert backup.verify_status == VerifyStatus.CORRUPT
    assert "vda.qcow2" in backup.verify_error


def _raises_command_error():
    from django.core.management import CommandError

    return pytest.raises(CommandError, match="failed verification")


@pytest.mark.django_db(transaction=True)
def test_it_repairs_everything_after_the_worker_is_killed_mid_copy(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 1024, [(0, 1000, 0x81)])], start=True)
    vm = synced(dom)
    env = dict(
        os.environ,
        VMBACKUP_SQLITE_PATH=str(django_settings.DATABASES["default"]["NAME"]),
        VMBACKUP_ROOT=str(backup_root),
        DJANGO_SETTINGS_MODULE="vmbackup_site.settings",
    )
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "vmbackup_run", vm.name, "--method", "snapshot", "--wait"],
        cwd=ROOT_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run = _wait_for_step(vm, "copy", worker)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING
    assert ".overlay." in domains.lookup(dom).XMLDesc(0)  # the kill left the overlay active

    report = reconcile.reconcile()

    run.refresh_from_db()
    assert run.status == RunStatus.INTERRUPTED, report.summary()
    assert report.errors == []
    assert_vm_untouched(domains, dom, running=True)
    assert archive.list_partials(backup_root) == []
    again = run_now(vm, "snapshot")
    assert again.status == RunStatus.SUCCEEDED, again.error
    assert_images_equal(dom, Path(again.backup.path))


def _wait_for_step(vm, step, worker, timeout=60) -> BackupRun:
    def reached() -> BackupRun | None:
        run = BackupRun.objects.filter(vm=vm).first()
        if run and any(e.get("step") == step for e in run.journal):
            return run
        if worker.poll() is not None:
            pytest.fail(f"worker ended early: {worker.stdout.read().decode()}")
        return None

    return wait_until(reached, timeout, f"run never reached step {step!r}")
