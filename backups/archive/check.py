"""Checking a published backup against its own SHA256SUMS and manifest, and rewriting the
sums after retention folded a parent into it (the other half of the on-disk contract in
``archive``)."""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import qemu_img
from .format import GENERATED, SUMS, ArchiveError, DiskEntry, Manifest, need
from .store import (
    coverage_problems,
    hash_member,
    is_regular,
    kind_of,
    open_member,
    read_manifest,
    read_sums,
    tree,
    write_generated,
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
    stop: threading.Event | None = None,
) -> VerifyResult:
    """Re-read a backup the way a restore would.  qcow2 has no data checksums, so the
    SHA-256 pass is what finds bit rot; the image headers must say what the manifest says
    (format, size, backing file, no external data file) before ``qemu-img check`` adds
    metadata consistency.

    Everything here is untrusted input: files are opened only as regular files (no link
    followed, no FIFO waited on), and qemu-img never opens a backing file (``check`` runs
    on the image alone; ``info`` does not open the chain).

    ``hashed``: digests the caller computed from these very files moments ago (the check
    right after a backup); they are compared with SHA256SUMS instead of being read again.
    Scheduled verification passes nothing and re-reads everything. ``stop`` (anything with
    ``is_set()``) raises ``Stop`` within one read, as in ``data``.

    The two halves, ``structure`` and ``data``, are also used apart: a restore checks the
    structure before qemu-img opens the chain and reads the data beside the copy.
    """
    found = structure(backup_dir, check_images=check_images)
    if found.sums is None:
        return VerifyResult(False, found.errors, 0, 0)
    more = data(found, hashed=hashed, check_images=check_images, stop=stop)
    errors = found.errors + more.errors
    return VerifyResult(not errors, errors, more.checked_files, more.bytes)


@dataclass(frozen=True)
class Structure:
    """What ``structure`` found: its errors, and what ``data`` goes on with (``sums`` is
    None when SHA256SUMS itself is unusable; ``sound`` are the images whose header is as
    the manifest says, the only ones ``qemu-img check`` may open)."""

    directory: Path
    errors: tuple[str, ...]
    sums: dict[str, str] | None
    sound: tuple[DiskEntry, ...] = ()


def structure(backup_dir: str | os.PathLike, *, check_images: bool = True) -> Structure:
    """The cheap half of ``verify``, nothing but metadata read: the directory and its files
    are plain, every file is listed in SHA256SUMS, the manifest is readable and covered,
    and every image header says what the manifest says (``header_problems``)."""
    directory = Path(os.path.abspath(backup_dir))
    problem = _directory_problem(directory)
    if problem:
        return Structure(directory, (problem,), None)
    try:
        sums = read_sums(directory)
    except (ArchiveError, OSError) as exc:
        return Structure(directory, (str(exc),), None)
    errors: list[str] = []
    try:
        unlisted = tree(directory) - sums.keys() - {SUMS}
        errors += [f"{name}: not listed in {SUMS}" for name in sorted(unlisted)]
    except (ArchiveError, OSError) as exc:
        errors.append(str(exc))
    try:
        manifest = read_manifest(directory)
    except (ArchiveError, OSError) as exc:
        errors.append(str(exc))
        manifest = None
    sound = []
    if manifest is not None:
        errors += coverage_problems(manifest, sums)
        for disk in manifest.disks if check_images else ():
            header = header_problems(directory, disk)
            errors += header
            sound += [] if header else [disk]
    return Structure(directory, tuple(errors), sums, tuple(sound))


class Stop(Exception):
    """``data`` was asked to stop (the restore it runs beside failed or was cancelled)."""


def data(
    found: Structure,
    *,
    hashed: dict[str, str] | None = None,
    check_images: bool = True,
    stop: threading.Event | None = None,
    keep_cache: bool = False,
    first_error: bool = False,
) -> VerifyResult:
    """The expensive half of ``verify``: every file in SHA256SUMS hashed (those in
    ``hashed`` only compared), then ``image_checks`` unless ``check_images`` is false.
    ``stop`` set raises ``Stop`` within one read; ``keep_cache`` leaves what was read in
    the page cache, for a copy reading the same files meanwhile; ``first_error`` ends the
    check at the first error (a restore fails on it, the copy beside it with it)."""
    directory, sums = found.directory, found.sums or {}
    errors: list[str] = []
    fresh = {name: digest for name, digest in (hashed or {}).items() if name in sums}
    errors += [f"{n}: checksum mismatch" for n, d in sorted(fresh.items()) if sums[n] != d]
    errors += [f"{n}: missing" for n in sorted(fresh) if not is_regular(directory / n)]
    rest = {name: digest for name, digest in sums.items() if name not in fresh}
    if first_error and errors:
        return VerifyResult(False, tuple(errors), 0, 0)
    checked, total = _verify_sums(directory, rest, errors, stop, keep_cache, first_error)
    checked += len(fresh)
    if check_images:
        _stop_if_asked(stop)
        errors += image_checks(found)
    return VerifyResult(not errors, tuple(errors), checked, total)


def image_checks(found: Structure) -> list[str]:
    """``qemu-img check`` of every qcow2 image whose header ``structure`` found sound: the
    metadata's consistency, read from the image alone (tens of milliseconds even for a
    large image: only its tables are read)."""
    problems = []
    for disk in found.sound:
        if disk.image_format != "qcow2":
            continue  # raw has no metadata to check
        try:
            result = qemu_img.check(str(found.directory / disk.file), "qcow2")
        except qemu_img.QemuImgError as exc:
            problems.append(f"{disk.file}: {exc}")
            continue
        if not result.ok:
            problems.append(f"{disk.file}: qemu-img check failed: {result.output}")
    return problems


