"""The parts of restore from offsite that need no guest: which snapshots a chain needs,
the refusal when a link has no copy, and reconcile removing a dead restore's staging
directory (the whole path runs in test_offsite_recovery)."""

import socket
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from backups import reconcile, requests
from backups.models import (
    Backup,
    Kind,
    OffsiteCopy,
    OffsiteRepository,
    Restore,
    RunStatus,
    VirtualMachine,
)
from backups.restore import from_offsite
from backups.restore.rules import RestoreError
from tests.domains import make_dir

pytestmark = pytest.mark.django_db


@pytest.fixture
def repository(db):
    return OffsiteRepository.objects.create(name="far", url="/srv/far", password_file="/etc/pw")


def backup(vm, name: str, parent=None) -> Backup:
    kind = Kind.INCREMENTAL if parent else Kind.FULL
    path = f"/srv/backups/{vm.name}/{name}"
    return Backup.objects.create(
        vm=vm, path=path, kind=kind, parent=parent, pruned_at=timezone.now()
    )


def copy(item: Backup, repository, snapshot: str, **fields) -> OffsiteCopy:
    fields.setdefault("status", RunStatus.SUCCEEDED)
    return OffsiteCopy.objects.create(
        backup=item, repository=repository, snapshot_id=snapshot, **fields
    )


def test_a_chain_needs_every_link_offsite_oldest_first(host, repository):
    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="web")
    full = backup(vm, "20261130T010000Z-1")
    inc = backup(vm, "20261130T020000Z-2", full)
    top = backup(vm, "20261130T030000Z-3", inc)
    copy(full, repository, "a" * 64, finished_at=timezone.now() - timedelta(days=1))
    copy(full, repository, "b" * 64, finished_at=timezone.now())  # the newest counts
    copy(top, repository, "d" * 64)
    copy(inc, repository, "e" * 64, status=RunStatus.FAILED)

    with pytest.raises(
        RestoreError, match=f"backup {inc.pk} has no copy in offsite repository far"
    ):
        from_offsite.chain(top, repository)
    copy(inc, repository, "c" * 64)
    links = from_offsite.chain(top, repository)
    assert [(b, c.snapshot_id[0]) for b, c in links] == [(full, "b"), (inc, "c"), (top, "d")]


def test_reconcile_removes_a_dead_offsite_restores_staging(host, repository, settings, tmp_path):
    settings.VMBACKUP_ROOT = str(make_dir(tmp_path / "root"))
    settings.VMBACKUP_RESTORE_ROOTS = [str(make_dir(tmp_path / "restores"))]
    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="web")
    restore = Restore.objects.create(
        backup=backup(vm, "20261130T010000Z-1"),
        name="web-back",
        root=settings.VMBACKUP_RESTORE_ROOTS[0],
        repository=repository,
        status=RunStatus.RUNNING,
        worker=f"{socket.gethostname()}:999999999",  # no such pid
        journal=[{"step": "fetch"}],
    )
    staging = make_dir(from_offsite.staging_path(restore))
    (staging / "half").write_bytes(b"fetched")

    report = reconcile.reconcile()

    restore.refresh_from_db()
    assert restore.status == RunStatus.INTERRUPTED
    assert not staging.exists() and str(staging) in report.partials


def test_an_instant_restore_is_never_read_from_offsite(host, repository, settings, tmp_path):
    settings.VMBACKUP_RESTORE_ROOTS = [str(tmp_path)]
    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="web")
    gone = backup(vm, "20261130T010000Z-1")
    copy(gone, repository, "a" * 64)

    with pytest.raises(requests.RestoreRefused, match="instant restore runs from the backup"):
        requests.request_restore(
            gone, name="web-now", root=str(tmp_path), instant=True, enqueue=False
        )
    assert not Restore.objects.exists()


def test_one_disk_of_a_backup_held_only_offsite_is_refused(host, repository, settings, tmp_path):
    settings.VMBACKUP_RESTORE_ROOTS = [str(tmp_path)]
    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="web")
    gone = backup(vm, "20261130T010000Z-1")
    copy(gone, repository, "a" * 64)

    with pytest.raises(requests.RestoreRefused, match="has no directory here"):
        requests.request_disk_restore(gone, disk="vda", to=str(tmp_path / "vda.qcow2"))
    assert not Restore.objects.exists()


def test_a_copy_offsite_retention_forgot_holds_nothing(host, repository, settings, tmp_path):
    settings.VMBACKUP_RESTORE_ROOTS = [str(tmp_path)]
    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="web")
    gone = backup(vm, "20261130T010000Z-1")
    copy(gone, repository, "a" * 64, forgotten_at=timezone.now())

    assert not Backup.objects.restorable().filter(pk=gone.pk).exists()
    with pytest.raises(requests.RestoreRefused, match="was pruned and has no offsite copy"):
        requests.request_restore(gone, name="web-back", root=str(tmp_path), enqueue=False)
    with pytest.raises(requests.RestoreRefused, match="has no copy in far"):
        requests.request_restore(
            gone, name="web-back", root=str(tmp_path), repository=repository, enqueue=False
        )
