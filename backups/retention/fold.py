"""Fold a pruned parent into the incremental that needs it — crash-safe and journaled.

Retention deletes a backup that a kept incremental builds on only after its data is folded
into that incremental (``qemu-img rebase`` onto the nearest kept ancestor, or onto nothing).
Rewriting a backup in place would leave a half-rebased image behind a killed worker, and a
stale SHA256SUMS beside it. So a fold never touches the original image until the end:

1. the caller has just verified the whole chain (``archive_check.verify_chain``);
2. a journal ``<vm dir>/.fold-<backup>.json`` says "writing" and names the files beside;
3. each image is copied beside itself (``.<file>.fold``, same directory, so its relative
   backing name still resolves) and the copy is rebased; the original is never written;
4. the copies are hashed and their headers checked; the journal, now "switching", records
   their digests and the new manifest;
5. each copy is renamed over its original; backup.json, RESTORE.md, restore.sh and
   SHA256SUMS are rewritten (each atomically); the database row follows; the journal goes.

``recover`` finishes a fold that reached "switching" (every copy's digest is checked first)
and undoes one that did not (the copies are removed): either way the chain verifies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

from django.conf import settings

from .. import archive, qemu_img, site, worker
from ..archive import check as archive_check
from ..models import Backup, Kind

log = logging.getLogger(__name__)
JOURNAL_PREFIX = ".fold-"
BESIDE_SUFFIX = ".fold"
FOREIGN_AFTER = 86400  # seconds before a journal of another machine's prune is repaired


class FoldError(Exception):
    """A fold that could not be done; the backup is as it was."""


class Foreign(Exception):
    """A fold journal of another installation (another database on this host): not ours."""


def journal_path(backup_dir: Path) -> Path:
    return backup_dir.parent / f"{JOURNAL_PREFIX}{backup_dir.name}.json"


def beside_name(file: str) -> str:
    return f".{file}{BESIDE_SUFFIX}"


def fold(child: Backup, new_parent: Backup | None) -> None:
    """Rebase ``child``'s images onto ``new_parent`` (None: standalone) and record it.
    The caller verified the chain just before; this checks the manifest matches the row."""
    directory = Path(child.path)
    manifest = archive.read_manifest(directory)
    if manifest.vm_uuid != str(child.vm.uuid) or child.run_id not in (None, manifest.run_id):
        raise FoldError(f"{directory.name}: backup.json is not this backup's manifest")
    parent_files = {}
    if new_parent is not None:
        parent_files = {d.target: d.file for d in archive.read_manifest(new_parent.path).disks}
    plan = {d.file: _new_backing(d, new_parent, parent_files) for d in manifest.disks if d.backing}
    journal = journal_path(directory)
    record = {
        "version": 1,
        "site": site.site_id(),
        "holder": worker.worker_id(),
        "backup": directory.name,
        "state": "writing",
        "files": {file: beside_name(file) for file in plan},
    }
    _write_journal(journal, record)
    try:
        digests = {file: _write_beside(directory, file, backing) for file, backing in plan.items()}
    except Exception:  # an error, not a kill: a killed fold is left to ``recover``
        _remove_beside(directory, record["files"])
        journal.unlink(missing_ok=True)
        raise
    disks = tuple(_refolded(d, plan, digests) for d in manifest.disks)
    manifest = dataclasses.replace(
        manifest,
        disks=disks,
        parent=Path(new_parent.path).name if new_parent else None,
        kind=Kind.INCREMENTAL if new_parent else Kind.FULL,
    )
    record.update(state="switching", digests=digests, manifest=manifest.to_json())
    _write_journal(journal, record)
    _switch(directory, record)


def _new_backing(disk, new_parent: Backup | None, parent_files: dict) -> str | None:
    if new_parent is None or disk.target not in parent_files:
        return None
    return f"../{Path(new_parent.path).name}/{parent_files[disk.target]}"


def _write_beside(directory: Path, file: str, backing: str | None) -> list:
    """Copy ``file`` to its hidden sibling and rebase the copy; returns [sha256, bytes]."""
    beside = directory / beside_name(file)
    source = archive.open_member(directory, file)
    with open(source, "rb") as src:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(os.open(beside, flags, 0o600), "wb") as dst:
            shutil.copyfileobj(src, dst, archive.CHUNK)
            dst.flush()
            os.fsync(dst.fileno())
    qemu_img.rebase(
        str(beside),
        "qcow2",
        backing,
        "qcow2" if backing else None,
        timeout=settings.Q_TIMEOUT,
    )
    info = qemu_img.info(str(beside), "qcow2")
    if info.backing_filename != backing or info.data_file is not None:
        raise FoldError(f"{file}: rebased copy backs onto {info.backing_filename!r}")
    fd = archive.open_member(directory, beside.name)
    size = os.fstat(fd).st_size
    return [archive.hash_fd(fd, flush=True), size]


def _refolded(disk, plan: dict, digests: dict):
    if disk.file not in plan:
        return disk
    backing = plan[disk.file]
    sha256, size = digests[disk.file]
    return dataclasses.replace(
        disk,
        backing=backing,
        backing_format="qcow2" if backing else None,
        sha256=sha256,
        bytes=size,
    )


def _switch(directory: Path, record: dict) -> None:
    """Past the point of no return: every rewritten image is complete and its digest is
    in the journal. Rename each over its original, then rewrite the metadata."""
    for file, beside in record["files"].items():
        if os.path.lexists(directory / beside):
            os.replace(directory / beside, directory / file)
    archive.fsync_dir(directory)
    manifest = archive.Manifest.from_json(record["manifest"])
    archive_check.record_rewrite(directory, manifest)
    backup = Backup.objects.filter(path=str(directory)).first()
    if backup is not None:
        parent = None
        if manifest.parent:
            parent = Backup.objects.filter(path=str(directory.parent / manifest.parent)).first()
        backup.parent = parent
        backup.kind = manifest.kind
        backup.manifest = manifest.to_dict()
        backup.save(update_fields=["parent", "kind", "manifest"])
    journal_path(directory).unlink(missing_ok=True)
    archive.fsync_dir(directory.parent)


def _write_journal(path: Path, record: dict) -> None:
    archive.write_private(path, json.dumps(record, indent=2, sort_keys=True).encode())
    archive.fsync_dir(path.parent)


def _remove_beside(directory: Path, files: dict) -> None:
    for beside in files.values():
        path = directory / beside
        if os.path.lexists(path) and not path.is_dir():
            path.unlink()


def journals(vm_dir: Path) -> list[Path]:
    return sorted(vm_dir.glob(f"{JOURNAL_PREFIX}*.json"))


def _holder_alive(record: dict, journal: Path) -> bool:
    """A fold's prune still runs: its process lives (this host; not this very process,
    which runs no fold while it recovers one) or, elsewhere, its journal is recent."""
    holder = str(record.get("holder", ""))
    alive = worker.process_alive(holder)
    if alive is None:
        return time.time() - journal.stat().st_mtime < FOREIGN_AFTER
    return alive and holder != worker.worker_id()


def recover(journal: Path, me: str) -> str | None:
    """Finish or undo the fold a dead prune of this installation (site ``me``) left; None
    when its prune is still alive. Raises ``Foreign`` for another installation's."""
    try:
        record = json.loads(archive.read_member(journal.parent, journal.name))
        directory = journal.parent / archive.safe_component(record["backup"])
        # the names beside are derived, never taken from the journal (a file in a root)
        files = {archive.safe_component(f): beside_name(f) for f in record["files"]}
    except (ValueError, KeyError, TypeError, AttributeError, archive.ArchiveError) as exc:
        raise FoldError(f"{journal}: unreadable fold journal: {exc}") from exc
    if record.get("site") != me:
        raise Foreign(f"{journal}: a fold of another installation ({record.get('site')})")
    if _holder_alive(record, journal):
        return None
    if record.get("state") != "switching":
        _remove_beside(directory, files)
        journal.unlink()
        return f"fold of {directory.name} undone (it had not switched)"
    for file, (sha256, _size) in record["digests"].items():
        name = files[file] if os.path.lexists(directory / files[file]) else file
        actual, _ = archive.hash_member(directory, name)
        if actual != sha256:
            raise FoldError(f"{directory.name}/{name}: not the image the fold recorded; left as is")
    record["files"] = files
    _switch(directory, record)
    return f"fold of {directory.name} finished"
