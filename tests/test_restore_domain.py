"""Restoring a backup as a new domain, against the real libvirtd and QEMU."""

import os
import socket
import subprocess
import uuid
from pathlib import Path

import libvirt
import pytest

from backups import hypervisor, jobs, qemu_img, reconcile, requests
from backups.models import Backup, Restore, RunStatus, VirtualMachine
from backups.restore import common, new_domain
from tests.domains import BASE, PREFIX, DiskSpec, make_dir
from tests.helpers import (
    assert_private,
    modes_at_copy,
    new_name,
    push,
    restore_now,
    snapshot_copy,
    write,
)

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]


def test_it_restores_an_incremental_as_a_new_domain_that_starts(domains, backup_root, synced,
                                                                restore_root,
                                                                monkeypatch):  # fmt: skip
    dom = domains.create(
        [DiskSpec("vda", "qcow2", 32, [(0, 4, 0xA1)]), DiskSpec("vdb", "raw", 8, [(1, 1, 0xB1)])],
        start=True,
        nvram=True,
    )
    vm = synced(dom)
    push(vm)
    write(domains, dom, 0, "write -P 0xc2 2M 3M")
    write(domains, dom, 1, "write -P 0xd2 0 1M")
    refs = make_dir(dom.dir / "ref")
    references = {t: snapshot_copy(dom, t, refs) for t in dom.disks}
    incremental = push(vm).backup
    assert incremental.kind == "incremental"
    write(domains, dom, 0, "write -P 0xe3 0 1M")  # after the backup: must not show up

    copying = modes_at_copy(monkeypatch)
    restore = restore_now(incremental, restore_root, start=True)

    assert restore.status == RunStatus.SUCCEEDED, restore.error
    final = restore_root / restore.name
    assert sorted(copying.values()) == [0o600, 0o600]  # private before the first byte
    # written around the page cache: nothing reads a restored disk back soon
    assert [e["direct"] for e in restore.journal if e["step"] == "convert"] == [True, True]
    # search-only: QEMU's user (which libvirt gives the files at start) must reach them
    assert_private(final, {final: 0o711})
    assert Path(restore.path) == final
    assert sorted(p.name for p in restore_root.iterdir()) == [restore.name]
    for target, fmt in dom.formats.items():
        restored = final / f"{target}.{fmt}"
        assert qemu_img.info(str(restored), fmt, force_share=True).backing_filename is None
        assert qemu_img.compare(str(references[target]), "qcow2", str(restored), fmt)
    new = domains.conn.lookupByName(restore.name)
    assert new.UUIDString() == restore.domain_uuid != dom.uuid
    assert new.isActive()
    listed = VirtualMachine.objects.get(uuid=restore.domain_uuid)  # at once, not at a sync
    assert listed.name == restore.name and listed.gone_at is None
    xml = new.XMLDesc(0)
    assert f"file='{final / 'vda.qcow2'}'" in xml and f"file='{final / 'vdb.raw'}'" in xml
    assert str(final / "nvram.fd") in xml
    # the original is untouched: still running on its own disks
    original = domains.lookup(dom)
    assert original.isActive()
    for path in dom.disks.values():
        assert f"file='{path}'" in original.XMLDesc(0)


def test_it_gives_the_new_domain_fresh_mac_addresses(domains, backup_root, synced,
                                                     restore_root):  # fmt: skip
    dom = domains.create([DiskSpec("vda", "qcow2", 8)], cdrom=True)
    d = domains.lookup(dom)
    xml = d.XMLDesc(0).replace(
        "</devices>",
        "<interface type='user'><mac address='52:54:00:12:34:56'/></interface></devices>",
    )
    domains.conn.defineXML(xml)
    vm = synced(dom)
    run = requests.request_backup(vm, method="offline", enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()

    restore = restore_now(run.backup, restore_root)

    assert restore.status == RunStatus.SUCCEEDED, restore.error
    new_xml = domains.conn.lookupByName(restore.name).XMLDesc(0)
    assert "52:54:00:12:34:56" not in new_xml
    assert "<mac address=" in new_xml  # libvirt made a new one
    assert "device='cdrom'" in new_xml  # not backed up, but kept as defined: no note
    assert restore.notes == []


def test_it_refuses_a_name_in_use_and_writes_nothing(domains, backup_root, synced, restore_root):
    dom = domains.create([DiskSpec("vda", "qcow2", 8)], start=True)
    backup = push(synced(dom)).backup

    restore = restore_now(backup, restore_root, name=dom.name)

    assert restore.status == RunStatus.FAILED
    assert f"a domain named {dom.name} already exists" in restore.error
    assert list(restore_root.iterdir()) == []


def test_it_refuses_a_corrupt_chain_and_leaves_nothing(domains, backup_root, synced,
                                                       restore_root):  # fmt: skip
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 4, 0x5A)])], start=True)
    vm = synced(dom)
    full = push(vm).backup
    write(domains, dom, 0, "write -P 0x77 8M 1M")
    incremental = push(vm).backup
    image = Path(full.path) / "vda.qcow2"
    with open(image, "r+b") as f:  # one flipped byte in the parent's data
        f.seek(image.stat().st_size - 4096)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))

    restore = restore_now(incremental, restore_root)

    assert restore.status == RunStatus.FAILED
    assert f"backup {Path(full.path).name} failed its check" in restore.error
    assert list(restore_root.iterdir()) == []
    with pytest.raises(libvirt.libvirtError):
        domains.conn.lookupByName(restore.name)


