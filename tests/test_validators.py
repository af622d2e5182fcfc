"""What the admin may configure, checked once by the model and again by the worker: libvirt
URIs, backup roots and cron. The worker side runs without libvirtd (the test:/// driver)."""

import os
from pathlib import Path

import pytest
from django.core.exceptions import ValidationError

from backups import hypervisor, jobs, reconcile, roots, site, uris
from backups.archive import ArchiveError
from backups.models import Backup, BackupPolicy, BackupRun, Host, VirtualMachine
from backups.retention import prune
from backups.validators import validate_backup_root, validate_cron, validate_libvirt_uri

TEST_DOMAIN_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # the test:///default driver's

ACCEPTED = [
    "qemu:///system",
    "qemu+ssh://kvm1/system",
    "qemu+ssh://root@kvm1.example.com:2222/system",
    "qemu+ssh://[2001:db8::1]/system",
    "qemu+tls://kvm2.example.com/system",
    "qemu+tls://10.0.0.2:16514/system",
]
REFUSED = [
    "qemu+ext:///system?command=/bin/sh",
    "qemu+ssh://kvm1/system?command=/tmp/x",
    "qemu+ssh://kvm1/system?socket=/run/other.sock",
    "qemu+ssh://kvm1/system?keyfile=/root/.ssh/id_rsa",
    "qemu+ssh://kvm1/system?netcat=/tmp/nc",
    "qemu+tls://kvm1/system?pkipath=/tmp",
    "qemu+unix:///system?socket=/tmp/evil",
    "qemu+unix:///system",
    "qemu+libssh2://kvm1/system",
    "qemu:///session",
    "qemu:///system?mode=legacy",
    "qemu+ssh://kvm1/session",
    "qemu+ssh://user:secret@kvm1/system",
    "qemu+tls://user@kvm1/system",
    "qemu+ssh://kvm1:99999/system",
    "qemu+ssh://-oProxyCommand=x/system",
    "xen:///system",
    "test:///default",  # only when VMBACKUP_ALLOW_TEST_URI is on
    "",
]


@pytest.mark.parametrize("uri", ACCEPTED)
def test_it_accepts_the_plain_libvirt_uris(uri, settings):
    settings.VMBACKUP_ALLOW_TEST_URI = False
    assert uris.refusal(uri) == ""
    validate_libvirt_uri(uri)


@pytest.mark.parametrize("uri", REFUSED)
def test_it_refuses_uris_that_run_programs_or_open_other_sockets(uri, settings):
    settings.VMBACKUP_ALLOW_TEST_URI = False
    assert uris.refusal(uri)
    with pytest.raises(ValidationError):
        validate_libvirt_uri(uri)


def test_it_accepts_the_test_driver_only_when_allowed(settings):
    settings.VMBACKUP_ALLOW_TEST_URI = True
    assert uris.refusal("test:///default") == ""
    assert uris.refusal("test:///default?x=1")
    settings.VMBACKUP_ALLOW_TEST_URI = False
    assert uris.refusal("test:///default")


def test_it_never_connects_to_a_refused_uri(settings):
    settings.VMBACKUP_ALLOW_TEST_URI = False
    with pytest.raises(hypervisor.HypervisorError, match="refusing to connect"):
        with hypervisor.session("test:///default"):
            pass
    with pytest.raises(hypervisor.HypervisorError, match="refusing to connect"):
        with hypervisor.session("qemu+ext:///system?command=/bin/true"):
            pass


def test_it_lists_vmbackup_root_first_and_normalises_the_roots(settings):
    settings.VMBACKUP_ROOT = "/srv/main/"
    settings.VMBACKUP_ROOTS = ["/srv/nas", "/srv/main", "relative", "/", "/srv/usb/../nas"]
    assert roots.configured() == ["/srv/main", "/srv/nas"]
    assert roots.refusal("/srv/nas/") == ""
    assert "not one of the configured roots" in roots.refusal("/etc")


