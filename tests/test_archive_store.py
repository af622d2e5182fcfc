"""Tests for backups.archive.store: staging, publishing, listing, discarding and hashing,
against real files."""

from __future__ import annotations

import hashlib
import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from backups import archive
from backups.archive import ArchiveError
from tests.helpers import (
    WHEN,
    data_filler,
    disk,
    manifest,
    publish_backup,
)


def test_it_confines_vm_dirs_to_the_root(root: Path, tmp_path: Path):
    assert archive.vm_dir(root, "web") == root / "web"
    with pytest.raises(ArchiveError):
        archive.vm_dir(root, "../x")
    with pytest.raises(ArchiveError, match="absolute"):
        archive.vm_dir("relative/root", "web")
    (tmp_path / "elsewhere").mkdir()
    (root / "evil").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ArchiveError, match="outside"):
        archive.vm_dir(root, "evil")


def test_it_publishes_a_complete_backup(root: Path):
    published = publish_backup(
        root, "web", 4, data_filler, nvram="nvram.fd", tpm="tpm", domain_xml="<domain/>\n"
    )

    assert published == root / "web" / "20261130T010000Z-4"
    names = {p.relative_to(published).as_posix() for p in published.rglob("*")}
    assert names == {
        "backup.json",
        "domain.xml",
        "nvram.fd",
        "tpm",
        "tpm/tpm2-00.permall",
        "vda.qcow2",
        "SHA256SUMS",
        "RESTORE.md",
        "restore.sh",
    }
    for name in ("backup.json", "domain.xml", "RESTORE.md", "SHA256SUMS"):
        assert (published / name).stat().st_mode & 0o777 == 0o600
    assert (published / "restore.sh").stat().st_mode & 0o777 == 0o700
    assert (published / "domain.xml").read_text() == "<domain/>\n"
    assert archive.read_manifest(published).nvram == "nvram.fd"
    assert list((root / "web").glob(".*")) == []
    assert archive.list_backups(root, "web") == [published]


def test_it_creates_private_staging_and_vm_dirs(root: Path):
    (root / "web").mkdir(0o755)  # as a killed push job may have left it: made private again
    (root / "web").chmod(0o711)
    staging = archive.staging_dir(root, "web", "20261130T010000Z", 4)

    assert staging == root / "web" / ".20261130T010000Z-4.partial"
    assert staging.stat().st_mode & 0o777 == 0o700
    assert (root / "web").stat().st_mode & 0o777 == 0o700
    with pytest.raises(ArchiveError, match="exists"):
        archive.staging_dir(root, "web", "20261130T010000Z", 4)


def test_it_refuses_to_stage_when_the_root_is_missing(tmp_path: Path):
    with pytest.raises(ArchiveError, match="does not exist"):
        archive.staging_dir(tmp_path / "unmounted", "web", "20261130T010000Z", 4)
    assert not (tmp_path / "unmounted").exists()


def test_it_lists_only_published_backups_oldest_first(root: Path):
    later = publish_backup(root, "web", 9, data_filler, when=WHEN + timedelta(seconds=1))
    same_stamp_higher_run = publish_backup(root, "web", 10, data_filler, when=WHEN)
    first = publish_backup(root, "web", 8, data_filler, when=WHEN)
    archive.staging_dir(root, "web", archive.stamp(WHEN), 11)  # unpublished
    (root / "web" / ".20261130T010000Z-12").mkdir()  # other dot dir, even with a manifest
    shutil.copy(first / "backup.json", root / "web" / ".20261130T010000Z-12")
    (root / "web" / "20261130T010000Z-13").mkdir()  # no backup.json
    (root / "web" / "notes").mkdir()

    assert archive.list_backups(root, "web") == [first, same_stamp_higher_run, later]
    assert archive.list_backups(root, "other") == []


