"""Every backup method against the real libvirtd and QEMU (TCG guests)."""

import os
import subprocess
from pathlib import Path

import pytest

from backups import jobs, qemu_img, requests
from backups.models import RunStatus
from tests.domains import DiskSpec, make_dir
from tests.helpers import assert_images_equal, assert_private, assert_vm_untouched

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]


def backup(vm, method):
    run = requests.request_backup(vm, method=method, enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    return run


def assert_restorable(dom, backup_dir: Path, tmp_dir: Path):
    sums = subprocess.run(
        ["sha256sum", "-c", "SHA256SUMS"], cwd=backup_dir, capture_output=True, timeout=60
    )
    assert sums.returncode == 0, sums.stdout + sums.stderr
    dest = make_dir(tmp_dir / "restored")
    done = subprocess.run(
        ["sh", str(backup_dir / "restore.sh"), str(dest)],
        cwd=dest,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for target, path in dom.disks.items():
        fmt = dom.formats[target]
        restored = dest / f"{target}.{fmt}"
        assert qemu_img.compare(str(path), fmt, str(restored), fmt)


@pytest.mark.parametrize(
    "method,running,consistency",
    [
        ("offline", False, "offline"),
        ("push", True, "crash-consistent"),
        ("snapshot", True, "crash-consistent"),
        ("memory", True, "with-ram"),
    ],
)
def test_it_backs_up_a_qcow2_and_a_raw_disk(
    method, running, consistency, domains, backup_root, synced
):
    dom = domains.create(start=running)
    vm = synced(dom)
    run = backup(vm, method)
    path = Path(run.backup.path)
    assert path.parent == backup_root / dom.name
    assert run.method == method
    assert run.consistency == consistency
    assert_images_equal(dom, path)
    assert_restorable(dom, path, dom.dir)
    assert_vm_untouched(domains, dom, running)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]
    images = sum((path / f"{t}.qcow2").stat().st_size for t in dom.disks)
    assert run.bytes_hashed == run.bytes_to_hash >= images  # the checksum pass, reported
    if method == "memory":
        assert (path / "memory.save").stat().st_size > 0
    assert_private(backup_root / dom.name)  # the VM's directory, the backup, every file
    assert all(p.stat().st_uid == os.getuid() for p in path.rglob("*"))


def test_it_picks_offline_for_a_shut_off_domain_and_push_for_a_running_one(
    domains, backup_root, synced
):
    off = synced(domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0x11)])]))
    on = synced(domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0x12)])], start=True))
    assert backup(off, "auto").method == "offline"
    run = backup(on, "auto")
    assert run.method == "push" and "running" in run.method_reason


def test_it_works_for_a_name_with_a_space_and_a_quote(domains, backup_root, synced):
    dom = domains.create(name="vmbt-it's a vm", start=True)
    vm = synced(dom)
    run = backup(vm, "snapshot")
    path = Path(run.backup.path)
    assert path.parent.name == "vmbt-it's a vm"
    assert_images_equal(dom, path)
    assert_restorable(dom, path, dom.dir)


def test_it_skips_cdrom_and_records_why(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0x13)])], cdrom=True)
    run = backup(synced(dom), "offline")
    skipped = run.backup.manifest["skipped"]
    assert {"target": "sdc", "reason": "cdrom device"} in [dict(s) for s in skipped]


def test_it_copies_uefi_nvram(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0x14)])], nvram=True)
    # libvirt creates the variable store from its template at first start; make one now
    os.makedirs(dom.dir, exist_ok=True)
    dom.nvram.write_bytes(b"\x01" * 4096)
    run = backup(synced(dom), "offline")
    assert (Path(run.backup.path) / "nvram.fd").read_bytes() == b"\x01" * 4096
    assert_private(backup_root / dom.name)


def test_it_copies_the_emulated_tpm_state(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0x15)])], start=True, tpm=True)
    run = backup(synced(dom), "push")
    state = Path("/var/lib/libvirt/swtpm", dom.uuid, "tpm2", "tpm2-00.permall")
    copied = Path(run.backup.path, "tpm", "tpm2", "tpm2-00.permall")
    assert copied.read_bytes() == state.read_bytes()
    assert run.backup.manifest["tpm"] == "tpm"
    assert_private(backup_root / dom.name)
    assert_restorable(dom, Path(run.backup.path), dom.dir)


def test_it_can_pull_a_full_backup_over_nbd_with_compression(
    domains, backup_root, synced, settings
):
    from backups.models import BackupPolicy

    settings.VMBACKUP_NBD_DIR = str(make_dir(backup_root / "nbd"))
    policy = BackupPolicy.objects.create(name="z", schedule="", compression="zstd")
    dom = domains.create(start=True)
    vm = synced(dom)
    r = requests.request_backup(vm, method="push", enqueue=False, policy=policy)
    jobs.run_backup(r.pk)
    r.refresh_from_db()
    assert r.status == RunStatus.SUCCEEDED, r.error
    assert next(e for e in r.journal if e["step"] == "backup-begin")["mode"] == "pull"
    path = Path(r.backup.path)
    assert_images_equal(dom, path)
    assert_vm_untouched(domains, dom, running=True)
    assert not list(Path(settings.VMBACKUP_NBD_DIR).iterdir())  # socket dir removed
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".")) == []
    assert_private(backup_root / dom.name)
    # QEMU passes through the pull directory to its socket; nobody lists it
    assert_private(Path(settings.VMBACKUP_NBD_DIR), {Path(settings.VMBACKUP_NBD_DIR): 0o711})


def test_it_creates_a_missing_root_search_only_and_all_below_private(
    domains, backup_root, synced, settings
):
    root = backup_root / "new" / "root"
    settings.VMBACKUP_ROOT = str(root)
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0x16)])])
    backup(synced(dom), "offline")
    # QEMU (another user) must pass through a root to write push targets; it lists nothing
    assert_private(root.parent, {root.parent: 0o711, root: 0o711})
