"""Stored backups are untrusted input: tampered, rotten or hostile files are reported, never
followed, waited on, folded into a kept backup or blessed — against the real libvirtd."""

import hashlib
import json
import os
import subprocess
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from backups import archive, jobs, reconcile, requests, verify
from backups.archive import check as archive_check
from backups.models import Backup, BackupPolicy, RunStatus, VerifyStatus
from backups.retention import fold, prune
from tests.domains import DiskSpec
from tests.helpers import push, restore_now, write

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]
KEEP_ALL = {"keep_last": 0, "keep_daily": 0, "keep_weekly": 0, "keep_monthly": 0}
QUICK = 20  # seconds: a hostile file is reported long before this, never waited on


@pytest.fixture
def chain(domains, backup_root, synced):
    """A full and two incrementals of a running domain, one day apart, keeping everything."""
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 2, 0xA1)])], start=True)
    vm = synced(dom)
    policy = BackupPolicy.objects.create(name="p", schedule="", full_every=10, **KEEP_ALL)
    policy.vms.add(vm)
    backups = []
    for i in range(3):
        if i:
            write(domains, dom, 0, f"write -P {0xB0 + i} {i * 4}M 1M")
        backup = push(vm, policy).backup
        Backup.objects.filter(pk=backup.pk).update(
            created_at=timezone.now() - timedelta(days=3 - i)
        )
        backups.append(Backup.objects.get(pk=backup.pk))
    assert [b.kind for b in backups] == ["full", "incremental", "incremental"]
    return vm, policy, backups


def digests(backups) -> dict[str, str]:
    """Every file of every backup directory, by content."""
    out = {}
    for backup in backups:
        for path in sorted(Path(backup.path).rglob("*")):
            if path.is_file() and not path.is_symlink():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def flip_data_byte(image: Path) -> None:
    data = image.read_bytes()
    offset = data.index(b"\xa1" * 4096) + 100
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(bytes([data[offset] ^ 0xFF]))


def resum(directory: Path, file: str) -> None:
    """What a careful attacker does after editing an image: make SHA256SUMS and backup.json
    agree with it again, so only the header check stands between it and a restore."""
    digest = hashlib.sha256((directory / file).read_bytes()).hexdigest()
    data = json.loads((directory / "backup.json").read_text())
    for disk in data["disks"]:
        if disk["file"] == file:
            disk["sha256"], disk["bytes"] = digest, (directory / file).stat().st_size
    (directory / "backup.json").write_text(json.dumps(data))
    sums = archive.read_sums(directory)
    sums[file] = digest
    sums["backup.json"] = hashlib.sha256((directory / "backup.json").read_bytes()).hexdigest()
    (directory / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))