def test_it_refuses_to_publish_over_an_existing_backup(root: Path):
    staging = archive.staging_dir(root, "web", archive.stamp(WHEN), 4)
    (root / "web" / "20261130T010000Z-4").mkdir()  # empty: rename(2) would replace it

    with pytest.raises(ArchiveError, match="overwrite"):
        archive.publish(staging)
    assert staging.is_dir()


def test_it_refuses_to_publish_a_directory_that_is_not_staging(root: Path, tmp_path: Path):
    with pytest.raises(ArchiveError):
        archive.publish(tmp_path)


def test_it_refuses_metadata_for_files_nobody_hashed(root: Path):
    staging = archive.staging_dir(root, "web", archive.stamp(WHEN), 4)
    data_filler(staging)
    sums = {"vda.qcow2": archive.hash_file(staging / "vda.qcow2")}
    entry = disk(sha256=sums["vda.qcow2"])

    with pytest.raises(ArchiveError, match="not in sums: nvram.fd"):
        archive.write_metadata(staging, manifest(disks=(entry,)), "<domain/>", sums)
    with pytest.raises(ArchiveError, match="written by write_metadata"):
        archive.write_metadata(staging, manifest(), "<domain/>", {"backup.json": "a" * 64})


def test_it_refuses_metadata_that_disagrees_with_the_sums(root: Path):
    staging = archive.staging_dir(root, "web", archive.stamp(WHEN), 4)
    (staging / "vda.qcow2").write_bytes(b"x")
    sums = {"vda.qcow2": archive.hash_file(staging / "vda.qcow2")}

    with pytest.raises(ArchiveError, match="disagree"):
        archive.write_metadata(staging, manifest(disks=(disk(sha256="b" * 64),)), "", sums)
    with_nvram = manifest(disks=(disk(sha256=sums["vda.qcow2"]),), nvram="nvram.fd")
    with pytest.raises(ArchiveError, match="nvram.fd: not covered"):
        archive.write_metadata(staging, with_nvram, "", sums)


def test_it_lists_partials_of_every_vm(root: Path):
    a = archive.staging_dir(root, "web", "20261130T010000Z", 4)
    b = archive.staging_dir(root, "db", "20261130T010000Z", 5)
    publish_backup(root, "web", 6, data_filler)

    assert archive.list_partials(root) == sorted([a, b])


def test_it_discards_a_partial(root: Path):
    staging = archive.staging_dir(root, "web", archive.stamp(WHEN), 4)
    data_filler(staging)

    archive.discard(staging, root)
    archive.discard(staging, root)  # already gone: nothing to do

    assert not staging.exists()
    assert (root / "web").is_dir()


def test_it_refuses_to_discard_anything_but_a_partial_below_root(root: Path, tmp_path: Path):
    staging = archive.staging_dir(root, "web", archive.stamp(WHEN), 4)
    published = publish_backup(root, "web", 5, data_filler)
    outside = tmp_path / "other" / "web" / ".20261130T010000Z-4.partial"
    outside.mkdir(parents=True)
    link = root / "web" / ".20261130T010000Z-7.partial"
    link.symlink_to(outside)
    nested = staging / "x" / ".y.partial"
    nested.mkdir(parents=True)

    for victim in (published, root / "web", root, outside, link, nested, tmp_path):
        with pytest.raises(ArchiveError):
            archive.discard(victim, root)
    with pytest.raises(ArchiveError, match="absolute"):
        archive.discard(staging, "backups")
    assert published.is_dir() and outside.is_dir() and staging.is_dir()


def test_it_hashes_files_in_chunks(tmp_path: Path):
    path = tmp_path / "data"
    path.write_bytes(os.urandom(100_000))

    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert archive.hash_file(path, chunk=4096) == expected
    assert archive.hash_file(path) == expected


def test_hash_file_reports_every_byte_it_hashes(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(os.urandom(3 * 2**20 + 5))
    seen = []
    digest = archive.hash_file(path, chunk=2**20, on_bytes=seen.append)
    assert sum(seen) == path.stat().st_size and len(seen) == 4
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
