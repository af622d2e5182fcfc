"""Where a backup lives (here, offsite, both) on the VM and backup pages, and restores that
read the offsite copy when the directory here is gone or found bad (rows only: nothing
reaches a worker, see test_views_restore)."""

import pytest
from django.urls import reverse
from django.utils import timezone

from backups import access, requests
from backups.models import OffsiteCopy, OffsiteRepository, RunStatus, VerifyStatus
from tests.helpers import logged_in, make_backup, make_user


@pytest.fixture
def restorer_client(django_user_model):
    return logged_in(make_user(django_user_model, "rita", access.VIEW, access.RESTORE_BACKUP))


@pytest.fixture
def root(settings, tmp_path):
    settings.VMBACKUP_RESTORE_ROOTS = [str(tmp_path)]
    return str(tmp_path)


@pytest.fixture
def repository(db):
    return OffsiteRepository.objects.create(name="far", url="/srv/far", password_file="/etc/pw")


def copied(backup, repository, status=RunStatus.SUCCEEDED) -> OffsiteCopy:
    return OffsiteCopy.objects.create(
        backup=backup, repository=repository, status=status, snapshot_id="ab" * 32
    )


def test_the_pages_say_where_each_backup_lives(owner_client, vm, repository):
    here = make_backup(vm)
    both = make_backup(vm)
    gone = make_backup(vm, pruned_at=timezone.now())
    lost = make_backup(vm, pruned_at=timezone.now())
    copied(both, repository)
    copied(gone, repository)
    copied(lost, repository, status=RunStatus.FAILED)

    page = owner_client.get(reverse("vm_detail", args=[vm.pk])).content.decode()
    rows = {
        b.pk: page.split(reverse("backup_detail", args=[b.pk]))[1][:1200]
        for b in (here, both, gone)
    }
    assert "<td>here</td>" in rows[here.pk]
    assert "<td>here + offsite</td>" in rows[both.pk]
    assert "<td>offsite</td>" in rows[gone.pk] and "Verify" not in rows[gone.pk].split("</tr>")[0]
    assert reverse("backup_detail", args=[lost.pk]) not in page  # pruned, no copy: not listed

    detail = owner_client.get(reverse("backup_detail", args=[gone.pk])).content.decode()
    assert "offsite only: <code>far</code>" in detail
    assert "Restore as a new domain (from offsite)" in detail
    assert (
        "offsite only"
        not in owner_client.get(reverse("backup_detail", args=[both.pk])).content.decode()
    )


def test_a_restore_of_a_pruned_backup_reads_its_offsite_copy(
    restorer_client, vm, repository, root, async_calls
):
    gone = make_backup(vm, pruned_at=timezone.now())
    copied(gone, repository)
    form = restorer_client.get(reverse("backup_restore", args=[gone.pk])).content.decode()
    assert "offsite repository <code>far</code>" in form

    response = restorer_client.post(
        reverse("backup_restore", args=[gone.pk]), {"name": "web-1-back", "root": root}
    )

    restore = gone.restores.get()
    assert response.status_code == 302 and restore.repository == repository


def test_a_corrupt_backup_with_an_offsite_copy_is_restored_from_there(vm, repository, root):
    bad = make_backup(vm, verify_status=VerifyStatus.CORRUPT)
    copied(bad, repository)
    assert requests.restore_source(bad, from_offsite=True) == repository
    assert requests.restore_source(bad) is None  # as asked: here, where the check refuses it


def test_the_source_is_here_unless_asked_or_gone(vm, repository):
    here = make_backup(vm)
    assert requests.restore_source(here) is None
    with pytest.raises(requests.RestoreRefused, match="has no offsite copy"):
        requests.restore_source(here, from_offsite=True)
    copied(here, repository)
    assert requests.restore_source(here, from_offsite=True) == repository
    other = OffsiteRepository.objects.create(name="near", url="/srv/near", password_file="/pw")
    with pytest.raises(requests.RestoreRefused, match="no copy in near"):
        requests.restore_source(here, other)
    gone = make_backup(vm, pruned_at=timezone.now())
    with pytest.raises(requests.RestoreRefused, match="pruned and has no offsite copy"):
        requests.restore_source(gone)
