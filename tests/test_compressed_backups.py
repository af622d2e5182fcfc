"""Compressed push backups, fulls and incrementals, against the real libvirtd and QEMU: no
socket directory to configure, restored exactly by the dashboard and by restore.sh."""

import os
import subprocess
from pathlib import Path

import pytest

from backups import archive, qemu_img, site
from backups.archive import check as archive_check
from backups.backup import push as pushing
from backups.models import BackupPolicy, RunStatus
from tests.domains import DiskSpec, make_dir
from tests.helpers import push, restore_now, snapshot_copy, write

MIB = 1024 * 1024
pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]


def paused_references(domains, dom, name: str) -> dict[str, Path]:
    """Every disk's content with the guest paused: what a backup taken now must hold."""
    refs = make_dir(dom.dir / name)
    guest = domains.lookup(dom)
    guest.suspend()
    try:
        return {target: snapshot_copy(dom, target, refs) for target in dom.disks}
    finally:
        guest.resume()


def assert_holds(backup_dir: Path, references: dict[str, Path]) -> None:
    assert archive_check.verify(backup_dir).ok, archive_check.verify(backup_dir).errors
    assert sorted(p.name for p in backup_dir.iterdir() if p.name.startswith(".")) == []
    for target, ref in references.items():
        image = str(backup_dir / f"{target}.qcow2")
        assert qemu_img.compare(str(ref), "qcow2", image, "qcow2")


def assert_restored(restore, references: dict[str, Path], formats: dict[str, str]) -> None:
    assert restore.status == RunStatus.SUCCEEDED, restore.error
    for target, ref in references.items():
        restored = Path(restore.path) / f"{target}.{formats[target]}"
        assert qemu_img.compare(str(ref), "qcow2", str(restored), formats[target])


