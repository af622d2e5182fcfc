"""Work a click can start is bounded: one queued verification per backup, a few restores per
host. Nothing here reaches a worker (``async_calls`` records what would be enqueued)."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from backups import jobs, requests
from backups.models import Backup, Host, Restore, RunStatus, VirtualMachine
from tests.helpers import make_backup


@pytest.fixture
def backup(vm):
    return make_backup(vm)


def verify(client, backup):
    return client.post(reverse("backup_verify", args=[backup.pk]), follow=True)


def test_it_queues_one_verification_per_backup(
    owner_client, backup, async_calls, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        first = verify(owner_client, backup)
        second = verify(owner_client, backup)
    assert "Verification of" in first.content.decode()
    assert "already queued or running. It was not queued again." in second.content.decode()
    assert [args for args, _ in async_calls] == [("backups.jobs.verify_backup", backup.pk)]


def test_the_backup_page_says_a_verification_is_queued(owner_client, backup, async_calls):
    requests.request_verify(backup)
    page = owner_client.get(reverse("backup_detail", args=[backup.pk])).content.decode()
    assert "a verification is queued or running since" in page


def test_it_takes_a_verification_again_once_the_job_ended(owner_client, backup, async_calls):
    requests.request_verify(backup)
    jobs.verify_backup(backup.pk)  # the directory is missing: recorded, and the mark cleared
    backup.refresh_from_db()
    assert (backup.verify_status, backup.verify_queued_at) == ("missing", None)
    requests.request_verify(backup)


def test_it_clears_the_mark_when_the_job_fails(backup, monkeypatch):
    requests.request_verify(backup)
    monkeypatch.setattr("backups.verify.verify_backup", lambda b: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        jobs.verify_backup(backup.pk)
    assert Backup.objects.get(pk=backup.pk).verify_queued_at is None


def test_it_forgets_a_mark_older_than_the_longest_job(backup, settings, async_calls):
    stale = timezone.now() - timedelta(seconds=settings.Q_TIMEOUT + 60)
    Backup.objects.filter(pk=backup.pk).update(verify_queued_at=stale)
    requests.request_verify(backup)  # a worker died during it: not blocked forever
    fresh = timezone.now() - timedelta(seconds=settings.Q_TIMEOUT - 60)
    Backup.objects.filter(pk=backup.pk).update(verify_queued_at=fresh)
    with pytest.raises(requests.VerifyQueued):
        requests.request_verify(backup)


# --- restores per host ------------------------------------------------------------------------


@pytest.fixture
def root(settings, tmp_path):
    settings.VMBACKUP_RESTORE_ROOTS = [str(tmp_path)]
    return str(tmp_path)


def restore(client, backup, name, root):
    return client.post(reverse("backup_restore", args=[backup.pk]), {"name": name, "root": root})


def test_it_refuses_a_restore_beyond_the_cap_per_host(
    owner_client, backup, root, settings, async_calls
):
    settings.VMBACKUP_MAX_RESTORES_PER_HOST = 2
    assert restore(owner_client, backup, "copy-1", root).status_code == 302
    assert restore(owner_client, backup, "copy-2", root).status_code == 302
    third = restore(owner_client, backup, "copy-3", root)
    assert third.status_code == 200
    assert "hv1 already has 2 restore(s) queued or running (at most 2" in third.content.decode()
    assert Restore.objects.count() == 2


def test_it_counts_only_active_restores_of_the_same_host(backup, vm, root, settings):
    settings.VMBACKUP_MAX_RESTORES_PER_HOST = 1
    first = requests.request_restore(backup, name="copy-1", root=root, enqueue=False)
    other = Host.objects.create(name="hv2", uri="qemu:///system")
    elsewhere = VirtualMachine.objects.create(host=other, uuid=vm.uuid, name="web-2")
    requests.request_restore(make_backup(elsewhere), name="copy-2", root=root, enqueue=False)
    with pytest.raises(requests.RestoreRefused, match="at most 1"):
        requests.request_restore(backup, name="copy-3", root=root, enqueue=False)
    Restore.objects.filter(pk=first.pk).update(status=RunStatus.SUCCEEDED)
    requests.request_restore(backup, name="copy-3", root=root, enqueue=False)
