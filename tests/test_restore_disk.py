"""Restoring one disk alone as a file (``vmbackup_restore BACKUP --disk T --to FILE``)."""

import io
import os
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from backups import jobs, qemu_img, requests
from backups.models import Backup, RestoreMode, RunStatus, VirtualMachine
from backups.restore import disk as disk_restore
from backups.restore.rules import RestoreError, check_disk_file
from tests.domains import DiskSpec
from tests.helpers import flip_byte, push, snapshot_copy, write

libvirt_tests = [pytest.mark.django_db, pytest.mark.libvirt]


@pytest.fixture
def roots(settings, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    settings.VMBACKUP_RESTORE_ROOTS = [str(root)]
    return root


def test_it_accepts_a_new_file_in_a_root_or_below(roots):
    (roots / "sub").mkdir()
    assert check_disk_file(str(roots / "vda.qcow2")) == (str(roots), "vda.qcow2")
    assert check_disk_file(str(roots / "sub" / "x.raw")) == (str(roots / "sub"), "x.raw")


def test_it_refuses_paths_outside_the_roots_existing_files_and_symlinks(roots, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (roots / "taken.qcow2").write_text("mine")
    (roots / "link").symlink_to(outside)
    (roots / "dangling.qcow2").symlink_to(tmp_path / "nothing")
    refused = {
        str(outside / "x.qcow2"): "not in one of the configured restore roots",
        str(roots) + "-twin/x.qcow2": "not in one of the configured restore roots",
        str(roots / ".." / "elsewhere" / "x.qcow2"): "not in one of the configured restore roots",
        str(roots / "taken.qcow2"): "already exists",
        str(roots / "dangling.qcow2"): "already exists",
        str(roots / "link" / "x.qcow2"): "reached through a symlink",
        str(roots / "missing" / "x.qcow2"): "is not a directory",
        str(roots / ".hidden"): "invalid file name",
        str(roots): "not in one of the configured restore roots",  # the root itself
    }
    for path, why in refused.items():
        with pytest.raises(RestoreError, match=why):
            check_disk_file(path)
    assert (roots / "taken.qcow2").read_text() == "mine"
    assert list(outside.iterdir()) == []


@pytest.mark.django_db
def test_the_request_refuses_an_unknown_disk_and_a_bad_file(roots, host):
    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="vm1")
    backup = Backup.objects.create(
        vm=vm, path=str(roots.parent / "b"), manifest={"disks": [{"target": "vda"}]}
    )
    with pytest.raises(requests.RestoreRefused, match="has no disk 'vdz'"):
        requests.request_disk_restore(backup, disk="vdz", to=str(roots / "x.qcow2"))
    with pytest.raises(requests.RestoreRefused, match="not in one of the configured"):
        requests.request_disk_restore(backup, disk="vda", to="/etc/x.qcow2")
    restore = requests.request_disk_restore(backup, disk="vda", to=str(roots / "x.qcow2"))
    assert (restore.mode, restore.disk, restore.name, restore.root) == (
        RestoreMode.DISK, "vda", "x.qcow2", str(roots),
    )  # fmt: skip
    with pytest.raises(CommandError, match="--disk TARGET and --to FILE go together"):
        call_command("vmbackup_restore", str(backup.pk), "--disk", "vda")
    with pytest.raises(CommandError, match="no --name"):
        call_command("vmbackup_restore", str(backup.pk), "--disk", "vda", "--to", "x", "--start")


@pytest.mark.django_db
@pytest.mark.libvirt
def test_it_restores_one_disk_of_an_incremental_identical_to_the_backup(
    domains, backup_root, synced, restore_root
):
    dom = domains.create(
        [DiskSpec("vda", "qcow2", 16, [(0, 2, 0xA1)]), DiskSpec("vdb", "raw", 8, [(1, 1, 0xB1)])],
        start=True,
    )
    vm = synced(dom)
    push(vm)
    write(domains, dom, 1, "write -P 0xd2 0 1M")
    reference = snapshot_copy(dom, "vdb", dom.dir)
    incremental = push(vm).backup
    assert incremental.kind == "incremental"
    write(domains, dom, 1, "write -P 0xe3 0 1M")  # after the backup: must not show up
    to = restore_root / "vdb-restored.raw"

    out = io.StringIO()
    call_command(
        "vmbackup_restore", str(incremental.pk), "--disk", "vdb", "--to", str(to), "--wait",
        stdout=out,
    )  # fmt: skip

    assert out.getvalue().splitlines()[-1] == str(to)
    assert os.stat(to).st_mode & 0o777 == 0o600
    assert sorted(p.name for p in restore_root.iterdir()) == [to.name]  # no partial left
    assert qemu_img.info(str(to), "raw").virtual_size == 8 << 20
    assert qemu_img.compare(str(reference), "qcow2", str(to), "raw")
    top = Path(incremental.path) / "vdb.qcow2"
    assert qemu_img.compare(str(top), "qcow2", str(to), "raw")  # the backup's disk, chain and all
    restore = incremental.restores.get()
    assert (restore.mode, restore.path, restore.domain_uuid) == (RestoreMode.DISK, str(to), "")


@pytest.mark.django_db
@pytest.mark.libvirt
def test_a_corrupt_chain_or_a_file_that_appeared_leaves_nothing_written(
    domains, backup_root, synced, restore_root
):
    dom = domains.create([DiskSpec("vda", "qcow2", 8, [(0, 2, 0xAB)])], start=True)
    backup = push(synced(dom)).backup
    to = restore_root / "vda.qcow2"

    appeared = requests.request_disk_restore(backup, disk="vda", to=str(to), enqueue=False)
    to.write_text("someone else's")
    jobs.run_restore(appeared.pk)
    appeared.refresh_from_db()
    assert appeared.status == RunStatus.FAILED and "already exists" in appeared.error
    assert to.read_text() == "someone else's"
    to.unlink()

    flip_byte(Path(backup.path) / "vda.qcow2")
    corrupt = requests.request_disk_restore(backup, disk="vda", to=str(to), enqueue=False)
    jobs.run_restore(corrupt.pk)
    corrupt.refresh_from_db()
    assert corrupt.status == RunStatus.FAILED
    assert "failed its check" in corrupt.error
    assert list(restore_root.iterdir()) == []  # neither the file nor its hidden partial
    assert not disk_restore.staging_path(corrupt).exists()
