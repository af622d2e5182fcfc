"""The chain check runs beside the flatten: a restore whose chain fails its check while the
copy runs (or after it) publishes, defines and switches nothing, against the real libvirtd
and qemu-img."""

import subprocess
import threading
from datetime import datetime
from pathlib import Path

import libvirt
import pytest

from backups import jobs, qemu_img, requests
from backups.archive import check as archive_check
from backups.models import Restore, RunStatus
from backups.restore import common
from tests.domains import DiskSpec, make_dir
from tests.helpers import flip_byte, push, restore_now

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]


def hash_after_copy_starts(monkeypatch) -> threading.Event:
    """The chain check hashes only once qemu-img convert has started: the overlap made
    certain, whatever the scheduler does (sequential code would wait here in vain)."""
    copying = threading.Event()
    real_convert, real_hash = common.qemu_img.convert, archive_check.hash_member

    def convert(*args, **kwargs):
        copying.set()
        return real_convert(*args, **kwargs)

    def hash_member(*args, **kwargs):
        assert copying.wait(60), "the copy never started beside the check"
        return real_hash(*args, **kwargs)

    monkeypatch.setattr(common.qemu_img, "convert", convert)
    monkeypatch.setattr(archive_check, "hash_member", hash_member)
    return copying


def entries(restore, step: str) -> list[dict]:
    return [e for e in restore.journal if e.get("step") == step]


def at(entry: dict, key: str = "at") -> datetime:
    return datetime.fromisoformat(entry[key])


def test_it_fails_on_a_corrupt_byte_found_beside_the_copy_and_leaves_nothing(
    domains, backup_root, synced, restore_root, monkeypatch
):
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 4, 0xAB)])], start=True)
    backup = push(synced(dom)).backup
    flip_byte(Path(backup.path) / "vda.qcow2")  # guest data: every header still fine
    hash_after_copy_starts(monkeypatch)

    restore = restore_now(backup, restore_root)

    assert restore.status == RunStatus.FAILED
    assert f"backup {Path(backup.path).name} failed its check" in restore.error
    assert "vda.qcow2: checksum mismatch" in restore.error
    assert list(restore_root.iterdir()) == []
    with pytest.raises(libvirt.libvirtError):
        domains.conn.lookupByName(restore.name)
    steps = [e["step"] for e in restore.journal]
    assert steps.index("verify") < steps.index("check") < steps.index("convert")
    [checked] = entries(restore, "checked")
    assert checked["ok"] is False
    assert at(entries(restore, "convert")[0]) < at(checked, "ended")  # the two overlapped
    assert "publish" not in steps and "define" not in steps


def test_a_check_failing_mid_copy_kills_the_copy(domains, backup_root, synced, restore_root,
                                                 monkeypatch):  # fmt: skip
    dom = domains.create([DiskSpec("vda", "qcow2", 256, [(0, 200, 0x3C)])], start=True)
    backup = push(synced(dom)).backup
    xml = Path(backup.path) / "domain.xml"  # hashed first, in a few microseconds
    xml.write_text(xml.read_text().replace("<domain", "<domaim", 1))
    hash_after_copy_starts(monkeypatch)
    real_convert = common.qemu_img.convert
    seen = []

    def convert(*args, progress=None, **kwargs):
        def report(fraction):
            seen.append(fraction)
            progress(fraction)

        real_convert(*args, progress=report, **kwargs)

    monkeypatch.setattr(common.qemu_img, "convert", convert)
    monkeypatch.setattr(common.qemu_img, "PROGRESS_INTERVAL", 0)  # every percent

    restore = restore_now(backup, restore_root)

    assert restore.status == RunStatus.FAILED
    assert "domain.xml: checksum mismatch" in restore.error
    assert seen and seen[-1] < 1.0  # stopped inside the disk, not after it
    assert list(restore_root.iterdir()) == []


def test_a_cancel_while_waiting_for_the_check_discards_the_copy(domains, backup_root, synced,
                                                                restore_root,
                                                                monkeypatch):  # fmt: skip
    dom = domains.create([DiskSpec("vda", "qcow2", 8, [(0, 2, 0x11)])], start=True)
    backup = push(synced(dom)).backup
    release = threading.Event()
    real_hash, real_wait = archive_check.hash_member, common.ChainCheck.wait

    def hash_member(*args, **kwargs):
        release.wait(60)  # the check is slow: the copy ends first
        return real_hash(*args, **kwargs)

    def wait(self):
        Restore.objects.update(cancel_requested=True)  # the user clicks while it checks
        try:
            real_wait(self)
        finally:
            release.set()

    monkeypatch.setattr(archive_check, "hash_member", hash_member)
    monkeypatch.setattr(common.ChainCheck, "wait", wait)
    restore = restore_now(backup, restore_root)

    assert restore.status == RunStatus.CANCELLED
    steps = [e["step"] for e in restore.journal]
    assert "convert" in steps and "checked" not in steps and "publish" not in steps
    assert list(restore_root.iterdir()) == []


def test_in_place_a_corrupt_chain_switches_nothing(domains, backup_root, synced, monkeypatch):
    dom = domains.create(
        [DiskSpec("vda", "qcow2", 16, [(0, 4, 0xAB)]), DiskSpec("vdb", "raw", 8, [(1, 1, 0xB1)])]
    )
    vm = synced(dom)
    run = requests.request_backup(vm, method="offline", enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    backup = run.backup
    flip_byte(Path(backup.path) / "vda.qcow2")
    changed = make_dir(dom.dir / "changed")
    copies = {}
    for target, path in dom.disks.items():
        fmt = dom.formats[target]
        subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x99 0 1M", str(path)],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        copies[target] = changed / f"{target}.copy"
        qemu_img.convert(str(path), fmt, str(copies[target]), fmt)
    hash_after_copy_starts(monkeypatch)

    restore = requests.request_restore(backup, in_place=True, enqueue=False)
    jobs.run_restore(restore.pk)
    restore.refresh_from_db()

    assert restore.status == RunStatus.FAILED
    assert "failed its check" in restore.error and "checksum mismatch" in restore.error
    steps = [e["step"] for e in restore.journal]
    assert "convert" in steps and "switch" not in steps and "swap" not in steps
    for target, path in dom.disks.items():
        fmt = dom.formats[target]
        assert qemu_img.compare(str(copies[target]), fmt, str(path), fmt)
    assert sorted(p.name for p in dom.dir.iterdir() if ".restore-" in p.name) == []
    assert not domains.lookup(dom).isActive()