def test_a_failed_define_removes_the_restored_files(domains, backup_root, synced, restore_root,
                                                   monkeypatch):  # fmt: skip
    dom = domains.create([DiskSpec("vda", "qcow2", 8)], start=True)
    backup = push(synced(dom)).backup

    def refuse(self, xml):
        raise hypervisor.HypervisorError("define domain: injected failure")

    monkeypatch.setattr(hypervisor.Session, "define", refuse)
    restore = restore_now(backup, restore_root)

    assert restore.status == RunStatus.FAILED
    assert "injected failure" in restore.error
    assert list(restore_root.iterdir()) == []
    assert [s["step"] for s in restore.journal][-1] == "define"


def test_it_refuses_a_root_too_small_before_writing(domains, backup_root, synced, settings):
    mount = make_dir(BASE / f"{PREFIX}tmpfs-{uuid.uuid4().hex[:8]}")
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mount)],
        check=True,
        timeout=30,
    )
    try:
        settings.VMBACKUP_RESTORE_ROOTS = [str(mount)]
        dom = domains.create([DiskSpec("vda", "qcow2", 32, [(0, 16, 0x42)])], start=True)
        backup = push(synced(dom)).backup

        restore = restore_now(backup, mount)

        assert restore.status == RunStatus.FAILED
        assert restore.error.startswith(f"not enough space at {mount}")
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)
        mount.rmdir()


def test_it_refuses_while_a_backup_of_the_vm_runs(domains, backup_root, synced, restore_root):
    dom = domains.create([DiskSpec("vda", "qcow2", 8)], start=True)
    vm = synced(dom)
    backup = push(vm).backup
    requests.request_backup(vm, method="push", enqueue=False)  # queued: holds the VM's slot

    restore = restore_now(backup, restore_root)

    assert restore.status == RunStatus.FAILED
    assert "a backup of" in restore.error and "is running" in restore.error
    assert list(restore_root.iterdir()) == []


def test_reconcile_interrupts_a_dead_restore_and_removes_its_staging(db, restore_root,
                                                                    host):  # fmt: skip
    from backups.models import VirtualMachine

    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="gone-vm")
    backup = Backup.objects.create(vm=vm, path=str(restore_root.parent / "nowhere"))
    restore = Restore.objects.create(
        backup=backup,
        name=new_name(),
        root=str(restore_root),
        status=RunStatus.RUNNING,
        worker=f"{socket.gethostname()}:999999999",  # no such pid
        journal=[{"step": "convert"}],
    )
    staging = make_dir(new_domain.staging_paths(restore)[0])
    (staging / "vda.qcow2").write_bytes(b"half")

    report = reconcile.reconcile()

    restore.refresh_from_db()
    assert restore.status == RunStatus.INTERRUPTED
    assert report.restores_interrupted == [restore.pk]
    assert not staging.exists()


def test_a_second_delivery_is_a_no_op(db, restore_root, host):
    from backups.models import VirtualMachine

    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="vm")
    backup = Backup.objects.create(vm=vm, path=str(restore_root.parent / "nowhere"))
    restore = Restore.objects.create(
        backup=backup, name=new_name(), root=str(restore_root), status=RunStatus.SUCCEEDED
    )
    assert jobs.run_restore(restore.pk) == "not claimed"


def test_vmbackup_restore_restores_and_prints_the_directory(domains, backup_root, synced,
                                                            restore_root):  # fmt: skip
    from io import StringIO

    from django.core.management import call_command

    dom = domains.create([DiskSpec("vda", "qcow2", 8, [(0, 2, 0x33)])], start=True)
    backup = push(synced(dom)).backup
    name = new_name()
    out = StringIO()

    call_command("vmbackup_restore", backup.path, "--name", name, "--wait", stdout=out)

    lines = out.getvalue().splitlines()
    assert lines[-1] == str(restore_root / name)
    assert qemu_img.compare(str(backup.path) + "/vda.qcow2", "qcow2",
                            str(restore_root / name / "vda.qcow2"), "qcow2")  # fmt: skip
    assert domains.conn.lookupByName(name).UUIDString() != dom.uuid


