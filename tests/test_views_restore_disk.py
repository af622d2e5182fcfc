"""The restore page's second form: one disk of a backup, as a new file in a restore root."""

import pytest
from django.test import Client
from django.urls import reverse

from backups import access
from backups.models import Restore, RestoreMode, RunStatus, VerifyStatus
from tests.helpers import logged_in, make_backup, make_user

MISSING = 999_999


@pytest.fixture
def restorer(django_user_model):
    return make_user(django_user_model, "rita", access.VIEW, access.RESTORE_BACKUP)


@pytest.fixture
def restorer_client(restorer):
    return logged_in(restorer)


@pytest.fixture
def root(settings, tmp_path):
    directory = tmp_path / "restores"
    directory.mkdir()
    settings.VMBACKUP_RESTORE_ROOTS = [str(directory)]
    return directory


@pytest.fixture
def backup(vm):
    return make_backup(vm)


def url(backup_id: int) -> str:
    return reverse("backup_restore_disk", args=[backup_id])


def fields(directory, **overrides):
    return {"disk": "vda", "root": str(directory), "file": "web-1-vda.qcow2", **overrides}


def test_the_restore_page_offers_the_backups_disks(restorer_client, backup, root):
    page = restorer_client.get(reverse("backup_restore", args=[backup.pk])).content.decode()
    assert url(backup.pk) in page
    assert '<option value="vda"' in page


def test_it_queues_one_disk_and_shows_it(restorer_client, restorer, backup, root, async_calls):
    response = restorer_client.post(url(backup.pk), fields(root))
    restore = Restore.objects.get()
    assert response["Location"] == reverse("restore_detail", args=[restore.pk])
    assert (restore.mode, restore.disk, restore.root, restore.name) == (
        RestoreMode.DISK, "vda", str(root), "web-1-vda.qcow2",
    )  # fmt: skip
    assert (restore.status, restore.requested_by) == (RunStatus.QUEUED, restorer)
    page = restorer_client.get(response["Location"]).content.decode()
    assert "disk vda as a file" in page and f"{root}/web-1-vda.qcow2" in page


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"disk": "vdz"}, "Select a valid choice"),
        ({"root": "/etc"}, "Select a valid choice"),
        ({"file": "../x.qcow2"}, "Not a valid file name"),
        ({"file": "taken.qcow2"}, "already exists"),
    ],
)
def test_it_refuses_what_it_must_not_write(restorer_client, backup, root, overrides, why):
    (root / "taken.qcow2").write_text("mine")
    response = restorer_client.post(url(backup.pk), fields(root, **overrides))
    assert response.status_code == 200
    assert why in response.content.decode()
    assert not Restore.objects.exists()
    assert (root / "taken.qcow2").read_text() == "mine"


def test_it_refuses_a_corrupt_backup(restorer_client, vm, root):
    bad = make_backup(vm, verify_status=VerifyStatus.CORRUPT)
    response = restorer_client.post(url(bad.pk), fields(root))
    assert response["Location"] == reverse("backup_detail", args=[bad.pk])
    assert not Restore.objects.exists()


def test_who_may_and_how(client, viewer_client, restorer, restorer_client, backup, root):
    response = client.post(url(backup.pk), fields(root))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    assert viewer_client.post(url(backup.pk), fields(root)).status_code == 403
    assert restorer_client.get(url(backup.pk)).status_code == 405
    assert restorer_client.post(url(MISSING), fields(root)).status_code == 404
    csrf = Client(enforce_csrf_checks=True)
    csrf.force_login(restorer)
    assert csrf.post(url(backup.pk), fields(root)).status_code == 403
    assert not Restore.objects.exists()
