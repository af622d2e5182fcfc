"""The offline method on a running VM: graceful shutdown only with consent, never forced."""

from pathlib import Path

import pytest

from backups import jobs, requests
from backups.models import BackupPolicy, RunStatus
from tests.agent_guest import create_agent_domain, wait_for_agent
from tests.domains import DiskSpec

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]


def offline(vm, policy):
    run = requests.request_backup(vm, method="offline", enqueue=False, policy=policy)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    return run


@pytest.fixture
def policy():
    return BackupPolicy.objects.create(
        name="offline", schedule="", method="offline", shutdown_for_offline=True
    )


def test_it_refuses_without_the_policys_consent(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0x11)])], start=True)
    run = offline(synced(dom), None)
    assert run.status == RunStatus.FAILED
    assert "the offline method needs it shut off" in run.error
    assert domains.lookup(dom).isActive()


def test_it_never_forces_off_a_guest_that_ignores_shutdown(
    domains, backup_root, synced, policy, settings
):
    settings.VMBACKUP_SHUTDOWN_TIMEOUT = 3
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0x12)])], start=True)
    run = offline(synced(dom), policy)
    assert run.status == RunStatus.FAILED
    assert run.error == f"refused: {dom.name} did not shut down within 3s; not forcing it off"
    assert domains.lookup(dom).isActive()
    assert not list(Path(backup_root).glob("*/*"))


@pytest.mark.slow
def test_it_shuts_down_backs_up_and_starts_the_guest_again(
    domains, backup_root, synced, policy, settings
):
    settings.VMBACKUP_SHUTDOWN_TIMEOUT = 60
    dom = create_agent_domain(domains, [DiskSpec("vda", "qcow2", 16, [(0, 1, 0x13)])])
    wait_for_agent(domains.conn, dom.uuid)
    run = offline(synced(dom), policy)
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert (run.method, run.consistency) == ("offline", "offline")
    steps = [e["step"] for e in run.journal]
    assert steps.index("shutdown") < steps.index("copy") < steps.index("restart")
    assert domains.lookup(dom).isActive()
