"""Filesystem-frozen backups against a real guest agent (a tiny guest running qemu-ga)."""

import socket

import pytest

from backups import hypervisor, jobs, reconcile, requests
from backups.models import BackupRun, RunStatus
from tests.agent_guest import agent_command, create_agent_domain, wait_for_agent
from tests.domains import DiskSpec

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt, pytest.mark.slow]


@pytest.fixture
def guest(domains):
    dom = create_agent_domain(
        domains, [DiskSpec("vda", "qcow2", 64), DiskSpec("vdb", "raw", 16)], ext4=("vda",)
    )
    wait_for_agent(domains.conn, dom.uuid)
    return dom


def freeze_status(domains, dom) -> str:
    return agent_command(domains.lookup(dom), "guest-fsfreeze-status")


def backup(vm, method):
    run = requests.request_backup(vm, method=method, enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    return run


@pytest.mark.parametrize("method", ["push", "snapshot"])
def test_it_labels_a_quiesced_backup_and_thaws_the_guest(
    method, guest, domains, backup_root, synced
):
    vm = synced(guest)
    run = backup(vm, method)
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert run.consistency == "filesystem-frozen"
    assert freeze_status(domains, guest) == "thawed"
    if method == "push":
        steps = [e["step"] for e in run.journal]
        assert steps.index("freeze") < steps.index("thaw") < steps.index("published")


def test_it_thaws_the_guest_when_the_job_fails_while_frozen(
    guest, domains, backup_root, synced, monkeypatch
):
    vm = synced(guest)
    seen = {}

    def failing_begin(self, uuid, *args, **kwargs):
        seen["status"] = agent_command(domains.lookup(guest), "guest-fsfreeze-status")
        raise hypervisor.HypervisorError("injected failure while frozen")

    monkeypatch.setattr(hypervisor.Session, "backup_begin", failing_begin)
    run = backup(vm, "push")
    assert seen["status"] == "frozen"
    assert run.status == RunStatus.FAILED
    assert "injected failure" in run.error
    assert freeze_status(domains, guest) == "thawed"


def test_it_thaws_a_guest_a_dead_run_left_frozen(guest, domains, backup_root, synced):
    vm = synced(guest)
    assert domains.lookup(guest).fsFreeze() >= 1
    BackupRun.objects.create(
        vm=vm,
        status=RunStatus.RUNNING,
        worker=f"{socket.gethostname()}:999999999",
        journal=[{"at": "2026-01-01T00:00:00+00:00", "step": "freeze"}],
    )
    report = reconcile.reconcile()
    assert report.thawed == [vm.name]
    assert freeze_status(domains, guest) == "thawed"
