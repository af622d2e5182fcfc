"""A copy reads a backup again only when it must: verified moments ago and untouched since
(its files' inode, size, mtime and ctime as the verification recorded them), the hash
beside the upload is skipped; anything else — a changed byte, a restored mtime, an old
verification, the setting at 0 — and the copy hashes and checks what it sends."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from backups import archive, restic, verify
from backups.archive import check as archive_check
from tests.helpers import (
    copy_now,
    flip_first_byte,
    make_backup,
    publish_backup,
    random_image,
    snapshots,
)

MIB = 1024 * 1024

pytestmark = pytest.mark.skipif(not os.path.exists(restic.RESTIC), reason="restic is required")


@pytest.fixture
def backup(vm, tmp_path):
    path = publish_backup(tmp_path, vm.name, 7, random_image(2 * MIB), vm_uuid=str(vm.uuid))
    return make_backup(vm, path=str(path), manifest=archive.read_manifest(path).to_dict())


@pytest.fixture
def reads(monkeypatch) -> list:
    """Every SHA-256 pass the copy makes beside its upload."""
    calls, real = [], archive_check.data

    def counted(*args, **kwargs):
        if kwargs.get("keep_cache"):  # the copy's pass (a verification's own is not counted)
            calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(archive_check, "data", counted)
    return calls


def steps(copy) -> list[str]:
    return [e["step"] for e in copy.journal]


def test_verification_records_what_it_read(backup):
    verify.verify_backup(backup)
    backup.refresh_from_db()
    assert backup.verify_status == "ok"
    assert backup.verified_files == archive.fingerprint(Path(backup.path))
    assert {"vda.raw", "backup.json", "SHA256SUMS"} <= set(backup.verified_files)


def test_a_backup_verified_moments_ago_is_sent_without_a_second_read(backup, offsite, reads):
    verify.verify_backup(backup)
    backup.refresh_from_db()
    when = backup.verified_at
    copy = copy_now(backup, offsite)
    assert copy.status == "succeeded", copy.error
    assert "verified-before" in steps(copy) and reads == []
    backup.refresh_from_db()
    assert backup.verified_at == when  # not claimed as a new verification


def test_a_byte_changed_since_the_verification_is_read_and_refused(backup, offsite, reads):
    verify.verify_backup(backup)
    flip_first_byte(Path(backup.path) / "vda.raw")
    copy = copy_now(backup, offsite)
    assert copy.status == "failed" and "vda.raw: checksum mismatch" in copy.error
    assert "verified-before" not in steps(copy) and len(reads) == 1
    assert snapshots(offsite) == []
    backup.refresh_from_db()
    assert (backup.verify_status, backup.verified_files) == ("corrupt", {})


def test_a_change_that_puts_the_mtime_back_is_still_seen(backup, offsite, reads):
    """Size and mtime can be forged by whoever writes the file; its ctime cannot."""
    verify.verify_backup(backup)
    image = Path(backup.path) / "vda.raw"
    st = image.stat()
    flip_first_byte(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    copy = copy_now(backup, offsite)
    assert copy.status == "failed" and "vda.raw: checksum mismatch" in copy.error
    assert len(reads) == 1


def test_an_old_verification_is_not_trusted(backup, offsite, reads):
    verify.verify_backup(backup)
    backup.refresh_from_db()
    backup.verified_at = timezone.now() - timedelta(hours=2)  # the default trusts 60 minutes
    backup.save(update_fields=["verified_at"])
    copy = copy_now(backup, offsite)
    assert copy.status == "succeeded" and len(reads) == 1
    assert "verified-before" not in steps(copy)
    backup.refresh_from_db()
    assert backup.verified_files == archive.fingerprint(Path(backup.path))  # read just now


def test_zero_minutes_reads_every_backup_it_copies(backup, offsite, reads, settings):
    settings.VMBACKUP_OFFSITE_REHASH_AFTER = 0
    verify.verify_backup(backup)
    copy = copy_now(backup, offsite)
    assert copy.status == "succeeded" and len(reads) == 1


def test_a_backup_never_verified_is_read(backup, offsite, reads):
    copy = copy_now(backup, offsite)
    assert copy.status == "succeeded" and len(reads) == 1
    backup.refresh_from_db()
    assert backup.verify_status == "ok" and backup.verified_files


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_special_file_added_since_the_verification_is_refused_unread(backup, offsite, kind):
    """A fresh verification trusts no file it did not see: the structure check still runs."""
    verify.verify_backup(backup)
    extra = Path(backup.path) / "extra"
    if kind == "fifo":
        os.mkfifo(extra)  # opened, it would hang the copy
    else:
        extra.symlink_to("/etc/shadow")
    copy = copy_now(backup, offsite)
    assert copy.status == "failed" and "not sent" in copy.error
    assert "verified-before" not in steps(copy)
    assert snapshots(offsite) == []
