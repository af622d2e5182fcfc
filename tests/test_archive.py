"""Tests for backups.archive: the on-disk format, against real files, sha256sum and qemu-img."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from backups import archive, qemu_img
from backups.archive import ArchiveError, Manifest
from backups.archive import check as archive_check
from tests.helpers import (
    WHEN,
    data_filler,
    disk,
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


# ----------------------------------------------------------------------------- manifest


def test_it_round_trips_the_manifest_through_json():
    original = manifest(
        kind="incremental",
        parent="20261129T010000Z-3",
        checkpoint="vmbackup-4",
        disks=(
            disk(backing="../20261129T010000Z-3/vda.qcow2", backing_format="qcow2"),
            disk(target="vdb", file="vdb.raw", format="qcow2"),
        ),
        skipped=({"target": "sda", "reason": "cdrom"},),
        nvram="nvram.fd",
        tpm="tpm",
        memory="memory.save",
    )

    assert Manifest.from_json(original.to_json()) == original
    assert json.loads(original.to_json())["disks"][1]["file"] == "vdb.raw"


def test_it_ignores_keys_it_does_not_know():
    data = json.loads(manifest().to_json())
    data["future_field"] = {"x": 1}
    data["disks"][0]["future_disk_field"] = 7

    assert Manifest.from_json(json.dumps(data)) == manifest()


@pytest.mark.parametrize("version", [2, 0, "1", None, 1.5, True])
def test_it_refuses_an_unknown_format_version(version):
    data = json.loads(manifest().to_json())
    data["version"] = version

    with pytest.raises(ArchiveError, match="version"):
        Manifest.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["", "[]", "{", '{"version": 1}'])
def test_it_refuses_a_malformed_manifest(text):
    with pytest.raises(ArchiveError):
        Manifest.from_json(text)


@pytest.mark.parametrize(
    "overrides",
    [
        {"target": "../vda"},
        {"target": "-vda"},
        {"file": "sub/vda.qcow2"},
        {"file": "vda.vmdk"},
        {"file": "a\\b.qcow2"},
        {"file": "vda\n.qcow2"},
        {"format": "vmdk"},
        {"sha256": "A" * 64},
        {"bytes": -1},
        {"backing": "/etc/passwd", "backing_format": "qcow2"},
        {"backing": "../../etc/vda.qcow2", "backing_format": "qcow2"},
        {"backing": "../20261129T010000Z-3/vda.qcow2", "backing_format": None},
        {"backing": "../20261129T010000Z-3/vda.qcow2", "backing_format": "qcow2", "file": "v.raw"},
    ],
)
def test_it_refuses_a_disk_entry_with_unsafe_or_wrong_fields(overrides):
    with pytest.raises(ArchiveError):
        disk(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {"kind": "incremental"},  # no parent
        {"kind": "incremental", "parent": "../etc"},
        {"kind": "full", "parent": "20261129T010000Z-3"},
        {"disks": (disk(backing="../20261129T010000Z-3/vda.qcow2", backing_format="qcow2"),)},
        {"kind": "weekly"},
        {"vm_name": "../web"},
        {"run_id": 0},
        {"started": "yesterday"},
        {"nvram": "../nvram.fd"},
        {"disks": (disk(), disk(file="other.qcow2"))},  # duplicate target
    ],
)
def test_it_refuses_an_inconsistent_manifest(overrides):
    with pytest.raises(ArchiveError):
        manifest(**overrides)


def test_it_stamps_in_utc():
    eastern = timezone(timedelta(hours=-5))

    assert archive.stamp(datetime(2026, 11, 29, 20, 0, 5, tzinfo=eastern)) == "20261130T010005Z"
    assert archive.final_name("20261130T010005Z", 12) == "20261130T010005Z-12"
    with pytest.raises(ArchiveError):
        archive.stamp(datetime(2026, 11, 30, 1, 0, 0))


@pytest.mark.parametrize("stamp,run_id", [("2026-11-30", 1), ("20261130T010005Z", 0), ("x", 1)])
def test_it_refuses_bad_backup_names(stamp, run_id):
    with pytest.raises(ArchiveError):
        archive.final_name(stamp, run_id)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/", "a\0b", ".hidden", "a\nb", "x" * 256])
def test_it_refuses_unsafe_path_components(name):
    with pytest.raises(ArchiveError):
        archive.safe_component(name)


def test_it_allows_spaces_and_quotes_in_vm_names():
    name = 'it\'s a "vm" $(touch pwned)'

    assert archive.safe_component(name) == name


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


# ------------------------------------------------------------------ staging and publish


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


# -------------------------------------------------------------------- checksums, verify


def test_it_hashes_files_in_chunks(tmp_path: Path):
    path = tmp_path / "data"
    path.write_bytes(os.urandom(100_000))

    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert archive.hash_file(path, chunk=4096) == expected
    assert archive.hash_file(path) == expected


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


# ------------------------------------------------------------------------ after rebase


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


def test_hash_file_reports_every_byte_it_hashes(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(os.urandom(3 * 2**20 + 5))
    seen = []
    digest = archive.hash_file(path, chunk=2**20, on_bytes=seen.append)
    assert sum(seen) == path.stat().st_size and len(seen) == 4
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
