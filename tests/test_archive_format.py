"""Tests for backups.archive.format: the manifest, backup names and safe path components."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from backups import archive
from backups.archive import ArchiveError, Manifest
from tests.helpers import (
    disk,
    manifest,
)


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
