"""``requests.request_copy_after_backup``: what the worker's task and ``vmbackup_run --wait``
both call once a run has published its backup (the database side only; the copies
themselves are in test_offsite.py)."""

import uuid

import pytest
from django.utils import timezone

from backups import requests
from backups.models import (
    Backup,
    BackupPolicy,
    BackupRun,
    CopyTrigger,
    OffsiteCopy,
    OffsiteRepository,
    RunStatus,
    VirtualMachine,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def repository(db):
    return OffsiteRepository.objects.create(name="far", url="/srv/far", password_file="/etc/pw")


def published(host, policy, status=RunStatus.SUCCEEDED) -> BackupRun:
    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name=f"vm-{uuid.uuid4()}")
    run = BackupRun.objects.create(vm=vm, policy=policy, status=status)
    if status == RunStatus.SUCCEEDED:
        Backup.objects.create(vm=vm, run=run, policy=policy, path=f"/srv/b/{vm.name}/x")
        run.finished_at = timezone.now()
        run.save()
    return run


def test_a_published_backup_of_a_policy_naming_a_repository_is_copied(host, repository):
    policy = BackupPolicy.objects.create(name="off", schedule="", offsite=repository)
    run = published(host, policy)

    copy = requests.request_copy_after_backup(run.pk)

    assert (copy.backup, copy.repository, copy.trigger) == (
        run.backup,
        repository,
        CopyTrigger.AFTER_BACKUP,
    )
    assert "offsite-requested" in [e["step"] for e in BackupRun.objects.get(pk=run.pk).journal]


def test_nothing_is_copied_without_a_repository_or_a_backup(host, repository):
    plain = BackupPolicy.objects.create(name="plain", schedule="")
    off = BackupPolicy.objects.create(name="off", schedule="", offsite=repository)

    assert requests.request_copy_after_backup(published(host, plain).pk) is None
    assert requests.request_copy_after_backup(published(host, None).pk) is None
    failed = published(host, off, status=RunStatus.FAILED)
    assert requests.request_copy_after_backup(failed.pk) is None
    assert not OffsiteCopy.objects.exists()


def test_a_second_copy_of_the_vm_waits_and_says_so(host, repository):
    policy = BackupPolicy.objects.create(name="off", schedule="", offsite=repository)
    first = published(host, policy)
    requests.request_copy_after_backup(first.pk)
    second = BackupRun.objects.create(vm=first.vm, policy=policy, status=RunStatus.SUCCEEDED)
    Backup.objects.create(vm=first.vm, run=second, policy=policy, path="/srv/b/y")

    assert requests.request_copy_after_backup(second.pk) is None
    journal = BackupRun.objects.get(pk=second.pk).journal
    assert [e["step"] for e in journal] == ["offsite-deferred"]
    assert OffsiteCopy.objects.count() == 1