@pytest.mark.parametrize("value", ["/etc", "/srv/nas/sub", "relative", "/srv"])
def test_it_refuses_a_destination_outside_the_roots(value, settings):
    settings.VMBACKUP_ROOT, settings.VMBACKUP_ROOTS = "/srv/main", ["/srv/nas"]
    with pytest.raises(ValidationError, match="not a configured backup root"):
        validate_backup_root(value)


@pytest.mark.parametrize("value", ["0 25 * * *", "* * *", "0 2 * * mon-", "61 * * * *"])
def test_it_refuses_an_invalid_cron(value):
    with pytest.raises(ValidationError, match="Not a valid cron expression"):
        validate_cron(value)


def test_it_validates_the_model_fields_on_full_clean(settings, db):
    settings.VMBACKUP_ALLOW_TEST_URI = False
    host = Host(name="h", uri="qemu+ext:///system?command=/bin/sh")
    policy = BackupPolicy(name="p", schedule="0 25 * * *", destination="/etc")
    with pytest.raises(ValidationError) as host_error:
        host.full_clean()
    with pytest.raises(ValidationError) as policy_error:
        policy.full_clean()
    assert set(host_error.value.message_dict) == {"uri"}
    assert set(policy_error.value.message_dict) == {"schedule", "destination"}


# --- the worker asks again: a row edited in the database changes nothing ------------------------


@pytest.fixture
def rogue(db, tmp_path, settings):
    """A policy whose destination was set in the database, outside the configured roots."""
    settings.VMBACKUP_ROOT = str(tmp_path / "main")
    settings.VMBACKUP_ROOTS = []
    (tmp_path / "main").mkdir()
    target = tmp_path / "rogue"
    target.mkdir()
    return BackupPolicy.objects.create(name="rogue", schedule="", destination=str(target))


@pytest.fixture
def test_vm(db):
    host = Host.objects.create(name="t", uri="test:///default")
    return VirtualMachine.objects.create(host=host, uuid=TEST_DOMAIN_UUID, name="test")


def test_the_worker_refuses_a_run_into_a_destination_outside_the_roots(rogue, test_vm):
    run = BackupRun.objects.create(vm=test_vm, policy=rogue)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    assert run.status == "failed"
    assert run.error.startswith(f"refused: backup root '{rogue.destination}' is not one of")
    assert list(Path(rogue.destination).iterdir()) == []  # nothing written there


def test_prune_deletes_nothing_under_a_destination_outside_the_roots(rogue, test_vm, settings):
    path = f"{rogue.destination}/test/20260101T000000Z-1"
    os.makedirs(path)
    backup = Backup.objects.create(vm=test_vm, policy=rogue, path=path)
    with pytest.raises(ArchiveError, match="not a backup under a root"):
        prune.delete(backup)
    assert os.path.isdir(path)
    settings.VMBACKUP_ROOTS = [rogue.destination]  # the same, once configured
    prune.delete(backup)
    assert not os.path.exists(path)


def test_reconcile_leaves_partials_under_a_destination_outside_the_roots(rogue, settings):
    partial = Path(rogue.destination, "web", f".20260101T000000Z-7.{site.site_id()}.partial")
    partial.mkdir(parents=True)
    report = reconcile.reconcile()
    assert partial.is_dir() and report.partials == []
    settings.VMBACKUP_ROOTS = [rogue.destination]
    assert reconcile.reconcile().partials == [str(partial)]
    assert not partial.exists()


def test_reconcile_leaves_a_dead_runs_staging_outside_the_roots(rogue, test_vm):
    staging = Path(rogue.destination, "test", ".20260101T000000Z-9.partial")
    staging.mkdir(parents=True)
    run = BackupRun.objects.create(
        vm=test_vm, policy=rogue, status="running", worker="elsewhere:1", staging_path=str(staging)
    )
    report = reconcile.reconcile(stale_after=0)
    run.refresh_from_db()
    assert run.status == "interrupted"
    assert staging.is_dir() and str(staging) not in report.partials
