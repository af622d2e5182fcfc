"""Restore from offsite: the backup's chain fetched out of its restic repository into a
hidden, private staging directory, which the restore paths (new domain, in place) then read
exactly as they read a backup here — the same checks, the same copy.

The repository is untrusted input like a backup root: each snapshot's listing must be the
layout ``offsite`` writes (``/<backup dir>/…``, plain files and directories, nothing else)
before restic writes a byte, restic restores only that directory (``--include``), and the
fetched directories are then checked by the restore as any backup is (every image header
against its manifest before qemu-img opens the chain, every file against SHA256SUMS beside
the copy; nothing is published or switched before both pass). restic 0.14 still writes the
files of a damaged pack (and exits 1): such a snapshot is refused with restic's reason.

The staging directory is ``<VMBACKUP_ROOT>/.offsite-restore-<site>-<restore id>/``: under
the backup root (sized for backups), a dot-directory (never read as a backup), named with
the installation and the restore, and removed when the restore ends, however it ends (by
reconcile when its worker died).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from django.conf import settings

from .. import archive, private, restic, site
from ..archive.format import BACKUP_RE
from ..models import Backup, OffsiteCopy, OffsiteRepository, Restore
from ..offsite import restic_repository
from .common import CANCEL_CHECK_EVERY, Progress, require_space
from .rules import RestoreError

NAME = ".offsite-restore-{site}-{id}"


def staging_path(restore: Restore) -> Path:
    return Path(os.path.abspath(settings.VMBACKUP_ROOT)) / NAME.format(
        site=site.site_id(), id=restore.pk
    )


def discard(restore: Restore) -> bool:
    """Remove the restore's staging directory (never a symlink); whether there was one."""
    path = staging_path(restore)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        return True
    return False


def chain(backup: Backup, repository: OffsiteRepository) -> list[tuple[Backup, OffsiteCopy]]:
    """The backup and every backup it builds on, oldest first, each with the copy that
    holds it in ``repository`` (the newest succeeded one)."""
    links: list[tuple[Backup, OffsiteCopy]] = []
    node, seen = backup, set()
    while node is not None:
        if node.pk in seen:
            raise RestoreError(f"the chain of backup {backup.pk} loops")
        seen.add(node.pk)
        copy = (
            OffsiteCopy.objects.in_repository(repository)
            .filter(backup=node)
            .exclude(snapshot_id="")
            .order_by("-finished_at", "-pk")
            .first()
        )
        if copy is None:
            needed = "" if node.pk == backup.pk else f" (backup {backup.pk} builds on it)"
            raise RestoreError(
                f"backup {node.pk} has no copy in offsite repository {repository.name}{needed}"
            )
        links.insert(0, (node, copy))
        node = node.parent
    return links


def fetch(restore: Restore, progress: Progress, created: list[Path]) -> Path:
    """Every snapshot of the chain restored side by side into the staging directory;
    returns the restored backup's directory there. ``created`` gets the staging directory
    at once (the caller removes it whatever happens)."""
    repository = restore.repository
    repo = restic_repository(repository)
    links = chain(restore.backup, repository)
    names = [_name(backup) for backup, _copy in links]
    snapshots = [copy.snapshot_id for _backup, copy in links]
    staging = staging_path(restore)
    progress.step("fetch", repository=repository.name, backups=names, path=str(staging))
    sizes = [_listed_size(repo, snap, name) for snap, name in zip(snapshots, names, strict=True)]
    if not staging.parent.is_dir():
        raise RestoreError(f"backup root {staging.parent} does not exist (VMBACKUP_ROOT)")
    require_space(staging.parent, sum(sizes))
    private.mkdir(staging)
    created.append(staging)
    progress.bytes(0, sum(sizes))
    done = 0
    for (backup, copy), name, size in zip(links, names, sizes, strict=True):
        progress.step("fetch", backup=backup.pk, snapshot=copy.snapshot_id)
        meter = _Meter(staging / name, done, progress)
        try:
            restic.restore(
                repo,
                copy.snapshot_id,
                str(staging),
                include=[f"/{name}"],
                watch=meter,
                timeout=settings.Q_TIMEOUT,
            )
        except restic.ResticError as exc:
            raise RestoreError(_refusal(repository, copy, name, exc)) from exc
        done += size
        progress.bytes(done)
    unexpected = sorted(set(os.listdir(staging)) - set(names))
    if unexpected:
        raise RestoreError(f"the snapshots restored more than their backups: {unexpected}")
    progress.step("fetched", path=str(staging), bytes=done)
    return staging / names[-1]


def _name(backup: Backup) -> str:
    name = Path(backup.path).name
    if not BACKUP_RE.match(name):
        raise RestoreError(f"backup {backup.pk}: {name!r} is not a backup directory name")
    return name


def _listed_size(repo: restic.Repository, snapshot: str, name: str) -> int:
    """The snapshot's bytes, once its listing is the layout a copy writes: ``/<name>`` and
    plain files and directories below it, nothing else (no link, device or other path)."""
    try:
        nodes = restic.ls(repo, snapshot, timeout=settings.Q_TIMEOUT)
    except restic.ResticError as exc:
        raise RestoreError(f"snapshot {snapshot[:8]} cannot be listed: {exc}") from exc
    strange = [
        f"{node.path} ({node.type})"
        for node in nodes
        if node.type not in ("file", "dir")
        or not (node.path == f"/{name}" or node.path.startswith(f"/{name}/"))
    ]
    if strange:
        raise RestoreError(
            f"snapshot {snapshot[:8]} is not a vmbackup copy of {name}: " + ", ".join(strange[:5])
        )
    return sum(node.size for node in nodes if node.type == "file")


def _refusal(repository, copy: OffsiteCopy, name: str, exc: restic.ResticError) -> str:
    """restic's words for what went wrong: for a damaged pack, the files it could not
    restore (``ignoring error for /x/vda.qcow2: ciphertext verification failed``)."""
    if exc.reason != restic.Reason.FAILED:
        return (
            f"backup {name} could not be fetched from offsite repository {repository.name}: {exc}"
        )
    lines = [ln for ln in exc.stderr.splitlines() if "error" in ln.lower()]
    detail = "; ".join(dict.fromkeys(ln.strip() for ln in lines)) or str(exc)
    return (
        f"snapshot {copy.snapshot_id[:8]} of backup {name} in offsite repository "
        f"{repository.name} is damaged, not restoring: {detail[:1000]}"
    )


class _Meter:
    """What restic wrote so far (allocated bytes: restic 0.14 writes every byte, holes
    included), as the restore's progress, with the cancel check; throttled."""

    def __init__(self, directory: Path, base: int, progress: Progress):
        self.directory, self.base, self.progress, self.last = directory, base, progress, 0.0

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last < CANCEL_CHECK_EVERY:
            return
        self.last = now
        self.progress.check_cancel()
        written = 0
        for path in self.directory.rglob("*") if self.directory.is_dir() else ():
            if archive.is_regular(path):
                st = path.lstat()
                written += min(st.st_size, st.st_blocks * 512)
        self.progress.bytes(self.base + written)