def set_backing(image: Path, backing: str, fmt: str = "raw") -> None:
    argv = ["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing, "-F", fmt, str(image)]
    subprocess.run(argv, check=True, timeout=60)


def run_prune() -> tuple[str, str]:
    out = StringIO()
    try:
        call_command("vmbackup_prune", stdout=out)
    except CommandError as exc:
        return out.getvalue(), str(exc)
    return out.getvalue(), ""


def assert_nothing_pruned(backups, before: dict[str, str]) -> None:
    for backup in backups:
        backup.refresh_from_db()
        assert backup.pruned_at is None and Path(backup.path).is_dir()
    assert digests(backups) == before
    assert not list(Path(backups[0].path).parent.glob(".fold-*"))
    assert not list(Path(backups[0].path).parent.glob("*/.*.fold"))


# ------------------------------------------------------------------ prune never launders


def test_a_flipped_byte_in_a_full_survives_every_prune_as_corrupt(chain, restore_root):
    vm, policy, backups = chain
    full, _inc1, newest = backups
    flip_data_byte(Path(full.path) / "vda.qcow2")
    assert verify.verify_backup(full).startswith("corrupt")
    line = verify.verify_backup(newest)
    assert line.startswith("corrupt") and f"builds on backup {full.pk}, which is corrupt" in line
    before = digests(backups)

    for keep_last in (1, 2):
        BackupPolicy.objects.filter(pk=policy.pk).update(keep_last=keep_last)
        out, error = run_prune()
        assert "its chain failed verification" in error and "checksum mismatch" in error
        assert_nothing_pruned(backups, before)
    full.refresh_from_db()
    assert full.verify_status == VerifyStatus.CORRUPT
    assert not archive_check.verify(full.path).ok  # never re-blessed
    restore = restore_now(newest, restore_root)
    assert restore.status == RunStatus.FAILED and "checksum mismatch" in restore.error


def test_a_prune_after_a_backup_refuses_the_fold_and_says_so(chain):
    vm, policy, backups = chain
    flip_data_byte(Path(backups[0].path) / "vda.qcow2")
    BackupPolicy.objects.filter(pk=policy.pk).update(keep_last=1)
    before = digests(backups)

    run = requests.request_backup(vm, method="push", enqueue=False, policy=policy)
    jobs.run_backup(run.pk)
    run.refresh_from_db()

    assert run.status == RunStatus.SUCCEEDED  # the new backup itself is fine (a full now)
    refused = [s for s in run.journal if s["step"] == "prune-refused"]
    assert refused and "checksum mismatch" in refused[0]["reasons"][0]
    assert digests(backups) == before  # the corrupt chain is kept whole, not folded


@pytest.mark.parametrize("resummed", [False, True], ids=["sums-stale", "sums-rewritten"])
def test_a_backing_header_pointing_at_a_host_file_is_never_folded(chain, resummed):
    vm, policy, backups = chain
    inc1 = Path(backups[1].path)
    set_backing(inc1 / "vda.qcow2", "/etc/hostname")
    if resummed:
        resum(inc1, "vda.qcow2")
    before = digests(backups)
    BackupPolicy.objects.filter(pk=policy.pk).update(keep_last=1)

    out, error = run_prune()

    assert "its chain failed verification" in error
    assert ("backs onto '/etc/hostname'" in error) if resummed else ("checksum" in error)
    assert_nothing_pruned(backups, before)
    host_bytes = Path("/etc/hostname").read_bytes().strip()
    assert host_bytes not in (Path(backups[2].path) / "vda.qcow2").read_bytes()


def test_a_backing_header_pointing_at_a_fifo_blocks_nothing(chain, restore_root, tmp_path):
    vm, policy, backups = chain
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    inc1 = Path(backups[1].path)
    set_backing(inc1 / "vda.qcow2", str(fifo))
    resum(inc1, "vda.qcow2")
    BackupPolicy.objects.filter(pk=policy.pk).update(keep_last=1)
    started = time.monotonic()

    result = archive_check.verify(inc1)
    _out, error = run_prune()
    restore = restore_now(backups[2], restore_root)

    assert time.monotonic() - started < 3 * QUICK
    assert not result.ok and f"backs onto {str(fifo)!r}" in "; ".join(result.errors)
    assert "its chain failed verification" in error
    assert restore.status == RunStatus.FAILED and "backs onto" in restore.error
    assert list(restore_root.iterdir()) == []


# ------------------------------------------------------- hostile files named like images


@pytest.mark.parametrize("kind", ["fifo", "symlink-secret", "symlink-zero"])
def test_a_hostile_file_named_like_an_image_is_reported_at_once(chain, restore_root, tmp_path,
                                                                kind):  # fmt: skip
    vm, policy, backups = chain
    full = Path(backups[0].path)
    image = full / "vda.qcow2"
    image.unlink()
    if kind == "fifo":
        os.mkfifo(image)
    else:
        secret = tmp_path / "secret"
        secret.write_text("root:$6$not-for-backups")
        secret.chmod(0o600)
        image.symlink_to(secret if kind == "symlink-secret" else "/dev/zero")
    started = time.monotonic()

    line = verify.verify_backup(backups[0])
    passed = jobs.verify_pass(budget_seconds=60)
    restore = restore_now(backups[2], restore_root)

    assert time.monotonic() - started < 3 * QUICK
    word = "a FIFO" if kind == "fifo" else "a symlink"
    assert line.startswith("corrupt") and f"vda.qcow2: {word}" in line, line
    assert passed.startswith("verified 3 backups")
    assert restore.status == RunStatus.FAILED and word in restore.error
    assert "not-for-backups" not in restore.error


def test_a_symlinked_vm_directory_does_not_stop_reconcile(chain, backup_root, tmp_path):
    vm, _policy, backups = chain
    (backup_root / "evil").symlink_to("/etc")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (backup_root / "looks-fine").symlink_to(elsewhere)
    lost = backups[2]
    Backup.objects.filter(pk=lost.pk).delete()  # a row lost: adopt must still find it

    report = reconcile.reconcile()

    assert any("evil" in e and "symlink" in e for e in report.errors), report.errors
    assert report.adopted == [lost.path]


# ------------------------------------------------------------ a fold killed at any step


class Killed(BaseException):
    """A kill -9 at this point: nothing after it runs, not even ``except Exception``."""


def _kill_at(monkeypatch, step: str) -> None:
    def die(*args, **kwargs):
        raise Killed(step)

    if step == "copy":  # the journal says "writing", half a copy is beside the image

        def half(src, dst, length=0):
            dst.write(src.read(65536))
            raise Killed(step)

        monkeypatch.setattr(fold.shutil, "copyfileobj", half)
    elif step == "rebase":  # the copy is made, qemu-img rebase killed on it
        monkeypatch.setattr(fold.qemu_img, "rebase", die)
    elif step == "switch":  # the journal says "switching", nothing renamed yet
        monkeypatch.setattr(fold, "_switch", die)
    elif step == "metadata":  # images renamed, SHA256SUMS and backup.json still the old ones
        monkeypatch.setattr(fold.archive_check, "record_rewrite", die)
    elif step == "row":  # everything on disk done, the database row not yet
        real = fold.archive_check.record_rewrite

        def then_die(*args, **kwargs):
            real(*args, **kwargs)
            monkeypatch.setattr(fold.Backup, "save", die)

        monkeypatch.setattr(fold.archive_check, "record_rewrite", then_die)


@pytest.mark.parametrize("step", ["copy", "rebase", "switch", "metadata", "row"])
def test_a_prune_killed_during_a_fold_leaves_a_chain_that_verifies_after_reconcile(
    chain, monkeypatch, step, tmp_path
):
    vm, policy, backups = chain
    full, inc1, newest = backups
    reference = tmp_path / "reference.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2",
                    str(Path(inc1.path) / "vda.qcow2"), str(reference)], check=True)  # fmt: skip
    BackupPolicy.objects.filter(pk=policy.pk).update(keep_last=2)  # fold the full into inc1
    _kill_at(monkeypatch, step)
    policy.refresh_from_db()
    with pytest.raises(Killed):
        prune.prune_vm(vm, policy)
    monkeypatch.undo()

    report = reconcile.reconcile()

    assert len(report.folds) == 1, report.summary()
    for backup in backups:
        assert archive_check.verify(backup.path).ok, archive_check.verify(backup.path).errors
        backup.refresh_from_db()
        assert backup.kind == archive.read_manifest(backup.path).kind
    image = Path(inc1.path) / "vda.qcow2"
    assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(image),
                           str(reference)]).returncode == 0  # fmt: skip
    assert not list(Path(inc1.path).glob(".*"))
    # and the next prune completes what this one began
    report = prune.prune_vm(vm, policy)
    assert report.deleted == [full.pk] and not report.refused
    assert archive_check.verify(inc1.path).ok and archive_check.verify(newest.path).ok


# ------------------------------------------------------------------ manual backups


def test_manual_backups_are_pruned_by_keep_manual(domains, backup_root, synced, settings):
    settings.VMBACKUP_KEEP_MANUAL = 2
    dom = domains.create([DiskSpec("vda", "qcow2", 8, [(0, 1, 0xA1)])], start=True)
    vm = synced(dom)
    made = [push(vm).backup for _ in range(2)]
    dry = prune.prune_vm(vm, None, dry_run=True)
    assert all(keep for _b, keep, _r in dry.decisions)

    made.append(push(vm).backup)  # its prune removes the oldest

    published = list(vm.backups.published().order_by("created_at"))
    assert [b.pk for b in published] == [b.pk for b in made[1:]]
    assert not Path(made[0].path).exists()
    for backup in published:
        assert archive_check.verify(backup.path).ok
