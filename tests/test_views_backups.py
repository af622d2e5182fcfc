import json
from datetime import UTC, datetime

import pytest
from django.urls import reverse

from backups import archive
from tests.helpers import make_backup

CREATED = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)


@pytest.fixture
def backup(vm):
    return make_backup(vm, created_at=CREATED)


@pytest.fixture
def fake_restore(monkeypatch):
    monkeypatch.setattr("backups.views.render_restore_md", lambda m: f"# Restore {m['vm_name']}\n")
    monkeypatch.setattr("backups.views.render_restore_sh", lambda m: "#!/bin/sh\nset -eu\n")


def test_it_shows_the_manifest_and_file_hashes(viewer_client, backup):
    response = viewer_client.get(reverse("backup_detail", args=[backup.pk]))
    content = response.content.decode()
    assert response.status_code == 200
    assert "vda.qcow2" in content and "ab" * 32 in content
    assert "filesystem-frozen" in content
    assert reverse("backup_manifest", args=[backup.pk]) in content
    assert reverse("backup_restore_md", args=[backup.pk]) not in content  # viewer cannot restore


def test_it_downloads_the_manifest_as_json(viewer_client, backup):
    response = viewer_client.get(reverse("backup_manifest", args=[backup.pk]))
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"] == (
        'attachment; filename="web-1-20260101T020000-backup.json"'
    )
    assert json.loads(response.content)["disks"][0]["target"] == "vda"


@pytest.mark.parametrize(
    "name, suffix, first_line",
    [
        ("backup_restore_md", "RESTORE.md", b"# Restore web-1"),
        ("backup_restore_sh", "restore.sh", b"#!/bin/sh"),
    ],
)
def test_it_names_the_restore_downloads(
    owner_client, backup, fake_restore, name, suffix, first_line
):
    response = owner_client.get(reverse(name, args=[backup.pk]))
    assert response.status_code == 200
    assert response["Content-Disposition"] == (
        f'attachment; filename="web-1-20260101T020000-{suffix}"'
    )
    assert response.content.startswith(first_line)


def test_it_makes_hostile_vm_names_safe_in_filenames(owner_client, vm, fake_restore):
    vm.name = 'evil"\r\n/../x y'
    vm.save()
    backup = make_backup(vm, created_at=CREATED)
    response = owner_client.get(reverse("backup_restore_sh", args=[backup.pk]))
    assert response["Content-Disposition"] == (
        'attachment; filename="evil_x_y-20260101T020000-restore.sh"'
    )


def test_it_refuses_restore_downloads_without_the_permission(viewer_client, backup, fake_restore):
    for name in ("backup_restore_md", "backup_restore_sh"):
        assert viewer_client.get(reverse(name, args=[backup.pk])).status_code == 403


def test_it_404s_when_no_manifest_is_recorded(owner_client, vm, fake_restore):
    backup = make_backup(vm, manifest={})
    assert owner_client.get(reverse("backup_restore_md", args=[backup.pk])).status_code == 404


def test_it_builds_restore_files_with_the_real_modules(owner_client, vm):
    manifest = archive.Manifest(
        version=archive.FORMAT_VERSION,
        vm_name="web-1",
        vm_uuid=str(vm.uuid),
        host="hv1",
        method="offline",
        kind="full",
        consistency="offline",
        started="2026-01-01T02:00:00+00:00",
        finished="2026-01-01T02:05:00+00:00",
        run_id=1,
        disks=(
            archive.DiskEntry(
                target="vda",
                source="/var/lib/libvirt/images/web-1.qcow2",
                format="qcow2",
                virtual_size=2**20,
                file="vda.qcow2",
                bytes=2**20,
                sha256="ab" * 32,
            ),
        ),
    )
    backup = make_backup(vm, manifest=json.loads(manifest.to_json()))
    md = owner_client.get(reverse("backup_restore_md", args=[backup.pk]))
    sh = owner_client.get(reverse("backup_restore_sh", args=[backup.pk]))
    assert (md.status_code, sh.status_code) == (200, 200)
    assert b"vda.qcow2" in md.content and b"vda.qcow2" in sh.content


def test_it_answers_409_for_a_manifest_restore_cannot_use(owner_client, backup):
    response = owner_client.get(reverse("backup_restore_md", args=[backup.pk]))
    assert response.status_code == 409
    assert b"cannot be turned into restore instructions" in response.content
