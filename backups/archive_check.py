"""Checking a published backup against its own SHA256SUMS and manifest, and rewriting the
sums after retention folded a parent into it (the other half of the on-disk contract in
``archive``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from backups import qemu_img
from backups.archive import (
    GENERATED,
    SUMS,
    ArchiveError,
    DiskEntry,
    Manifest,
    _coverage_problems,
    _need,
    _tree,
    _write_generated,
    hash_file,
    read_manifest,
    read_sums,
)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    errors: tuple[str, ...]
    checked_files: int
    bytes: int


def verify(
    backup_dir: str | os.PathLike,
    *,
    check_images: bool = True,
    hashed: dict[str, str] | None = None,
) -> VerifyResult:
    """Re-read a backup the way a restore would.  qcow2 has no data checksums, so the
    SHA-256 pass is what finds bit rot; ``qemu-img check`` adds metadata consistency and
    proves an incremental's backing chain still opens.

    ``hashed``: digests the caller computed from these very files moments ago (the check
    right after a backup); they are compared with SHA256SUMS instead of being read again.
    Scheduled verification passes nothing and re-reads everything.
    """
    backup_dir = Path(os.path.abspath(backup_dir))
    try:
        sums = read_sums(backup_dir)
    except ArchiveError as exc:
        return VerifyResult(False, (str(exc),), 0, 0)
    errors: list[str] = []
    fresh = {name: digest for name, digest in (hashed or {}).items() if name in sums}
    errors += [f"{n}: checksum mismatch" for n, d in sorted(fresh.items()) if sums[n] != d]
    errors += [f"{n}: missing" for n in sorted(fresh) if not (backup_dir / n).is_file()]
    rest = {name: digest for name, digest in sums.items() if name not in fresh}
    checked, total = _verify_sums(backup_dir, rest, errors)
    checked += len(fresh)
    try:
        unlisted = _tree(backup_dir) - sums.keys() - {SUMS}
        errors += [f"{name}: not listed in {SUMS}" for name in sorted(unlisted)]
        manifest = read_manifest(backup_dir)
    except ArchiveError as exc:
        errors.append(str(exc))
        manifest = None
    if manifest is not None:
        errors += _coverage_problems(manifest, sums)
        if check_images:
            errors += _image_problems(backup_dir, manifest)
    return VerifyResult(not errors, tuple(errors), checked, total)


def _verify_sums(directory: Path, sums: dict[str, str], errors: list[str]) -> tuple[int, int]:
    checked = total = 0
    for name, expected in sorted(sums.items()):
        path = directory / name
        try:
            actual = hash_file(path)
            total += path.stat().st_size
        except FileNotFoundError:
            errors.append(f"{name}: missing")
            continue
        except OSError as exc:
            errors.append(f"{name}: cannot read: {exc}")
            continue
        checked += 1
        if actual != expected:
            errors.append(f"{name}: checksum mismatch")
    return checked, total


def _image_problems(directory: Path, manifest: Manifest) -> list[str]:
    problems = []
    for disk in manifest.disks:
        path = directory / disk.file
        if disk.image_format != "qcow2" or not path.is_file():
            continue  # raw has no metadata; a missing file was reported by the hash pass
        try:
            result = qemu_img.check(str(path), "qcow2")
            info = qemu_img.info(str(path), "qcow2")
        except qemu_img.QemuImgError as exc:
            problems.append(f"{disk.file}: {exc}")
            continue
        if not result.ok:
            problems.append(f"{disk.file}: qemu-img check failed: {result.output}")
        if (info.backing_filename, info.backing_format) != (disk.backing, disk.backing_format):
            problems.append(
                f"{disk.file}: backs onto {info.backing_filename!r}, not {disk.backing!r}"
            )
    return problems


def update_after_rebase(backup_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Record that retention rewrote images here (folded a parent in, moved the backing).

    Images whose entry in `manifest` differs from the stored one are re-hashed; the
    others keep their recorded digest, so bit rot in an untouched file is not blessed
    as the new truth.  Each rewritten file is replaced atomically, SHA256SUMS last.
    """
    backup_dir = Path(backup_dir)
    old = read_manifest(backup_dir)
    same = (old.vm_uuid, old.run_id) == (manifest.vm_uuid, manifest.run_id)
    _need(same, f"manifest is for another backup than {backup_dir}")
    sums = {k: v for k, v in read_sums(backup_dir).items() if k not in GENERATED - {"domain.xml"}}
    previous = {disk.target: disk for disk in old.disks}
    disks = tuple(_refreshed(backup_dir, d, previous.get(d.target)) for d in manifest.disks)
    for disk in disks:
        sums[disk.file] = disk.sha256
    manifest = dataclasses.replace(manifest, disks=disks)
    _write_generated(backup_dir, manifest, sums)


def _refreshed(directory: Path, disk: DiskEntry, old: DiskEntry | None) -> DiskEntry:
    if disk == old:
        return disk
    path = directory / disk.file
    try:
        digest, size = hash_file(path), path.stat().st_size
    except OSError as exc:
        raise ArchiveError(f"cannot re-hash {path}: {exc}") from exc
    return dataclasses.replace(disk, sha256=digest, bytes=size)
