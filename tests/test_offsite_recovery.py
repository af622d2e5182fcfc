"""Disaster recovery from the offsite repository alone, for a local-path repository and an
SFTP one (OpenSSH on 127.0.0.1): push a full and two incrementals of a real TCG domain,
copy them; lose the backup root and the database; ``vmbackup_offsite import`` into a new
installation; restore each point as a new domain from the repository and compare it with
the disk as it was at backup time (taken with the guest paused). Then a byte flipped in a
pack file: ``check --read-data-subset 100%`` finds it and a restore from that snapshot is
refused with restic's reason, leaving nothing behind."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from backups import jobs, qemu_img, restic
from backups.models import (
    Backup,
    BackupPolicy,
    BackupRun,
    Installation,
    OffsiteCopy,
    OffsiteRepository,
    Restore,
    RunStatus,
    VirtualMachine,
)
from backups.offsite import restic_repository
from tests.domains import DiskSpec, make_dir, run
from tests.helpers import flip_byte, push, restore_now, snapshot_copy, write

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.libvirt,
    pytest.mark.skipif(not shutil.which("restic"), reason="restic is required"),
]
MIB = 1024 * 1024


@pytest.fixture(params=["local", "sftp"])
def repository(request, offsite, tmp_path, settings) -> tuple[OffsiteRepository, Path]:
    """The repository the policy copies to, and the directory its files are in."""
    if request.param == "local":
        return offsite, Path(offsite.url)
    server = request.getfixturevalue("sftp_server")
    settings.VMBACKUP_SSH_CONFIG = str(server.config)
    files = tmp_path / "sftp-repo"
    model = OffsiteRepository.objects.create(
        name="over-sftp", url=server.url(files), password_file=offsite.password_file
    )
    restic.init(restic_repository(model))
    return model, files


def paused_reference(domains, dom, dest: Path, label: str) -> Path:
    """The disk as the guest has it now, copied while the guest is paused."""
    guest = domains.lookup(dom)
    guest.suspend()
    try:
        out = snapshot_copy(dom, "vda", make_dir(dest / label))
    finally:
        guest.resume()
    return out


def copy(backup) -> OffsiteCopy:
    found = OffsiteCopy.objects.filter(backup=backup, via__isnull=True).latest("pk")
    jobs.copy_offsite(found.pk)
    found.refresh_from_db()
    assert found.status == RunStatus.SUCCEEDED, found.error
    return found


def packs(files: Path) -> set[Path]:
    return {p for p in (files / "data").rglob("*") if p.is_file()}


def lose_everything(backup_root: Path, tmp_path: Path, settings) -> None:
    """What a disaster leaves: no backup directories, no database rows, a new data dir."""
    OffsiteCopy.objects.all().delete()
    Restore.objects.all().delete()
    for backup in Backup.objects.order_by("-created_at", "-pk"):  # children first
        backup.delete()
    BackupRun.objects.all().delete()
    BackupPolicy.objects.all().delete()
    OffsiteRepository.objects.all().delete()
    VirtualMachine.objects.all().delete()
    Installation.objects.all().delete()
    for child in backup_root.iterdir():
        shutil.rmtree(child)
    settings.VMBACKUP_RESTIC_CACHE_DIR = str(tmp_path / "new-data" / "restic-cache")


def offsite_import(url: str, password_file: str) -> str:
    out = io.StringIO()
    call_command(
        "vmbackup_offsite", "import", "--repo", url, "--password-file", password_file,
        "--name", "dr", stdout=out,
    )  # fmt: skip
    return out.getvalue()


def test_a_new_installation_restores_every_point_from_the_repository_alone(
    domains, backup_root, synced, restore_root, repository, tmp_path, settings
):
    model, files = repository
    dom = domains.create([DiskSpec("vda", "qcow2", 32, [(0, 2, 0xA1)])])
    noise = tmp_path / "noise"
    marker = b"vmbackup-dr-marker-" + os.urandom(16).hex().encode()
    noise.write_bytes(os.urandom(6 * MIB) + marker * 1000)
    run(["qemu-io", "-f", "qcow2", "-c", f"write -s {noise} 4M {noise.stat().st_size}",
         str(dom.disks["vda"])])  # fmt: skip
    domains.lookup(dom).create()
    vm = synced(dom)
    policy = BackupPolicy.objects.create(name="dr", offsite=model, schedule="")
    policy.vms.add(vm)

    refs, points = [], []
    for step, command in enumerate(["", "write -P 0xc1 20M 1M", "write -P 0xc2 26M 1M"]):
        if command:
            write(domains, dom, 0, command)
        points.append(push(vm, policy).backup)
        refs.append(paused_reference(domains, dom, tmp_path / "refs", str(step)))
        copy(points[-1])
        if step == 0:
            full_packs = packs(files)
    assert [b.kind for b in points] == ["full", "incremental", "incremental"]
    leaks = [p for p in files.rglob("*") if p.is_file() and marker in p.read_bytes()]
    assert leaks == []  # encrypted at rest, over SFTP too

    url, password_file = model.url, model.password_file
    lose_everything(backup_root, tmp_path, settings)

    output = offsite_import(url, password_file)
    assert "VM " + vm.name + ": known only from the offsite copy" in output
    assert output.splitlines()[-1].startswith("imported 3 backups of 1 new VMs from dr")
    dr = OffsiteRepository.objects.get(name="dr")
    imported = list(Backup.objects.order_by("created_at", "pk"))
    assert [b.kind for b in imported] == ["full", "incremental", "incremental"]
    assert [b.parent for b in imported] == [None, imported[0], imported[1]]
    assert all(b.offsite_only and b.pruned_at for b in imported)
    assert VirtualMachine.objects.get().offsite_only
    assert OffsiteCopy.objects.filter(repository=dr, status=RunStatus.SUCCEEDED).count() == 3

    for backup, ref in zip(imported, refs, strict=True):
        restore = restore_now(backup, restore_root)
        assert restore.status == RunStatus.SUCCEEDED, restore.error
        assert restore.repository == dr
        assert "fetch" in [entry["step"] for entry in restore.journal]
        restored = restore_root / restore.name / "vda.qcow2"
        assert qemu_img.compare(str(ref), "qcow2", str(restored), "qcow2")
    assert [p.name for p in backup_root.iterdir()] == []  # staging removed each time

    again = offsite_import(url, password_file)
    assert again.splitlines()[-1].startswith("imported 0 backups of 0 new VMs from dr")
    assert "3 known before" in again

    flip_byte(max(full_packs, key=lambda p: p.stat().st_size), offset=4096)
    with pytest.raises(CommandError):
        call_command(
            "vmbackup_offsite", "check", "--read-data-subset", "100%", stdout=io.StringIO()
        )
    before = sorted(p.name for p in restore_root.iterdir())
    refused = restore_now(imported[0], restore_root)
    assert refused.status == RunStatus.FAILED
    assert "is damaged, not restoring" in refused.error, refused.error
    assert "ciphertext verification failed" in refused.error
    assert sorted(p.name for p in restore_root.iterdir()) == before
    assert [p.name for p in backup_root.iterdir()] == []
