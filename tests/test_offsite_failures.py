"""Offsite copies that must not succeed, and the ones that must be repaired: a wrong
password, an unreachable repository, a damaged repository, a file the manifest does not
explain, a parent pruned before it was copied, a copy killed mid-way (reconcile requeues
it). Real restic and real published backups (written as a backup job writes them, no
libvirt needed for these)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from backups import archive, jobs, reconcile, requests, restic
from backups.archive import check as archive_check
from backups.models import (
    Alert,
    Backup,
    CopyTrigger,
    OffsiteCopy,
    OffsiteRepository,
    RunStatus,
)
from backups.offsite import restic_repository
from backups.retention import prune
from tests.helpers import (
    copy_now,
    flip_first_byte,
    free_port,
    make_backup,
    publish_backup,
    random_image,
    snapshots,
    wait_until,
)

pytestmark = pytest.mark.skipif(not os.path.exists(restic.RESTIC), reason="restic is required")
BASE_DIR = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


@pytest.fixture
def backup(vm, tmp_path) -> Backup:
    root = tmp_path / "root"
    root.mkdir()
    path = publish_backup(root, vm.name, 7, random_image(2 * MIB), vm_uuid=str(vm.uuid))
    return make_backup(vm, path=str(path), manifest=archive.read_manifest(path).to_dict())


def untouched(backup: Backup, before: dict) -> bool:
    return archive.fingerprint(Path(backup.path)) == before and (
        archive_check.verify(backup.path).ok
    )


def test_a_wrong_password_fails_the_copy_and_leaves_the_backup_alone(backup, offsite, tmp_path):
    before = archive.fingerprint(Path(backup.path))
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not the password\n")
    wrong.chmod(0o600)
    offsite.password_file = str(wrong)
    offsite.save()
    copy = copy_now(backup, offsite)
    assert (copy.status, copy.reason) == (RunStatus.FAILED, "wrong-password")
    assert f"the password in {wrong} does not open the repository" in copy.error
    assert untouched(backup, before)


def test_an_unreachable_repository_fails_the_copy_with_the_reason(backup, offsite):
    before = archive.fingerprint(Path(backup.path))
    offsite.url = f"rest:http://127.0.0.1:{free_port()}/vms"
    offsite.save()
    copy = copy_now(backup, offsite)
    assert (copy.status, copy.reason) == (RunStatus.FAILED, "unreachable")
    assert "is unreachable" in copy.error and "connection refused" in copy.error
    assert untouched(backup, before)


def test_a_copy_is_checked_against_the_manifest_and_damage_is_found(backup, offsite, capsys):
    call_command("vmbackup_offsite", "copy", str(backup.pk), "--repository", "offsite", "--wait")
    copy = OffsiteCopy.objects.get()
    assert capsys.readouterr().out.splitlines()[-1] == copy.snapshot_id
    assert copy.verified_at and copy.bytes_added > 2 * MIB
    sent = {n.path for n in restic.ls(restic_repository(offsite), copy.snapshot_id)}
    name = Path(backup.path).name
    assert {f"/{name}/{f}" for f in ("vda.raw", "backup.json", "SHA256SUMS")} <= sent

    call_command("vmbackup_offsite", "check")
    pack = max(
        (p for p in Path(offsite.url, "data").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    with open(pack, "r+b") as f:
        f.seek(pack.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CommandError, match="1 of 1 repositories failed the check"):
        call_command("vmbackup_offsite", "check", "--read-data-subset", "100%")
    assert "does not match" in capsys.readouterr().out
    offsite.refresh_from_db()
    assert (offsite.check_ok, offsite.check_subset) == (False, "100%")


def test_a_file_the_manifest_does_not_explain_is_never_sent(backup, offsite):
    path = Path(backup.path)
    (path / "extra.bin").write_bytes(b"not a backup file\n")
    sums = archive.read_sums(path) | {"extra.bin": archive.hash_file(path / "extra.bin")}
    (path / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))
    assert archive_check.verify(path).ok  # listed, so the backup itself verifies
    copy = copy_now(backup, offsite)
    assert copy.status == RunStatus.FAILED
    assert "does not account for: extra.bin" in copy.error
    assert snapshots(offsite) == []


def test_an_incremental_whose_parent_was_pruned_before_its_copy_is_refused(vm, backup, offsite):
    backup.pruned_at = timezone.now()
    backup.save()
    child = make_backup(vm, kind="incremental", parent=backup, path=backup.path + "-child")
    copy = copy_now(child, offsite)
    assert copy.status == RunStatus.FAILED
    assert f"builds on backup {backup.pk}, which was pruned here before" in copy.error


def test_one_copy_per_vm_is_active_at_a_time(backup, offsite):
    first = requests.request_offsite_copy(backup, offsite, enqueue=False)
    with pytest.raises(requests.CopyActive, match=f"copy {first.pk}"):
        requests.request_offsite_copy(backup, offsite, enqueue=False)
    offsite.enabled = False
    offsite.save()
    first.mark_cancelled()
    with pytest.raises(requests.CopyRefused, match="disabled"):
        requests.request_offsite_copy(backup, offsite, enqueue=False)


def test_init_is_queued_and_refuses_a_repository_its_password_does_not_open(
    admin_client, offsite, tmp_path, async_calls, django_capture_on_commit_callbacks
):
    other = tmp_path / "other-password"
    other.write_text("another one\n")
    other.chmod(0o600)
    repo = OffsiteRepository.objects.create(
        name="taken", url=offsite.url, password_file=str(other), cluster="hv1"
    )
    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(
            reverse("admin:backups_offsiterepository_changelist"),
            {"action": "initialize", "_selected_action": [repo.pk]},
        )
    ((args, kwargs),) = async_calls
    assert args == ("backups.jobs.init_offsite", repo.pk)
    assert kwargs["q_options"]["cluster"] == "hv1"  # where its password file is
    outcome = jobs.init_offsite(repo.pk)
    assert outcome.startswith("refused: not initialized: there is already a repository")
    assert "does not open it" in outcome
    repo.refresh_from_db()
    assert repo.probe_state == "wrong-password"
    assert restic.probe(restic_repository(offsite)).ok  # the repository there is untouched


@pytest.mark.django_db(transaction=True)
def test_a_killed_copy_leaves_no_snapshot_and_reconcile_copies_it_again(
    vm, offsite, backup_root, tmp_path
):
    path = publish_backup(backup_root, vm.name, 8, random_image(96 * MIB), vm_uuid=str(vm.uuid))
    backup = make_backup(vm, path=str(path), manifest=archive.read_manifest(path).to_dict())
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        database = {"VMBACKUP_SQLITE_PATH": str(db["NAME"])}
    else:  # the PostgreSQL pass: the command works on this test's database too
        database = {
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
        }
    env = (
        {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        | database
        | {
            "DJANGO_SETTINGS_MODULE": "vmbackup_site.settings",
            "VMBACKUP_DATA_DIR": str(tmp_path / "data"),
            "VMBACKUP_RESTIC_CACHE_DIR": str(tmp_path / "restic-cache"),
            "VMBACKUP_ROOT": str(backup_root),
        }
    )
    argv = [
        sys.executable,
        str(BASE_DIR / "manage.py"),
        "vmbackup_offsite",
        "copy",
        str(backup.pk),
        "--repository",
        "offsite",
        "--wait",
    ]
    command = subprocess.Popen(
        argv,
        cwd=BASE_DIR,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def sending():
        assert command.poll() is None, command.stdout.read().decode()
        row = OffsiteCopy.objects.filter(backup=backup).first()
        return row is not None and "send" in [e["step"] for e in row.journal]

    wait_until(sending, 60, "the copy never started sending")
    os.kill(command.pid, signal.SIGKILL)
    assert command.wait(30) == -signal.SIGKILL
    copy = OffsiteCopy.objects.get(backup=backup)
    assert copy.status == RunStatus.RUNNING  # nothing could run: reconcile finds it dead

    report = reconcile.reconcile()
    assert copy.pk in report.copies_interrupted
    copy.refresh_from_db()
    assert copy.status == RunStatus.INTERRUPTED and "worker died" in copy.error
    assert snapshots(offsite) == []  # restic writes a snapshot last: none was taken
    (retry,) = OffsiteCopy.objects.filter(pk__in=report.copies_requeued)
    assert (retry.trigger, retry.attempt) == (CopyTrigger.RETRY, 2)
    jobs.copy_offsite(retry.pk)
    retry.refresh_from_db()
    assert retry.status == RunStatus.SUCCEEDED, retry.error
    assert [s.id for s in snapshots(offsite)] == [retry.snapshot_id]
    assert restic.check(restic_repository(offsite)).ok  # the killed copy's lock is gone


def test_prune_stands_back_while_a_copy_of_the_vm_runs(vm, backup, offsite, settings):
    settings.VMBACKUP_KEEP_MANUAL = 1
    make_backup(vm, path=backup.path + "-newer", ago=timedelta(minutes=1))
    copy = requests.request_offsite_copy(backup, offsite, enqueue=False)
    OffsiteCopy.claim(copy.pk, "elsewhere:1")
    report = prune.prune_vm(vm, None)
    assert report.skipped == "an offsite copy of this VM is running"
    assert Backup.objects.published().count() == 2


def test_a_corrupt_backup_never_becomes_a_snapshot_and_is_marked(vm, offsite, tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    path = publish_backup(root, vm.name, 9, random_image(64 * MIB), vm_uuid=str(vm.uuid))
    backup = make_backup(vm, path=str(path), manifest=archive.read_manifest(path).to_dict())
    flip_first_byte(path / "vda.raw")  # bit rot the SHA-256 pass beside the upload finds
    copy = copy_now(backup, offsite)
    assert copy.status == RunStatus.FAILED
    assert f"backup {backup.pk} failed verification, not sent: vda.raw" in copy.error
    assert snapshots(offsite) == []
    backup.refresh_from_db()
    assert backup.verify_status == "corrupt"
    assert Alert.objects.open().get().key == f"backup:{backup.pk}"


def test_a_snapshot_written_before_the_check_failed_is_forgotten(backup, offsite, monkeypatch):
    flip_first_byte(Path(backup.path) / "vda.raw")
    uploaded = threading.Event()
    real_backup, real_data = restic.backup, archive_check.data

    def backup_then_tell(*args, **kwargs):
        result = real_backup(*args, **kwargs)
        uploaded.set()
        return result

    def data_after_upload(*args, **kwargs):
        assert uploaded.wait(60)  # the snapshot is written before the pass ends
        return real_data(*args, **kwargs)

    monkeypatch.setattr(restic, "backup", backup_then_tell)
    monkeypatch.setattr(archive_check, "data", data_after_upload)
    copy = copy_now(backup, offsite)
    assert copy.status == RunStatus.FAILED and "failed verification" in copy.error
    assert "forgotten" in [e["step"] for e in copy.journal]
    assert snapshots(offsite) == []
