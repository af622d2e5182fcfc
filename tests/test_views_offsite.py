"""The offsite pages: "Copy offsite" on a backup, the copies list with the repositories'
last checks, a copy's progress polled like a run's, and cancel — down to a real restic
stopped mid-upload with no snapshot written. (Login, methods, permissions, unknown ids and
CSRF for these views are in the security matrix, ``test_views_auth``.)"""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from backups import archive, jobs, restic
from backups.models import OffsiteCopy, OffsiteRepository, RunStatus
from backups.offsite import restic_repository
from tests.helpers import descendants, logged_in, make_backup, make_user, publish_backup, wait_until

MIB = 1024 * 1024


@pytest.fixture
def copier(django_user_model):
    return logged_in(
        make_user(django_user_model, "carol", "backups.view_virtualmachine", "backups.copy_offsite")
    )


@pytest.fixture
def vault(db):
    return OffsiteRepository.objects.create(
        name="vault", url="/srv/vault", password_file="/etc/vault.pw", cluster="vaulthost"
    )


def test_copy_offsite_queues_a_copy_to_the_chosen_repository(copier, vm, vault, async_calls):
    backup = make_backup(vm)
    response = copier.post(reverse("backup_copy", args=[backup.pk]), {"repository": vault.pk})
    copy = OffsiteCopy.objects.get()
    assert response["Location"] == reverse("copy_detail", args=[copy.pk])
    assert (copy.backup, copy.repository, copy.trigger) == (backup, vault, "button")


def test_copy_offsite_defaults_to_the_policy_repository_and_refuses_without_one(
    copier, vm, policy, vault, async_calls
):
    backup = make_backup(vm, policy=policy)
    response = copier.post(reverse("backup_copy", args=[backup.pk]), follow=True)
    assert b"Choose an enabled offsite repository" in response.content
    assert not OffsiteCopy.objects.exists()

    policy.offsite = vault
    policy.save()
    copier.post(reverse("backup_copy", args=[backup.pk]))
    assert OffsiteCopy.objects.get().repository == vault
    response = copier.post(reverse("backup_copy", args=[backup.pk]), follow=True)
    assert b"already has an offsite copy queued or running" in response.content

    vault.enabled = False
    vault.save()
    OffsiteCopy.objects.update(status=RunStatus.CANCELLED)
    copier.post(reverse("backup_copy", args=[backup.pk]), {"repository": vault.pk})
    assert OffsiteCopy.objects.count() == 1  # a disabled repository is not offered


def test_the_backup_page_offers_the_button_and_lists_its_copies(copier, viewer_client, vm, vault):
    backup = make_backup(vm)
    OffsiteCopy.objects.create(
        backup=backup, repository=vault, status=RunStatus.SUCCEEDED, snapshot_id="ab" * 32
    )
    page = copier.get(reverse("backup_detail", args=[backup.pk])).content.decode()
    assert "Copy offsite</button>" in page and f'<option value="{vault.pk}"' in page
    assert "<code>ababababab…</code>" in page
    assert (
        "Copy offsite</button>"
        not in viewer_client.get(reverse("backup_detail", args=[backup.pk])).content.decode()
    )


def test_a_copy_is_polled_while_active_and_ends_with_286(viewer_client, vm, vault):
    now = timezone.now()
    copy = OffsiteCopy.objects.create(
        backup=make_backup(vm), repository=vault, status=RunStatus.RUNNING,
        started_at=now - timedelta(seconds=10), bytes_done=3 * MIB, bytes_total=12 * MIB,
        journal=[{"at": now.isoformat(), "step": "send", "files": 5}],
    )  # fmt: skip
    page = viewer_client.get(reverse("copy_detail", args=[copy.pk])).content.decode()
    assert f'hx-get="{reverse("copy_progress", args=[copy.pk])}"' in page
    part = viewer_client.get(reverse("copy_progress", args=[copy.pk]))
    assert part.status_code == 200
    text = part.content.decode()
    assert f'<progress max="{12 * MIB}" value="{3 * MIB}">' in text and "(25%)" in text
    assert "now: send" in text and "files=5" in text and "<html" not in text
    assert "Cancel copy" not in text  # a viewer may not

    copy.finish(RunStatus.FAILED, "wrong password: …", reason="wrong-password")
    assert viewer_client.get(reverse("copy_progress", args=[copy.pk])).status_code == 286
    page = viewer_client.get(reverse("copy_detail", args=[copy.pk])).content.decode()
    assert "hx-get" not in page and "wrong password" in page