def restore_sh(backup_dir: Path, dest: Path) -> None:
    done = subprocess.run(
        ["sh", str(backup_dir / "restore.sh"), str(dest)],
        cwd=dest,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def steps(run, name: str) -> list[dict]:
    return [e for e in run.journal if e["step"] == name]


@pytest.fixture
def zstd(db):
    return BackupPolicy.objects.create(name="z", schedule="", compression="zstd", full_every=7)


def test_it_compresses_a_full_and_an_incremental_and_restores_both_exactly(
    domains, backup_root, synced, settings, zstd, restore_root
):
    settings.VMBACKUP_NBD_DIR = ""  # nothing configured: the default socket directory
    dom = domains.create(
        [DiskSpec("vda", "qcow2", 64, [(0, 8, 0xA1)]), DiskSpec("vdb", "raw", 16, [(0, 2, 0xB1)])],
        start=True,
    )
    vm = synced(dom)
    first = paused_references(domains, dom, "ref0")
    full = push(vm, zstd)
    begin = steps(full, "backup-begin")[0]
    assert begin["mode"] == "pull"
    sockets = Path(pushing.DEFAULT_PULL_DIR)
    assert Path(begin["socket"]).parent == sockets / f"{site.site_id()}-{full.pk}"
    assert not Path(begin["socket"]).parent.exists()  # removed after the copy
    assert sockets.stat().st_mode & 0o777 == 0o711  # QEMU passes through, lists nothing
    assert full.backup.manifest["disks"][0]["bytes"] < 2 * MIB  # 8 MiB of one byte, compressed

    write(domains, dom, 0, "write -P 0xc2 1M 3M")
    write(domains, dom, 0, "write -z 6M 1M")  # zeros over the parent's data stay zeros
    write(domains, dom, 1, "write -P 0xd1 4M 1M")
    second = paused_references(domains, dom, "ref1")
    inc = push(vm, zstd)

    assert inc.kind == "incremental", inc.kind_reason
    assert [s["target"] for s in steps(inc, "compress")] == ["vda", "vdb"]
    manifest = archive.read_manifest(inc.backup.path)
    vda, vdb = manifest.disks
    assert vda.backing == f"../{Path(full.backup.path).name}/vda.qcow2"
    assert vdb.backing is None  # raw: copied whole, compressed too
    assert vda.bytes < MIB  # 4 MiB written, of two bytes: only the changed clusters, compressed
    assert_holds(Path(full.backup.path), first)
    assert_holds(Path(inc.backup.path), second)
    assert_restored(restore_now(full.backup, restore_root), first, dom.formats)
    assert_restored(restore_now(inc.backup, restore_root), second, dom.formats)
    dest = make_dir(restore_root / "by-hand")
    restore_sh(Path(inc.backup.path), dest)
    for target, ref in second.items():
        restored = str(dest / f"{target}.{dom.formats[target]}")
        assert qemu_img.compare(str(ref), "qcow2", restored, dom.formats[target])


def test_without_a_socket_directory_a_full_is_pushed_then_compressed(
    domains, backup_root, synced, zstd, monkeypatch
):
    monkeypatch.setattr(pushing, "pull_directory", lambda configured: None)
    dom = domains.create([DiskSpec("vda", "qcow2", 32, [(0, 8, 0xA1)])], start=True)
    vm = synced(dom)
    refs = paused_references(domains, dom, "ref")
    full = push(vm, zstd)
    assert "mode" not in steps(full, "backup-begin")[0]
    assert [s["target"] for s in steps(full, "compress")] == ["vda"]
    assert full.backup.manifest["disks"][0]["bytes"] < 2 * MIB
    assert_holds(Path(full.backup.path), refs)


def test_a_pull_qemu_refuses_becomes_a_push(domains, backup_root, synced, zstd, settings):
    """As when AppArmor keeps QEMU from binding the socket: here the path is too long."""
    settings.VMBACKUP_NBD_DIR = str(make_dir(backup_root / ("n" * 100)))
    dom = domains.create([DiskSpec("vda", "qcow2", 32, [(0, 8, 0xA1)])], start=True)
    vm = synced(dom)
    refs = paused_references(domains, dom, "ref")
    full = push(vm, zstd)
    assert [s["mode"] for s in steps(full, "backup-begin")[:1]] == ["pull"]
    assert steps(full, "pull-refused")[0]["error"]
    assert [s["target"] for s in steps(full, "compress")] == ["vda"]
    assert_holds(Path(full.backup.path), refs)
    assert list(Path(settings.VMBACKUP_NBD_DIR).iterdir()) == []
    assert domains.lookup(dom).jobStats().get("type", 0) == 0
    assert [c.getName() for c in domains.lookup(dom).listAllCheckpoints()] == [
        full.backup.checkpoint
    ]


def test_it_makes_a_full_when_a_header_of_the_chain_is_wrong(domains, backup_root, synced, zstd):
    """convert -B would open the parent's chain: a header naming anything else stops it."""
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0xA1)])], start=True)
    vm = synced(dom)
    full = push(vm, zstd).backup
    image = Path(full.path) / "vda.qcow2"
    os.unlink(image)
    qemu_img.create(str(image), "qcow2", 16 * MIB, backing="/etc/hostname", backing_fmt="raw")
    write(domains, dom, 0, "write -P 0x77 2M 1M")
    r = push(vm, zstd)
    assert r.kind == "full"
    assert f"backup {Path(full.path).name} of the chain failed its header check" in r.kind_reason
    assert "/etc/hostname" in r.kind_reason


def test_the_socket_directory_is_the_setting_else_run(tmp_path, monkeypatch):
    assert pushing.pull_directory("/srv/nbd") == "/srv/nbd"
    monkeypatch.setattr(pushing, "DEFAULT_PULL_DIR", str(tmp_path / "vmbackup"))
    assert pushing.pull_directory("") == str(tmp_path / "vmbackup")
    monkeypatch.setattr(pushing, "DEFAULT_PULL_DIR", str(tmp_path / "missing" / "vmbackup"))
    assert pushing.pull_directory("") is None
