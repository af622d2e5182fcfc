"""Tests for backups.archive.check: verifying a backup against its SHA256SUMS and manifest,
against real files, sha256sum and qemu-img."""

from __future__ import annotations

import dataclasses
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from backups import archive, qemu_img
from backups.archive import ArchiveError
from backups.archive import check as archive_check
from tests.helpers import (
    WHEN,
    data_filler,
    flip_byte,
    full_filler,
    incremental_filler,
    manifest,
    needs_tools,
    publish_backup,
    raw_source,
    sha256sum_check,
)


@pytest.fixture
def chain(root: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A published full backup and an incremental on top of it; returns (source, full, incr)."""
    source = raw_source(tmp_path / "source.raw")
    full = publish_backup(root, "web", 4, full_filler(source))
    incr = publish_backup(
        root,
        "web",
        5,
        incremental_filler(full),
        when=WHEN + timedelta(hours=1),
        kind="incremental",
        parent=full.name,
        method="push",
    )
    return source, full, incr


@needs_tools
def test_it_writes_sums_that_sha256sum_accepts_and_verify_passes(chain):
    _source, full, incr = chain

    for backup in (full, incr):
        result = sha256sum_check(backup)
        assert result.returncode == 0, result.stdout + result.stderr
        listed = set(archive.read_sums(backup))
        assert listed == {"vda.qcow2", "domain.xml", "backup.json", "RESTORE.md", "restore.sh"}
        verified = archive_check.verify(backup)
        assert verified.ok, verified.errors
        assert verified.checked_files == 5
        assert verified.bytes == sum((backup / name).stat().st_size for name in listed)


@needs_tools
def test_it_reports_a_flipped_byte_that_qemu_img_check_misses(chain):
    _source, full, _incr = chain
    image = full / "vda.qcow2"
    flip_byte(image)

    assert qemu_img.check(str(image), "qcow2").ok
    result = archive_check.verify(full)
    assert not result.ok
    assert result.errors == ("vda.qcow2: checksum mismatch",)
    assert sha256sum_check(full).returncode != 0


@needs_tools
def test_it_reports_missing_unlisted_and_tampered_files(chain):
    _source, full, _incr = chain
    (full / "domain.xml").unlink()
    (full / "stray.txt").write_text("hello")
    (full / "restore.sh").write_text("#!/bin/sh\nrm -rf /\n")

    result = archive_check.verify(full, check_images=False)

    assert set(result.errors) == {
        "domain.xml: missing",
        "restore.sh: checksum mismatch",
        "stray.txt: not listed in SHA256SUMS",
    }


@needs_tools
def test_it_reports_a_broken_backing_chain(chain):
    _source, full, incr = chain
    shutil.rmtree(full)

    assert archive_check.verify(incr, check_images=False).ok
    result = archive_check.verify(incr)
    assert not result.ok
    assert len(result.errors) == 1 and result.errors[0].startswith("vda.qcow2:")


def test_it_reports_a_missing_or_malformed_sums_file(root: Path):
    published = publish_backup(root, "web", 4, data_filler)
    sums = published / "SHA256SUMS"
    sums.write_text(sums.read_text() + "garbage\n")
    assert "malformed" in archive_check.verify(published).errors[0]
    sums.write_text(f"{'a' * 64}  ../../etc/passwd\n")
    assert not archive_check.verify(published).ok
    sums.unlink()
    result = archive_check.verify(published)
    assert (result.ok, result.checked_files, result.bytes) == (False, 0, 0)
    assert "cannot read SHA256SUMS" in result.errors[0]


@needs_tools
def test_it_keeps_sha256sum_passing_after_a_rebase(chain):
    source, full, incr = chain
    old = archive.read_manifest(incr)
    image = incr / "vda.qcow2"
    qemu_img.rebase(str(image), "qcow2", None, None)  # fold the parent in: standalone now
    folded = dataclasses.replace(
        old,
        kind="full",
        parent=None,
        disks=(
            dataclasses.replace(
                old.disks[0],
                backing=None,
                backing_format=None,
                sha256=archive.hash_file(image),
                bytes=image.stat().st_size,
            ),
        ),
    )

    archive_check.record_rewrite(incr, folded)
    shutil.rmtree(full)

    result = sha256sum_check(incr)
    assert result.returncode == 0, result.stdout + result.stderr
    stored = archive.read_manifest(incr)
    assert stored.kind == "full" and stored.parent is None
    assert stored.disks[0].sha256 == archive.hash_file(image)
    assert stored.disks[0].bytes == image.stat().st_size
    assert "PARENT=''" in (incr / "restore.sh").read_text()
    assert archive_check.verify(incr).ok, archive_check.verify(incr).errors
    assert not list(incr.glob(".*"))


@needs_tools
def test_it_does_not_rehash_images_whose_entry_is_unchanged(chain):
    _source, full, _incr = chain
    flip_byte(full / "vda.qcow2")  # rot, not a rebase

    archive_check.record_rewrite(full, archive.read_manifest(full))

    assert sha256sum_check(full).returncode != 0
    assert archive_check.verify(full).errors == ("vda.qcow2: checksum mismatch",)


def test_it_refuses_to_update_with_another_backups_manifest(root: Path):
    published = publish_backup(root, "web", 4, data_filler)

    with pytest.raises(ArchiveError, match="another backup"):
        archive_check.record_rewrite(published, manifest(run_id=5))


def test_it_trusts_fresh_digests_only_for_the_files_named(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    backup = publish_backup(root, "web", 1, full_filler(raw_source(tmp_path / "src.raw")))
    sums = archive.read_sums(backup)
    image = next(n for n in sums if n.endswith(".qcow2"))
    assert archive_check.verify(backup, hashed={image: sums[image]}).ok
    wrong = archive_check.verify(backup, hashed={image: "0" * 64})
    assert f"{image}: checksum mismatch" in wrong.errors
    (backup / "RESTORE.md").write_text("tampered")  # not named: still re-hashed
    assert (
        "RESTORE.md: checksum mismatch"
        in archive_check.verify(backup, hashed={image: sums[image]}).errors
    )
