"""Restore one disk alone, as a file to attach by hand (DESIGN "Restore": one disk).

The backup's chain for that disk flattened into a standalone image in the disk's own format,
checked like every restore: the whole chain's structure (headers against manifests, ``qemu-img
check``) before qemu-img opens it, every file hashed beside the copy, the chain's fingerprint
compared after it. The image is written to a hidden file beside the destination, private
(0600) from its first byte, and only when copy and check have succeeded is it linked to the
destination's name — a link, not a rename, so a file that appeared there meanwhile is never
replaced. No domain is defined; libvirt is not needed.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .. import archive, private, site
from ..models import Restore
from .common import (
    Progress,
    fingerprint,
    flatten,
    needed_bytes,
    refuse_while_backing_up,
    require_space,
    require_unchanged,
    verify_chain,
)
from .rules import RestoreError, allowed_roots, check_disk_file, within


def restore(restore: Restore, progress: Progress, created: list[Path]) -> str:
    directory, name = check_disk_file(os.path.join(restore.root, restore.name))
    final = Path(directory, name)
    partial = staging_path(restore)
    refuse_while_backing_up(restore.backup.vm)
    backup_dir = Path(restore.backup.path)
    before = fingerprint(backup_dir)
    manifest, check = verify_chain(backup_dir, progress)
    disk = next((d for d in manifest.disks if d.target == restore.disk), None)
    if disk is None:
        have = ", ".join(d.target for d in manifest.disks) or "none"
        raise RestoreError(f"the backup has no disk {restore.disk!r} (it has {have})")
    with check:  # the chain hashed beside the copy; the block ends when both have succeeded
        require_space(Path(directory), needed_bytes(backup_dir, [disk]))
        progress.step("staging", path=str(partial))
        private.create_file(partial)  # 0600 before a byte is copied; O_EXCL, no symlink
        created.append(partial)
        progress.bytes(0, disk.virtual_size)
        flatten(backup_dir, disk, partial, disk.format, progress, 0)
    require_unchanged(backup_dir, before)

    progress.step("publish", path=str(final))
    _fsync(partial)
    try:
        os.link(partial, final)  # never replaces: EEXIST if something is there now
    except FileExistsError:
        raise RestoreError(f"{final} appeared meanwhile; nothing is overwritten") from None
    os.unlink(partial)
    created.clear()
    archive.fsync_dir(Path(directory))
    restore.path = str(final)
    restore.notes = [f"disk {disk.target} as {disk.format}, {disk.virtual_size} bytes"]
    restore.save(update_fields=["path", "notes"])
    progress.bytes(disk.virtual_size)
    return f"restored disk {disk.target} to {final}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_path(restore: Restore) -> Path:
    """The hidden file beside the destination, named with the installation and the restore
    (reconcile removes it after a dead worker)."""
    return Path(restore.root, f".{restore.name}.restore-{site.site_id()}-{restore.pk}.partial")


def repair_dead(restore: Restore) -> str:
    """Reconcile: a dead one-disk restore's hidden file is removed (only a plain file at
    the name this restore's journal gave it); the destination exists only if it finished."""
    steps = {e.get("step"): e for e in restore.journal if isinstance(e, dict)}
    partial = staging_path(restore)
    allowed = any(within(str(partial.parent), root) for root in allowed_roots())
    if allowed and steps.get("staging", {}).get("path") == str(partial):
        try:
            if not partial.is_symlink() and partial.is_file():
                partial.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                return f"interrupted: the worker died; {partial} could not be removed: {exc}"
    if "publish" in steps:
        final = steps["publish"].get("path", "")
        return f"interrupted while publishing: check {final} before using it"
    return "interrupted: the worker died; nothing was written at the destination"
