"""Incremental push backups with checkpoints, against the real libvirtd and QEMU."""

import shutil
from pathlib import Path

import pytest

from backups import archive, qemu_img, site
from backups.archive import check as archive_check
from backups.models import BackupPolicy
from tests.domains import DiskSpec, make_dir, run
from tests.helpers import push, snapshot_copy, write

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]


def our_checkpoints(domains, dom):
    return [c.getName() for c in domains.lookup(dom).listAllCheckpoints()]


def test_it_restores_each_of_five_points_in_time_exactly(domains, backup_root, synced):
    dom = domains.create(
        [DiskSpec("vda", "qcow2", 64, [(0, 8, 0xA1)]), DiskSpec("vdb", "raw", 16, [(0, 1, 0xB1)])],
        start=True,
    )
    vm = synced(dom)
    writes = [
        None,
        "write -P 0xc2 1M 3M",
        "write -z 0 2M",  # zeroed ranges must read as zeros, not the parent's data
        "write -P 0xc4 40M 5M",
        "write -z 41M 1M",
    ]
    points = []
    for i, command in enumerate(writes):
        if command:
            write(domains, dom, 0, command)
            write(domains, dom, 1, f"write -P {0xD0 + i} {i}M 1M")
        refs = make_dir(dom.dir / f"ref{i}")
        references = {t: snapshot_copy(dom, t, refs) for t in dom.disks}
        r = push(vm)
        assert r.kind == ("full" if i == 0 else "incremental"), r.kind_reason
        points.append((r, references))

    for r, references in points:
        path = Path(r.backup.path)
        for target, ref in references.items():
            assert qemu_img.compare(str(ref), "qcow2", str(path / f"{target}.qcow2"), "qcow2")
        assert archive_check.verify(path).ok
    last = points[-1][0].backup
    assert last.parent == points[-2][0].backup
    manifest = archive.read_manifest(last.path)
    vda = next(d for d in manifest.disks if d.target == "vda")
    assert vda.backing == f"../{Path(points[-2][0].backup.path).name}/vda.qcow2"
    vdb = next(d for d in manifest.disks if d.target == "vdb")
    assert vdb.backing is None  # raw disks have no bitmap: copied whole every time
    assert qemu_img.info(str(Path(last.path) / "vda.qcow2"), "qcow2").backing_filename == (
        vda.backing
    )
    assert our_checkpoints(domains, dom) == [last.checkpoint]


def test_it_is_much_smaller_than_the_full(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 64, [(0, 40, 0xA1)])], start=True)
    vm = synced(dom)
    full = push(vm)
    write(domains, dom, 0, "write -P 0x5a 50M 2M")
    inc = push(vm)
    assert inc.kind == "incremental"
    assert inc.backup.manifest["disks"][0]["bytes"] < 4 * 1024 * 1024
    assert full.backup.manifest["disks"][0]["bytes"] > 40 * 1024 * 1024


def test_it_falls_back_to_a_full_when_the_checkpoint_is_lost(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0xA1)])], start=True)
    vm = synced(dom)
    first = push(vm)
    domains.lookup(dom).checkpointLookupByName(first.backup.checkpoint).delete(0)
    r = push(vm)
    assert r.kind == "full"
    assert f"checkpoint {first.backup.checkpoint} lost and could not be redefined" in (
        r.kind_reason
    )


def test_it_redefines_a_checkpoint_libvirt_forgot(domains, backup_root, synced):
    import libvirt

    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0xA1)])], start=True)
    vm = synced(dom)
    first = push(vm)
    cp = domains.lookup(dom).checkpointLookupByName(first.backup.checkpoint)
    cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    write(domains, dom, 0, "write -P 0x77 2M 1M")
    r = push(vm)
    assert r.kind == "incremental", r.kind_reason


def test_it_falls_back_to_a_full_when_the_parent_is_deleted(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0xA1)])], start=True)
    vm = synced(dom)
    first = push(vm)
    shutil.rmtree(first.backup.path)
    r = push(vm)
    assert (r.kind, r.kind_reason) == ("full", "the last backup's directory is missing")


def test_it_falls_back_to_a_full_when_a_disk_is_added(domains, backup_root, synced):
    import libvirt

    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0xA1)])], start=True)
    vm = synced(dom)
    push(vm)
    extra = dom.dir / "vdc.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(extra), "8M"])
    xml = (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{extra}'/><target dev='vdc' bus='virtio'/></disk>"
    )
    domains.lookup(dom).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    r = push(vm)
    assert (r.kind, r.kind_reason) == ("full", "disk added: vdc")


def test_it_makes_a_full_every_n(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0xA1)])], start=True)
    vm = synced(dom)
    policy = BackupPolicy.objects.create(name="p", full_every=2, schedule="")
    kinds = [push(vm, policy).kind for _ in range(4)]
    assert kinds == ["full", "incremental", "incremental", "full"]


def test_it_never_deletes_a_checkpoint_it_did_not_create(domains, backup_root, synced):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0xA1)])], start=True)
    vm = synced(dom)
    push(vm)
    # a stranger's, and another installation's (its own site id) on the same libvirt host
    for name in ("theirs", "vmbackup-0badcafe-7", "vmbackup-7"):
        domains.lookup(dom).checkpointCreateXML(
            f"<domaincheckpoint><name>{name}</name>"
            "<disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>"
        )
        write(domains, dom, 0, "write -P 0x66 3M 1M")
    last = push(vm)
    push(vm)
    names = our_checkpoints(domains, dom)
    assert {"theirs", "vmbackup-0badcafe-7", "vmbackup-7"} <= set(names)
    assert last.backup.checkpoint not in names  # ours, superseded: dropped
    assert last.backup.checkpoint.startswith(f"vmbackup-{site.site_id()}-")


def test_it_never_chains_across_policies_or_directories(domains, backup_root, synced, allow_root):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 1, 0xA1)])], start=True)
    vm = synced(dom)
    elsewhere = allow_root(make_dir(backup_root / "nas"))
    nas = BackupPolicy.objects.create(name="nas", schedule="", destination=str(elsewhere))
    assert push(vm, nas).kind == "full"
    manual = push(vm)  # no policy: VMBACKUP_ROOT, its own chain
    assert (manual.kind, manual.kind_reason) == ("full", "first backup of this VM here")
    assert push(vm, nas).kind == "incremental"
    domains.lookup(dom).destroy()
    domains.lookup(dom).rename(dom.name + "-new", 0)  # a new name is a new directory
    domains.lookup(dom).create()
    renamed = push(vm, nas)
    assert renamed.kind == "full"
    assert Path(renamed.backup.path).parent.name == dom.name + "-new"
