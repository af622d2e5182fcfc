"""Offsite copies of real push backups of a real TCG domain into a real restic repository
(a local path in a temporary directory): chain order, encryption at rest, deduplication,
and the snapshot layout that lets a chain be rebuilt from the repository alone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from backups import jobs, qemu_img, requests, restic
from backups.models import BackupPolicy, CopyTrigger, OffsiteCopy, RunStatus
from backups.offsite import restic_repository
from tests.domains import DiskSpec, run
from tests.helpers import push, sha256sum_check, write

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.libvirt,
    pytest.mark.skipif(not shutil.which("restic"), reason="restic is required"),
]
MIB = 1024 * 1024


def policy_for(vm, repository, **fields) -> BackupPolicy:
    policy = BackupPolicy.objects.create(
        name=f"with-{repository.name}", offsite=repository, schedule="", **fields
    )
    policy.vms.add(vm)
    return policy


def run_copy(copy: OffsiteCopy) -> OffsiteCopy:
    jobs.copy_offsite(copy.pk)
    copy.refresh_from_db()
    assert copy.status == RunStatus.SUCCEEDED, copy.error
    return copy


def repo_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def test_a_chain_is_copied_in_order_and_rebuilt_from_the_repository_alone(
    domains, backup_root, synced, offsite, tmp_path
):
    marker = ("vmbackup-offsite-marker-" + os.urandom(24).hex() + "\n").encode() * 64
    dom = domains.create([DiskSpec("vda", "qcow2", 64, [(0, 4, 0xA1)])])
    (tmp_path / "marker").write_bytes(marker)
    run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            f"write -s {tmp_path / 'marker'} 8M {len(marker)}",
            str(dom.disks["vda"]),
        ]
    )
    domains.lookup(dom).create()
    vm = synced(dom)
    policy = policy_for(vm, offsite)

    full = push(vm, policy)
    (first,) = OffsiteCopy.objects.all()  # requested by the backup, left queued here
    assert (first.backup, first.trigger) == (full.backup, CopyTrigger.AFTER_BACKUP)
    write(domains, dom, 0, "write -P 0xc1 20M 1M")
    inc1 = push(vm, policy)
    write(domains, dom, 0, "write -P 0xc2 30M 1M")
    inc2 = push(vm, policy)
    assert (inc1.kind, inc2.kind) == ("incremental", "incremental")
    assert "offsite-deferred" in [e["step"] for e in inc2.journal]  # one copy per VM at once

    run_copy(first)
    # the copy that ended requested the newest backup left behind; its parent goes first
    last = OffsiteCopy.objects.get(backup=inc2.backup)
    run_copy(last)
    link = OffsiteCopy.objects.get(backup=inc1.backup)
    assert (link.via, link.trigger, link.status) == (last, CopyTrigger.CHAIN, RunStatus.SUCCEEDED)
    for copy in (first, link, last):
        copy.refresh_from_db()
        assert copy.verified_at and copy.snapshot_id
    # the backups' own checks were moments ago and nothing has touched them since: each copy
    # sent them without reading them a second time
    for copy in (first, link, last):
        assert "verified-before" in [e["step"] for e in copy.journal]

    repo = restic_repository(offsite)
    # by run: the snapshots' times are the backups', to the second (restic's --time)
    snaps = sorted(
        restic.snapshots(repo, ["vmbackup", f"uuid={vm.uuid}"]), key=lambda s: int(s.tag("run"))
    )
    assert [s.id for s in snaps] == [first.snapshot_id, link.snapshot_id, last.snapshot_id]
    names = [Path(b.path).name for b in (full.backup, inc1.backup, inc2.backup)]
    assert [s.tag("backup") for s in snaps] == names
    assert [s.tag("kind") for s in snaps] == ["full", "incremental", "incremental"]
    assert [s.tag("parent") for s in snaps] == [None, names[0], names[1]]

    # nothing readable in the repository, though the marker is plain in the backup
    assert marker[:64] in (Path(full.backup.path) / "vda.qcow2").read_bytes()
    leaks = [
        p for p in Path(offsite.url).rglob("*") if p.is_file() and marker[:32] in p.read_bytes()
    ]
    assert leaks == []

    # the snapshots alone rebuild the chain: each directory checks, the last reads as the VM
    target = tmp_path / "rebuilt"
    for snap in snaps:
        restic.restore(repo, snap.id, str(target))
    for name in names:
        assert sha256sum_check(target / name).returncode == 0
    assert qemu_img.compare(
        str(Path(inc2.backup.path) / "vda.qcow2"),
        "qcow2",
        str(target / names[2] / "vda.qcow2"),
        "qcow2",
    )


def test_a_second_full_of_an_unchanged_disk_costs_almost_nothing(
    domains, backup_root, synced, offsite, tmp_path
):
    dom = domains.create([DiskSpec("vda", "qcow2", 64)])
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(32 * MIB))  # data that neither compresses nor repeats
    run(["qemu-io", "-f", "qcow2", "-c", f"write -s {noise} 16M 32M", str(dom.disks["vda"])])
    vm = synced(dom)
    policy = policy_for(vm, offsite, method="offline")
    first = run_copy(OffsiteCopy.objects.get(backup=offline(vm, policy).backup))
    before = repo_bytes(offsite.url)
    second = run_copy(OffsiteCopy.objects.get(backup=offline(vm, policy).backup))
    grown = repo_bytes(offsite.url) - before
    assert grown < 0.05 * 64 * MIB, grown
    assert second.bytes_added < 0.05 * 64 * MIB
    assert first.bytes_added > 32 * MIB


def offline(vm, policy):
    r = requests.request_backup(vm, method="offline", enqueue=False, policy=policy)
    jobs.run_backup(r.pk)
    r.refresh_from_db()
    assert r.status == RunStatus.SUCCEEDED, r.error
    return r
