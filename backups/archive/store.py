"""Writing and reading backup directories: stage, publish, discard, list, hash — and every
read of a stored backup opened the untrusted-input way (regular files only, no symlink
followed, no FIFO waited on).

A backup is built in a dot-named ``.partial`` sibling and published by one rename: readers
see a complete backup or nothing, and a crash leaves only a dot-directory that readers
ignore. SHA256SUMS covers every file in the directory except itself (images, NVRAM,
``tpm/*``, memory, domain.xml, backup.json, RESTORE.md, restore.sh): tampered instructions
are as harmful as rotten data, and "everything but one file" needs no lookup. No Django:
restore tooling and tests must work without a database.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from . import instructions
from .format import (
    BACKUP_RE,
    GENERATED,
    HEX_RE,
    MANIFEST,
    PARTIAL_RE,
    SUMS,
    SUMS_LINE_RE,
    ArchiveError,
    Manifest,
    final_name,
    need,
    rel_name,
    safe_component,
)

CHUNK = 8 * 1024 * 1024
MAX_METADATA = 4 * 1024 * 1024  # backup.json / SHA256SUMS larger than this are not ours
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def kind_of(mode: int) -> str:
    kinds = [
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ]
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike, *, dir_fd: int | None = None, name: str = "") -> int:
    """Open a file of a backup for reading, only if it is a regular file.

    Backup roots are untrusted input: a FIFO named like an image would block a reader
    forever, a symlink would lead it to /etc/shadow or /dev/zero.  ``O_NOFOLLOW`` refuses
    the link, ``O_NONBLOCK`` makes opening a FIFO return at once, and ``fstat`` on what was
    actually opened decides — nothing is read before that.
    """
    name = name or os.fspath(path)
    try:
        fd = os.open(path, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArchiveError(f"{name}: a symlink, not followed") from None
        if exc.errno in (errno.ENXIO, errno.ENODEV, errno.EWOULDBLOCK):
            raise ArchiveError(f"{name}: a special file, not read") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ArchiveError(f"{name}: {kind_of(mode)}, not a regular file; not read")
    return fd


def open_member(directory: str | os.PathLike, rel: str) -> int:
    """``open_regular`` of ``rel`` (``tpm/x`` allowed) below a backup directory, with no
    symlink followed on the way: neither the directory itself nor any component below it."""
    try:
        dfd = os.open(directory, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ArchiveError(f"{directory}: not a plain directory (symlink?)") from None
        raise
    try:
        *dirs, base = rel.split("/")
        for part in dirs:
            try:
                fd = os.open(part, _DIR_FLAGS, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ArchiveError(f"{rel}: {part} is not a plain directory") from None
                raise
            os.close(dfd)
            dfd = fd
        return open_regular(base, dir_fd=dfd, name=rel)
    finally:
        os.close(dfd)


def read_member(directory: str | os.PathLike, rel: str, limit: int = MAX_METADATA) -> bytes:
    """A small file of a backup (manifest, sums), refused when it is not a regular file
    or larger than ``limit`` (a hostile 'manifest' must not fill the worker's memory)."""
    with open(open_member(directory, rel), "rb") as f:
        data = f.read(limit + 1)
    need(len(data) <= limit, f"{rel} is larger than {limit} bytes; not ours")
    return data


def is_regular(path: str | os.PathLike) -> bool:
    """lstat says regular file (no symlink followed, nothing opened)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _abs_root(root: str | os.PathLike) -> Path:
    need(os.path.isabs(root), f"backup root must be an absolute path: {root!r}")
    return Path(os.path.abspath(root))


def vm_dir(root: str | os.PathLike, vm_name: str) -> Path:
    """The VM's directory; resolved and checked, so a symlink planted there cannot
    redirect writes outside the root."""
    base = _abs_root(root)
    path = base / safe_component(vm_name)
    real = Path(os.path.realpath(path))
    need(real.parent == Path(os.path.realpath(base)), f"{path} resolves outside root {base}")
    return path


def hash_file(
    path: str | os.PathLike,
    chunk: int = CHUNK,
    *,
    flush: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> str:
    """SHA-256 of a regular file (``open_regular``: no symlink followed, no FIFO waited on)."""
    return hash_fd(open_regular(path), chunk, flush=flush, on_bytes=on_bytes)


def hash_member(
    directory: str | os.PathLike,
    rel: str,
    *,
    on_bytes: Callable[[int], None] | None = None,
    drop: bool = True,
) -> tuple[str, int]:
    """SHA-256 and size of a file below a backup directory (``open_member``)."""
    fd = open_member(directory, rel)
    size = os.fstat(fd).st_size
    return hash_fd(fd, on_bytes=on_bytes, drop=drop), size


def hash_fd(
    fd: int,
    chunk: int = CHUNK,
    *,
    flush: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    drop: bool = True,
) -> str:
    """SHA-256 of an open file read front to back (the descriptor is closed); the kernel
    is told so, to read ahead harder and (afterwards, unless ``drop`` is false) to drop
    the pages, so hashing a huge image does not evict the host's working set.  A restore
    hashing the chain beside the copy keeps them: qemu-img reads the same pages.

    ``flush`` is for a file just written: its dirty pages are written back by a second
    thread while this one hashes, so dropping the pages afterwards does not stall on a
    synchronous writeback (and the later publish fsync finds nothing left to do).
    """
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(fd, "rb", buffering=0) as f:
        writeback = None
        if flush:
            writeback = threading.Thread(target=os.fdatasync, args=(f.fileno(),), daemon=True)
            writeback.start()
        _fadvise(f.fileno(), "POSIX_FADV_SEQUENTIAL")
        while n := f.readinto(buf):
            digest.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
        if writeback is not None:
            writeback.join()
        if drop:
            _fadvise(f.fileno(), "POSIX_FADV_DONTNEED")
    return digest.hexdigest()


def _fadvise(fd: int, advice: str) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, getattr(os, advice))


def _fsync(path: Path, flags: int = os.O_DIRECTORY) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Temp file + fsync + rename: a reader (or a crash) sees the old or the new file,
    never half of one.  The caller fsyncs the directory once all renames are done."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with open(fd, "wb") as f:
        os.fchmod(fd, mode)  # the umask must not decide who may read a backup
        f.write(data)
        f.flush()
        os.fsync(fd)
    os.replace(tmp, path)


def write_private(path: Path, data: bytes) -> None:
    """``_write_atomic`` for files only root may read (journals)."""
    _write_atomic(path, data, 0o600)


def tree(directory: Path) -> set[str]:
    """Every file below `directory`, named as in SHA256SUMS.  Symlinks and special files
    are refused (sha256sum would follow a link out of the backup, and block on a FIFO);
    ``os.walk`` does not follow links into directories, and nothing is opened here."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(directory).as_posix()
            mode = path.lstat().st_mode
            ok = stat.S_ISREG(mode) or (stat.S_ISDIR(mode) and name in dirnames)
            need(ok, f"{kind_of(mode)} in backup directory: {rel}")
            found.update([rel] if name in filenames else [])
    return found


def fingerprint(directory: Path) -> dict[str, list[int]]:
    """(inode, size, mtime, ctime) in nanoseconds of every entry below ``directory``, named
    as in SHA256SUMS; nothing is opened or followed. Whatever rewrites a file — written in
    place, switched by rename, its mode or owner changed — moves its ctime, which no one
    but the kernel sets: two equal fingerprints mean the same bytes, barring decay of the
    medium (what the scheduled re-reads are for). Lists, so the database keeps it as JSON."""
    marks = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if name in dirnames and stat.S_ISDIR(st.st_mode):
                continue
            rel = path.relative_to(directory).as_posix()
            marks[rel] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return dict(sorted(marks.items()))


def _is_partial(path: Path) -> bool:
    return bool(PARTIAL_RE.match(path.name)) and path.is_dir() and not path.is_symlink()


def _looks_partial(path: Path) -> bool:
    name = path.name
    return name.startswith(".") and name.endswith(".partial") and len(name) > len("..partial")


def staging_dir(
    root: str | os.PathLike, vm_name: str, stamp: str, run_id: int, site: str | None = None
) -> Path:
    """Create the private ``.partial`` directory a backup is written into, named with the
    installation's ``site`` id so only its own reconcile ever removes it.

    The root itself must already exist: a missing root usually means an unmounted
    destination, and filling the mount point's parent file system is worse than failing.
    Private (0700), like the VM's directory: a push job lends both to QEMU's user for
    the job only (``private.lent_to``); the VM's directory is made 0700 again here in case
    a killed worker could not take it back.
    """
    name = final_name(stamp, run_id)
    parent = vm_dir(root, vm_name)
    need(parent.parent.is_dir(), f"backup root {parent.parent} does not exist")
    with contextlib.suppress(FileExistsError):
        parent.mkdir(0o700)
        _fsync(parent.parent)
    need(parent.is_dir(), f"{parent} is not a directory")
    parent.chmod(0o700)
    need(not os.path.lexists(parent / name), f"backup {parent / name} already exists")
    need(site is None or re.fullmatch(r"[0-9a-f]{8}", site), f"bad site id {site!r}")
    path = parent / (f".{name}.{site}.partial" if site else f".{name}.partial")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise ArchiveError(f"staging directory {path} already exists") from None
    os.chmod(path, 0o700)
    return path


def write_metadata(
    staging: Path, manifest: Manifest, domain_xml: str, sums: dict[str, str]
) -> None:
    """Write domain.xml, backup.json, RESTORE.md, restore.sh and finally SHA256SUMS.

    `sums` must name every data file already in `staging` (images, nvram, ``tpm/...``,
    memory) exactly once, hashed by the caller while it had the data hot in cache.  A
    file in the directory that nobody hashed is refused rather than silently included
    or left out: it is a bug in the producer.
    """
    staging = Path(staging)
    need(_is_partial(staging), f"not a staging directory: {staging}")
    for name, digest in sums.items():
        need(name not in GENERATED, f"{name} is written by write_metadata, not the caller")
        need(HEX_RE.match(str(digest)) and rel_name(name), f"bad sha256 for {name}")
    sums = dict(sums)
    on_disk = tree(staging) - GENERATED
    problems = [f"not in sums: {n}" for n in sorted(on_disk - sums.keys())]
    problems += [f"in sums but missing: {n}" for n in sorted(sums.keys() - on_disk)]
    problems += coverage_problems(manifest, sums)
    need(not problems, "cannot write metadata: " + "; ".join(problems))
    data = domain_xml.encode()
    _write_atomic(staging / "domain.xml", data)
    sums["domain.xml"] = hashlib.sha256(data).hexdigest()
    write_generated(staging, manifest, sums)


def coverage_problems(manifest: Manifest, sums: dict[str, str]) -> list[str]:
    """Files the manifest promises must be in SHA256SUMS, with the same digest."""
    wanted = {d.file: d.sha256 for d in manifest.disks}
    wanted.update({name: None for name in (manifest.nvram, manifest.memory) if name})
    problems = [f"{name}: not covered by {SUMS}" for name in wanted if name not in sums]
    for name, digest in wanted.items():
        if digest and name in sums and sums[name] != digest:
            problems.append(f"{name}: {MANIFEST} and {SUMS} disagree")
    if manifest.tpm is not None and not any(n.startswith(manifest.tpm + "/") for n in sums):
        problems.append(f"{manifest.tpm}/: no TPM files covered by {SUMS}")
    return problems


def write_generated(directory: Path, manifest: Manifest, sums: dict[str, str]) -> None:
    """SHA256SUMS goes last because it covers the other three."""
    files = [
        (MANIFEST, manifest.to_json(), 0o600),
        ("RESTORE.md", instructions.restore_md(manifest), 0o600),
        ("restore.sh", instructions.restore_sh(manifest), 0o700),
    ]
    for name, text, mode in files:
        data = text.encode()
        _write_atomic(directory / name, data, mode)
        sums[name] = hashlib.sha256(data).hexdigest()
    lines = "".join(f"{sums[name]}  {name}\n" for name in sorted(sums))
    _write_atomic(directory / SUMS, lines.encode())
    _fsync(directory)


def publish(staging: Path) -> Path:
    """Make a finished backup visible with one rename, after everything in it (including
    the images qemu-img wrote) is on stable storage, so a crash cannot leave a published
    backup pointing at unflushed data."""
    staging = Path(staging)
    need(_is_partial(staging), f"not a staging directory: {staging}")
    final = staging.parent / PARTIAL_RE.match(staging.name).group(1)
    _synctree(staging)
    # rename(2) would silently replace an empty directory; run ids are unique, so the
    # check-then-rename window only matters for a bug, and then we want to know.
    need(not os.path.lexists(final), f"refusing to overwrite existing backup {final}")
    os.rename(staging, final)
    _fsync(final.parent)
    return final


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    _fsync(directory)


def make_durable(directory: Path) -> None:
    """fsync every file and directory below ``directory``, then its parent: the step
    before a rename that makes the tree visible (used by restores too)."""
    _synctree(directory)
    _fsync(directory.parent)


def _synctree(directory: Path) -> None:
    for dirpath, _dirs, filenames in os.walk(directory):
        for name in filenames:
            _fsync(Path(dirpath, name), os.O_NOFOLLOW)
        _fsync(Path(dirpath))


def discard(staging: Path, root: str | os.PathLike) -> None:
    """Remove an unpublished backup.  Deleting is the one dangerous thing this module
    does, so the target must look exactly like ``<root>/<vm>/.<name>.partial``."""
    base = Path(os.path.realpath(_abs_root(root)))
    staging = Path(staging)
    need(_looks_partial(staging) and not staging.is_symlink(), f"not staging: {staging}")
    real = Path(os.path.realpath(staging))
    need(real.parent.parent == base, f"{staging} is not a staging directory below {base}")
    if os.path.lexists(real):
        shutil.rmtree(real)


def read_manifest(backup_dir: str | os.PathLike) -> Manifest:
    try:
        text = read_member(backup_dir, MANIFEST)
    except OSError as exc:
        raise ArchiveError(f"cannot read {MANIFEST} in {backup_dir}: {exc}") from exc
    return Manifest.from_json(text)


def list_backups(root: str | os.PathLike, vm_name: str) -> list[Path]:
    """Published backups of one VM, oldest first (stamp, then run id)."""
    found = []
    for entry in vm_dir(root, vm_name).glob("*/" + MANIFEST):
        match = BACKUP_RE.match(entry.parent.name)
        if match and is_regular(entry) and not entry.parent.is_symlink():
            found.append((match.group(1), int(match.group(2)), entry.parent))
    return [entry for *_key, entry in sorted(found)]


def list_partials(root: str | os.PathLike) -> list[Path]:
    """Every ``<root>/*/.*.partial`` directory: what a crashed run left behind."""
    found = []
    for path in _abs_root(root).glob("*/.*.partial"):
        vm = path.parent
        if _looks_partial(path) and path.is_dir() and not path.is_symlink():
            found += [] if vm.name.startswith(".") or vm.is_symlink() else [path]
    return sorted(found)


def read_sums(backup_dir: str | os.PathLike) -> dict[str, str]:
    """Parse SHA256SUMS; names that would leave the directory are refused."""
    try:
        text = read_member(backup_dir, SUMS).decode()
    except (OSError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"cannot read {SUMS} in {backup_dir}: {exc}") from exc
    return parse_sums(text)


def parse_sums(text: str) -> dict[str, str]:
    """SHA256SUMS's lines as {name: digest}; a malformed line, a name listed twice or one
    that would leave the directory is refused (the text is untrusted: a disk, a snapshot)."""
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = SUMS_LINE_RE.match(line)
        need(match is not None, f"{SUMS} line {number} is malformed")
        name = rel_name(match.group(2))
        need(name not in sums, f"{SUMS} lists {name} twice")
        sums[name] = match.group(1).lower()
    return sums
