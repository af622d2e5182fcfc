"""A run interrupted from outside: cancelled by the user, the VM shut down mid-copy."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import libvirt
import pytest
from django.db import connection

from backups import archive, jobs, requests
from backups.models import BackupRun, RunStatus
from tests.domains import DiskSpec
from tests.helpers import assert_images_equal, assert_vm_untouched, wait_until

pytestmark = [pytest.mark.libvirt, pytest.mark.django_db(transaction=True)]
BIG = [DiskSpec("vda", "qcow2", 1024, [(0, 1000, 0x91)])]


def run_in_background(vm, method):
    run = requests.request_backup(vm, method=method, enqueue=False)

    def work():
        try:
            jobs.run_backup(run.pk)
        finally:
            connection.close()

    thread = threading.Thread(target=work)
    thread.start()
    return run, thread


def wait_for_step(run, step, timeout=60):
    def reached():
        run.refresh_from_db()
        if any(e.get("step") == step for e in run.journal):
            return True
        if run.is_finished:
            pytest.fail(f"run finished ({run.status}: {run.error}) before {step!r}")
        return False

    wait_until(reached, timeout, f"no {step!r} step")


def job_running(domains, dom) -> bool:
    """libvirt reports the domain's backup job (the journal step comes just before it)."""
    try:
        stats = domains.lookup(dom).jobStats()
    except libvirt.libvirtError:  # e.g. "backup job data missing" while the job starts
        return False
    return stats.get("type", 0) != libvirt.VIR_DOMAIN_JOB_NONE


@pytest.mark.parametrize("method,step", [("push", "backup-begin"), ("snapshot", "copy")])
def test_it_cancels_cleanly(method, step, domains, backup_root, synced):
    dom = domains.create(BIG, start=True)
    run, thread = run_in_background(synced(dom), method)
    wait_for_step(run, step)
    requests.request_cancel(run)
    thread.join(timeout=120)
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED, run.error
    assert archive.list_partials(backup_root) == []
    assert_vm_untouched(domains, dom, running=True)
    assert domains.lookup(dom).listAllCheckpoints() == []


def test_it_commits_the_overlay_back_when_the_vm_is_shut_down_mid_copy(
    domains, backup_root, synced
):
    dom = domains.create(BIG, start=True)
    run, thread = run_in_background(synced(dom), "snapshot")
    wait_for_step(run, "copy")
    domains.lookup(dom).destroy()  # the guest is gone; its definition points at our overlay
    thread.join(timeout=120)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error  # the frozen base was still readable
    steps = [e["step"] for e in run.journal]
    assert "commit-offline" in steps
    assert_vm_untouched(domains, dom, running=False)
    inactive = domains.lookup(dom).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert f"file='{dom.disks['vda']}'" in inactive and ".overlay." not in inactive
    assert_images_equal(dom, Path(run.backup.path))


def test_it_fails_cleanly_when_the_vm_is_shut_down_during_a_push(domains, backup_root, synced):
    dom = domains.create(BIG, start=True)
    run, thread = run_in_background(synced(dom), "push")
    wait_for_step(run, "backup-begin")
    wait_until(lambda: job_running(domains, dom), message="no backup job in libvirt")
    domains.lookup(dom).destroy()
    destroyed = time.monotonic()
    thread.join(timeout=120)
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    assert "the VM stopped during the backup (shut down or destroyed)" in run.error
    assert time.monotonic() - destroyed < 20  # nothing waits for a job that cannot end
    assert archive.list_partials(backup_root) == []
    assert BackupRun.objects.active().count() == 0
    assert_vm_untouched(domains, dom, running=False)


def libvirtd_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


def libvirtd_answers() -> bool:
    virsh = ["virsh", "-c", "qemu:///system", "version"]
    return subprocess.run(virsh, capture_output=True, timeout=30).returncode == 0


def restart_libvirtd():
    """Kill libvirtd (its guests keep running) and start it again, as after a crash."""
    for pid in libvirtd_pids():
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not libvirtd_pids(), 30, "libvirtd did not stop")
    subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
    wait_until(libvirtd_answers, 60, "libvirtd did not come back")


@pytest.mark.slow
def test_it_survives_a_libvirtd_restart_during_a_push(domains, backup_root, synced):
    dom = domains.create(BIG, start=True)
    run, thread = run_in_background(synced(dom), "push")
    wait_for_step(run, "backup-begin")

    def copying():  # QEMU has reported progress
        run.refresh_from_db()
        return run.bytes_done or run.is_finished

    wait_until(copying, 60, "no progress reported")
    restart_libvirtd()
    domains.conn = libvirt.open(domains.uri)  # the fixture's own connection died too
    thread.join(timeout=180)
    run.refresh_from_db()
    assert run.is_finished
    # Two outcomes by design: if the job is still running when libvirtd is back, libvirt
    # reports how it ended and the backup is published; if it ended while libvirtd was down,
    # its outcome is unknown and the copy is discarded. Which one depends on QEMU's speed.
    if run.status == RunStatus.SUCCEEDED:
        assert_images_equal(dom, Path(run.backup.path))
    else:
        assert run.status == RunStatus.FAILED and run.error
    assert archive.list_partials(backup_root) == []
    assert_vm_untouched(domains, dom, running=True)