def test_cancel_ends_a_queued_copy_and_asks_a_running_one(copier, vm, vault):
    queued = OffsiteCopy.objects.create(backup=make_backup(vm), repository=vault)
    copier.post(reverse("copy_cancel", args=[queued.pk]))
    queued.refresh_from_db()
    assert queued.status == RunStatus.CANCELLED
    running = OffsiteCopy.objects.create(
        backup=make_backup(vm), repository=vault, status=RunStatus.RUNNING
    )
    assert "Cancel copy" in copier.get(reverse("copy_detail", args=[running.pk])).content.decode()
    copier.post(reverse("copy_cancel", args=[running.pk]))
    running.refresh_from_db()
    assert (running.status, running.cancel_requested) == (RunStatus.RUNNING, True)
    response = copier.post(reverse("copy_cancel", args=[queued.pk]), follow=True)
    assert b"already finished" in response.content


@pytest.mark.parametrize("count", [10, 200])
def test_the_list_costs_the_same_queries_for_10_and_200_copies(
    viewer_client, vm, vault, count, django_assert_num_queries
):
    vault.record_check(False, "5%", "pack 12ab damaged")
    backup = make_backup(vm)
    OffsiteCopy.objects.bulk_create(
        OffsiteCopy(backup=backup, vm=vm, repository=vault, status=RunStatus.SUCCEEDED)
        for _ in range(count)
    )
    # session, user, 2 x permissions, count, page, repositories
    with django_assert_num_queries(7):
        response = viewer_client.get(reverse("copy_list"))
    assert len(response.context["page"].object_list) == min(count, 50)
    assert b"pack 12ab damaged" in response.content and b"data read: 5%" in response.content


def test_the_vm_page_shows_the_age_of_its_newest_offsite_copy(viewer_client, vm, vault):
    old, new = make_backup(vm, ago=timedelta(days=3)), make_backup(vm, ago=timedelta(hours=5))
    OffsiteCopy.objects.create(backup=old, repository=vault, status=RunStatus.SUCCEEDED)
    OffsiteCopy.objects.create(backup=new, repository=vault, status=RunStatus.FAILED)
    page = viewer_client.get(reverse("vm_detail", args=[vm.pk])).content.decode()
    assert "newest copy" in page and "3\xa0days old" in page and "in vault" in page


def restic_children() -> list[int]:
    found = []
    for pid in descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "restic":
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(not os.path.exists(restic.RESTIC), reason="restic is required")
def test_the_cancel_button_stops_restic_mid_upload_and_no_snapshot_is_written(
    vm, offsite, tmp_path, django_user_model
):
    def fill(staging: Path) -> list[dict]:
        with open(staging / "vda.raw", "wb") as f:
            for _ in range(160):
                f.write(os.urandom(MIB))
        return [dict(target="vda", source="/x/vda.img", format="raw",
                     virtual_size=160 * MIB, file="vda.raw")]  # fmt: skip

    root = tmp_path / "root"
    root.mkdir()
    path = publish_backup(root, vm.name, 3, fill, vm_uuid=str(vm.uuid))
    backup = make_backup(vm, path=str(path), manifest=archive.read_manifest(path).to_dict())
    copy = OffsiteCopy.objects.create(backup=backup, repository=offsite)

    def worker():
        try:
            jobs.copy_offsite(copy.pk)
        finally:
            connection.close()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        wait_until(lambda: restic_children(), 60, "restic backup never started")
        user = make_user(django_user_model, "carl", "backups.view_virtualmachine",
                         "backups.copy_offsite")  # fmt: skip
        logged_in(user).post(reverse("copy_cancel", args=[copy.pk]))
        asked = timezone.now()
    finally:
        thread.join(60)
    assert not thread.is_alive()
    copy.refresh_from_db()
    assert (copy.status, copy.error) == (RunStatus.CANCELLED, "cancelled by user")
    assert (copy.finished_at - asked).total_seconds() < 15  # within seconds, not at the end
    assert restic_children() == []
    assert copy.snapshot_id == ""
    assert restic.snapshots(restic_repository(offsite)) == []
    assert restic.check(restic_repository(offsite)).ok  # its lock was removed