def test_vmbackup_restore_fails_with_the_reason(domains, backup_root, synced, restore_root):
    from django.core.management import CommandError, call_command

    dom = domains.create([DiskSpec("vda", "qcow2", 8)], start=True)
    backup = push(synced(dom)).backup

    with pytest.raises(CommandError, match=f"a domain named {dom.name} already exists"):
        call_command("vmbackup_restore", str(backup.pk), "--name", dom.name, "--wait")
    with pytest.raises(CommandError, match="invalid domain name"):
        call_command("vmbackup_restore", str(backup.pk), "--name", "../evil", "--wait")
    with pytest.raises(CommandError, match="not one of the configured restore roots"):
        call_command("vmbackup_restore", str(backup.pk), "--name", "x", "--root", "/etc")
    assert list(restore_root.iterdir()) == []


def test_a_chain_pruned_during_the_restore_is_not_used(domains, backup_root, synced,
                                                       restore_root, monkeypatch):  # fmt: skip

    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 4, 0x5A)])], start=True)
    vm = synced(dom)
    full = push(vm).backup
    write(domains, dom, 0, "write -P 0x77 8M 1M")
    incremental = push(vm).backup
    real_flatten = new_domain.flatten

    def flatten_while_pruned(*args):
        real_flatten(*args)
        image = Path(full.path) / "vda.qcow2"  # as a fold's rebase would touch it
        os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 1))

    monkeypatch.setattr(new_domain, "flatten", flatten_while_pruned)
    restore = restore_now(incremental, restore_root)

    assert restore.status == RunStatus.FAILED
    assert "chain changed while it was being restored" in restore.error
    assert list(restore_root.iterdir()) == []


def test_it_refuses_an_image_reading_a_backup_beside_its_parent(
    domains, backup_root, synced, restore_root
):
    """A hand-edited but self-consistent backup (sums rewritten) whose image reads another
    backup than its manifest's parent: that other backup was never checked."""
    import hashlib
    import json

    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 2, 0x5A)])], start=True)
    vm = synced(dom)
    push(vm)
    write(domains, dom, 0, "write -P 0x61 4M 1M")
    middle = push(vm).backup
    write(domains, dom, 0, "write -P 0x62 5M 1M")
    run = requests.request_backup(vm, method="snapshot", enqueue=False)  # a full beside the chain
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    directory = Path(middle.path)
    stranger = f"../{Path(run.backup.path).name}/vda.qcow2"
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", stranger, "-F", "qcow2",
                    str(directory / "vda.qcow2")], check=True, timeout=60)  # fmt: skip
    data = json.loads((directory / "backup.json").read_text())
    data["disks"][0]["backing"] = stranger
    (directory / "backup.json").write_text(json.dumps(data))
    sums = {}
    for line in (directory / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        if name in ("backup.json", "vda.qcow2"):
            digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
            if name == "vda.qcow2":
                data["disks"][0]["sha256"] = digest
                (directory / "backup.json").write_text(json.dumps(data))
        sums[name] = digest
    sums["backup.json"] = hashlib.sha256((directory / "backup.json").read_bytes()).hexdigest()
    (directory / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in sums.items()))

    restore = restore_now(middle, restore_root)

    assert restore.status == RunStatus.FAILED
    assert f"builds on {Path(run.backup.path).name}, not on its parent" in restore.error
    assert list(restore_root.iterdir()) == []


def test_a_cancelled_restore_stops_before_writing(domains, backup_root, synced, restore_root):
    dom = domains.create([DiskSpec("vda", "qcow2", 8)], start=True)
    backup = push(synced(dom)).backup
    restore = requests.request_restore(backup, name=new_name(), root=str(restore_root),
                                   enqueue=False)  # fmt: skip
    Restore.objects.filter(pk=restore.pk).update(cancel_requested=True)  # as if asked meanwhile

    jobs.run_restore(restore.pk)

    restore.refresh_from_db()
    assert restore.status == RunStatus.CANCELLED and restore.error == "cancelled by user"
    assert list(restore_root.iterdir()) == []


def test_a_cancel_stops_the_copy_mid_disk(domains, backup_root, synced, restore_root,
                                          monkeypatch):  # fmt: skip

    dom = domains.create([DiskSpec("vda", "qcow2", 256, [(0, 200, 0x3C)])], start=True)
    backup = push(synced(dom)).backup
    real_convert = common.qemu_img.convert
    seen = []

    def convert(*args, progress=None, **kwargs):
        Restore.objects.update(cancel_requested=True)  # the user clicks while it copies

        def report(fraction):
            seen.append(fraction)
            progress(fraction)

        real_convert(*args, progress=report, **kwargs)

    monkeypatch.setattr(common.qemu_img, "convert", convert)
    monkeypatch.setattr(common.qemu_img, "PROGRESS_INTERVAL", 0)  # every percent
    monkeypatch.setattr(common, "CANCEL_CHECK_EVERY", 0)
    restore = restore_now(backup, restore_root)

    assert restore.status == RunStatus.CANCELLED
    assert seen and seen[-1] < 1.0  # stopped inside the disk, not after it
    assert list(restore_root.iterdir()) == []
