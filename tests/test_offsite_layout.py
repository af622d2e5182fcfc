"""The snapshot layout's pure rules: tags, what is sent, what the listing must show."""

import pytest

from backups import restic
from backups.offsite import OffsiteError, decode, encode, files_to_send, listing_problems, tags
from tests.helpers import disk, manifest

SUMS = {
    "vda.qcow2": "a" * 64,
    "backup.json": "b" * 64,
    "domain.xml": "c" * 64,
    "RESTORE.md": "d" * 64,
    "restore.sh": "e" * 64,
    "tpm/tpm2-00.permall": "f" * 64,
    "checkpoint.xml": "0" * 64,
}


def test_it_tags_a_snapshot_so_it_can_be_found_without_reading_it():
    m = manifest(
        vm_name="db, 100% busy",
        kind="incremental",
        parent="20261129T010000Z-3",
        disks=(
            disk(
                backing="../20261129T010000Z-3/vda.qcow2", backing_format="qcow2", file="vda.qcow2"
            ),
        ),
    )
    found = tags(m, "20261130T010000Z-4", "0badc0de")
    assert found == [
        "vmbackup",
        "site=0badc0de",
        f"uuid={m.vm_uuid}",
        "vm=db%2C 100%25 busy",
        "backup=20261130T010000Z-4",
        "kind=incremental",
        "run=4",
        "parent=20261129T010000Z-3",
    ]
    assert decode(encode("a,b%2C")) == "a,b%2C"


def test_it_sends_what_sha256sums_lists_and_the_manifest_explains():
    m = manifest(tpm="tpm")
    assert files_to_send(m, SUMS) == sorted([*SUMS, "SHA256SUMS"])
    with pytest.raises(
        OffsiteError, match="does not account for: notes.txt, tpm/tpm2-00.permall, tpm/x"
    ):
        files_to_send(manifest(), SUMS | {"notes.txt": "1" * 64, "tpm/x": "2" * 64})


def test_it_compares_the_listing_with_what_was_sent():
    m = manifest()  # vda.qcow2 of 200 KiB
    sizes = {"vda.qcow2": 200 * 1024, "backup.json": 10, "tpm/a/b": 3}
    good = [
        restic.Node("/x", "dir", 0, 0),
        restic.Node("/x/tpm", "dir", 0, 0),
        restic.Node("/x/tpm/a", "dir", 0, 0),
        restic.Node("/x/tpm/a/b", "file", 3, 0),
        restic.Node("/x/vda.qcow2", "file", 200 * 1024, 0),
        restic.Node("/x/backup.json", "file", 10, 0),
    ]
    assert listing_problems(good, "x", sizes, m) == []
    bad = [
        *good[:4],
        restic.Node("/x/vda.qcow2", "file", 5, 0),
        restic.Node("/x/evil", "symlink", 0, 0),
    ]
    assert listing_problems(bad, "x", sizes, m) == [
        "/x/evil: symlink in the snapshot, not sent",
        "/x/backup.json: missing from the snapshot",
        "/x/vda.qcow2: 5 bytes in the snapshot, 204800 sent",
    ]
    assert listing_problems(good, "x", sizes | {"vda.qcow2": 7}, m) == [
        "vda.qcow2: 7 bytes sent, manifest says 204800"
    ]