def _stop_if_asked(stop: threading.Event | None, _n: int = 0) -> None:
    if stop is not None and stop.is_set():
        raise Stop("stopped")


def _directory_problem(backup_dir: Path) -> str | None:
    """The backup directory and its VM directory must be plain directories: a symlink
    there would make everything below read from elsewhere."""
    for path in (backup_dir, backup_dir.parent):
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return f"{path} does not exist"
        except OSError as exc:
            return f"{path}: {exc}"
        if not stat.S_ISDIR(mode):
            return f"{path}: {kind_of(mode)}, not a plain directory; not read"
    return None


def _verify_sums(
    directory: Path,
    sums: dict[str, str],
    errors: list[str],
    stop: threading.Event | None = None,
    keep_cache: bool = False,
    first_error: bool = False,
) -> tuple[int, int]:
    checked = total = 0
    on_bytes = None if stop is None else (lambda n: _stop_if_asked(stop))
    for name, expected in sorted(sums.items()):
        _stop_if_asked(stop)
        if first_error and errors:
            break
        try:
            actual, size = hash_member(directory, name, on_bytes=on_bytes, drop=not keep_cache)
            total += size
        except FileNotFoundError:
            errors.append(f"{name}: missing")
            continue
        except ArchiveError as exc:
            errors.append(str(exc))
            continue
        except OSError as exc:
            errors.append(f"{name}: cannot read: {exc}")
            continue
        checked += 1
        if actual != expected:
            errors.append(f"{name}: checksum mismatch")
    return checked, total


def header_problems(directory: Path, disk: DiskEntry) -> list[str]:
    """What an image's header says, compared with its manifest entry, before any qemu-img
    call that would act on it (check, measure, convert, rebase): a header that names
    another backing file (``/etc/hostname``, a FIFO) or an external data file would make
    qemu-img read the host's files into a backup or block on them.  ``qemu-img info``
    reads only the header of this one file."""
    path = directory / disk.file
    try:
        os.close(open_member(directory, disk.file))
    except FileNotFoundError:
        return [f"{disk.file}: missing"]
    except (ArchiveError, OSError) as exc:
        return [str(exc)]
    try:
        info = qemu_img.info(str(path), disk.image_format)
    except qemu_img.QemuImgError as exc:
        return [f"{disk.file}: {exc}"]
    problems = []
    if info.format != disk.image_format:
        problems.append(f"{disk.file}: header says {info.format}, not {disk.image_format}")
    if info.virtual_size != disk.virtual_size:
        problems.append(
            f"{disk.file}: virtual size {info.virtual_size}, manifest says {disk.virtual_size}"
        )
    if (info.backing_filename, info.backing_format) != (disk.backing, disk.backing_format):
        problems.append(f"{disk.file}: backs onto {info.backing_filename!r}, not {disk.backing!r}")
    if info.data_file is not None:
        problems.append(f"{disk.file}: names an external data file {info.data_file!r}")
    if disk.backing and not problems and not is_regular(directory / disk.backing):
        problems.append(f"{disk.file}: its backing file {disk.backing} is missing or not a file")
    return problems


def chain_dirs(backup_dir: str | os.PathLike) -> list[Path]:
    """The backup and every backup it builds on, newest first (siblings by name).  Raises
    ArchiveError when a link is missing or unreadable, or the chain loops."""
    dirs: list[Path] = []
    current: Path | None = Path(os.path.abspath(backup_dir))
    while current is not None:
        need(current not in dirs and len(dirs) < 1000, f"chain of {backup_dir} loops")
        problem = _directory_problem(current)
        need(problem is None, f"backup {current.name} (the chain needs it): {problem}")
        dirs.append(current)
        parent = read_manifest(current).parent
        current = current.parent / parent if parent else None
    return dirs


def verify_chain(backup_dir: str | os.PathLike) -> list[tuple[Path, VerifyResult]]:
    """``verify`` of the backup and of every backup it builds on, newest first: what a
    restore reads, and what a fold rewrites.  A broken link (missing, unreadable) is
    returned as a failed result for that link."""
    try:
        dirs = chain_dirs(backup_dir)
    except (ArchiveError, OSError) as exc:
        return [(Path(backup_dir), VerifyResult(False, (str(exc),), 0, 0))]
    return [(directory, verify(directory)) for directory in dirs]


def record_rewrite(backup_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Record that retention rewrote images here (folded a parent in, moved the backing):
    ``manifest`` carries the new digests, taken from the rewritten files before they were
    switched in.  The other files keep their recorded digest, so bit rot in an untouched
    file is never blessed as the new truth.  Each file is replaced atomically, SHA256SUMS
    last."""
    backup_dir = Path(backup_dir)
    old = read_manifest(backup_dir)
    same = (old.vm_uuid, old.run_id) == (manifest.vm_uuid, manifest.run_id)
    need(same, f"manifest is for another backup than {backup_dir}")
    sums = {k: v for k, v in read_sums(backup_dir).items() if k not in GENERATED - {"domain.xml"}}
    for disk in manifest.disks:
        sums[disk.file] = disk.sha256
    write_generated(backup_dir, manifest, sums)
