"""``vmbackup_offsite import`` against a real restic repository holding snapshots written
the way a copy writes them (``offsite.tags``, ``files_to_send``) — and snapshots that lie:
what they say is validated like a manifest read from disk, and a snapshot that fails is
skipped with its reason while the rest are imported."""

from __future__ import annotations

import io
import shutil
import uuid
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from backups import archive, restic
from backups.models import Backup, CopyTrigger, OffsiteCopy, VirtualMachine
from backups.offsite import files_to_send, restic_repository, tags
from tests.helpers import full_filler, incremental_filler, needs_tools, publish_backup, raw_source

pytestmark = [
    pytest.mark.django_db,
    needs_tools,
    pytest.mark.skipif(not shutil.which("restic"), reason="restic is required"),
]
UUID = "2b1c7a5e-1111-4d6f-9a49-0123456789ab"


def send(repo, directory: Path, marks=None, extra: tuple[str, ...] = ()) -> str:
    manifest = archive.read_manifest(directory)
    names = files_to_send(manifest, archive.read_sums(directory)) + list(extra)
    marks = marks or tags(manifest, directory.name, "0badcafe")
    done = restic.backup(
        repo, str(directory.parent), [f"{directory.name}/{n}" for n in names], marks
    )
    return done.snapshot_id


def run_import(model) -> tuple[str, CommandError | None]:
    out = io.StringIO()
    try:
        call_command(
            "vmbackup_offsite", "import", "--repo", model.url,
            "--password-file", model.password_file, stdout=out,
        )  # fmt: skip
    except CommandError as exc:
        return out.getvalue(), exc
    return out.getvalue(), None


@pytest.fixture
def chain(root, tmp_path):
    source = raw_source(tmp_path / "src.raw")
    full = publish_backup(root, "web", 4, full_filler(source))
    incremental = publish_backup(
        root, "web", 5, incremental_filler(full), kind="incremental", parent=full.name
    )
    return full, incremental


def test_it_imports_a_chain_and_skips_snapshots_that_lie(offsite, chain, root, host, tmp_path):
    repo = restic_repository(offsite)
    full, incremental = chain
    send(repo, full)
    send(repo, incremental)
    lying = publish_backup(root, "web", 6, full_filler(tmp_path / "src.raw"))
    marks = [t if not t.startswith("kind=") else "kind=incremental" for t in tags(
        archive.read_manifest(lying), lying.name, "0badcafe")]  # fmt: skip
    send(repo, lying, marks)
    stray = publish_backup(root, "web", 7, full_filler(tmp_path / "src.raw"))
    (stray / "evil.sh").write_text("echo owned\n")
    send(repo, stray, extra=("evil.sh",))
    unsent = publish_backup(root, "web", 8, full_filler(tmp_path / "src.raw"))
    orphan = publish_backup(
        root, "web", 9, incremental_filler(unsent), kind="incremental", parent=unsent.name
    )
    send(repo, orphan)
    offsite.delete()  # a fresh database: only the URL and the password file are known

    output, failed = run_import(offsite)

    assert failed is not None and "3 snapshot(s) could not be imported" in str(failed)
    assert "its kind= tag says 'incremental', its backup.json 'full'" in output
    assert "evil.sh: file in the snapshot, not sent" in output
    assert "builds on 20261130T010000Z-8, which is neither here nor in the repository" in output
    vm = VirtualMachine.objects.get(uuid=UUID)
    assert vm.offsite_only and vm.gone_at and vm.host == host and vm.name == "web"
    first, second = Backup.objects.order_by("created_at", "pk")
    assert (first.kind, second.kind, second.parent) == ("full", "incremental", first)
    assert Path(first.path).name == full.name and first.pruned_at and first.offsite_only
    assert first.manifest == archive.read_manifest(full).to_dict()
    copies = OffsiteCopy.objects.filter(trigger=CopyTrigger.IMPORT)
    assert sorted(c.backup_id for c in copies) == [first.pk, second.pk]
    assert all(c.verified_at and len(c.snapshot_id) == 64 for c in copies)

    again, failed = run_import(offsite)
    assert "imported 0 backups of 0 new VMs from offsite" in again
    assert "2 known before, 3 skipped" in again


def test_it_files_backups_under_a_vm_this_installation_knows(offsite, chain, host):
    known = VirtualMachine.objects.create(host=host, uuid=UUID, name="web-renamed")
    for directory in chain:
        send(restic_repository(offsite), directory)

    output, failed = run_import(offsite)

    assert failed is None, output
    assert "known only from the offsite copy" not in output
    assert VirtualMachine.objects.get() == known and not known.offsite_only
    assert known.backups.count() == 2


def test_it_refuses_a_wrong_password_and_leaves_no_row(offsite, tmp_path):
    wrong = tmp_path / "wrong-password"
    wrong.write_text(uuid.uuid4().hex)
    wrong.chmod(0o600)
    url = offsite.url
    offsite.delete()
    with pytest.raises(CommandError, match="wrong password"):
        call_command(
            "vmbackup_offsite", "import", "--repo", url, "--password-file", str(wrong),
            stdout=io.StringIO(),
        )  # fmt: skip
    assert not type(offsite).objects.exists()
