"""The on-disk backup format: the contract with anyone restoring without vmbackup.

A backup is a plain directory ``<root>/<vm>/<stamp>-<run>/`` (DESIGN.md, "On-disk format"),
built in a dot-named ``.partial`` sibling and published by one rename: readers see a complete
backup or nothing, and a crash leaves only a dot-directory that readers ignore.

SHA256SUMS covers every file in the directory except itself (images, NVRAM, ``tpm/*``, memory,
domain.xml, backup.json, RESTORE.md, restore.sh): tampered instructions are as harmful as rotten
data, and "everything but one file" needs no lookup.  File names are restricted (one component,
or below ``tpm/``; no backslash or control characters) so each line is a plain ``<hex>  <name>``.
No Django imports: restore tooling and tests must work without a database.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from backups import restore

FORMAT_VERSION = 1
SUMS = "SHA256SUMS"
MANIFEST = "backup.json"
# Files write_metadata() produces itself; a caller's checksum list must not claim them.
GENERATED = frozenset({MANIFEST, "domain.xml", "RESTORE.md", "restore.sh", SUMS})
FORMATS = frozenset({"qcow2", "raw"})
KINDS = frozenset({"full", "incremental"})
CHUNK = 8 * 1024 * 1024
MAX_METADATA = 4 * 1024 * 1024  # backup.json / SHA256SUMS larger than this are not ours
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_STAMP = r"\d{8}T\d{6}Z"
_BACKUP_RE = re.compile(rf"^({_STAMP})-([1-9]\d*)$")
# ``.<stamp>-<run>.<site>.partial`` (versions before the site id: no ``.<site>``)
_PARTIAL_RE = re.compile(rf"^\.({_STAMP}-[1-9]\d*)(?:\.([0-9a-f]{{8}}))?\.partial$")
_BACKING_RE = re.compile(rf"^\.\./({_STAMP}-[1-9]\d*)/([^/]+)$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_SUMS_LINE_RE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class ArchiveError(Exception):
    """A backup directory, name or manifest that vmbackup refuses to write or trust."""


def _need(cond: object, message: str) -> None:
    if not cond:
        raise ArchiveError(message)


def _kind(mode: int) -> str:
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
        raise ArchiveError(f"{name}: {_kind(mode)}, not a regular file; not read")
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
    _need(len(data) <= limit, f"{rel} is larger than {limit} bytes; not ours")
    return data


def is_regular(path: str | os.PathLike) -> bool:
    """lstat says regular file (no symlink followed, nothing opened)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_int(value: object, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def safe_component(name: str) -> str:
    """Return `name` if it is usable as exactly one path component below the root.

    Whoever can define domains chooses VM names: they must not climb out of the root
    (``..``, ``/``) or hide from readers (leading dot).  Control characters only ever
    break logs and terminals.  Spaces and quotes are fine.
    """
    ok = isinstance(name, str) and name not in ("", ".", "..") and not name.startswith(".")
    ok = ok and "/" not in name and not _CONTROL_RE.search(name)
    _need(ok, f"not usable as a directory name ('/', control chars, leading '.'): {name!r}")
    _need(len(name.encode("utf-8", "surrogateescape")) <= 255, f"name too long: {name!r}")
    return name


def _file_name(name: object, what: str) -> str:
    """A file name from a manifest: one component that sha256sum lists without escaping
    (no backslash) and that no command takes for an option (no leading '-')."""
    ok = isinstance(name, str) and "\\" not in name and not name.startswith("-")
    _need(ok, f"{what} must be a string without '\\' or a leading '-': {name!r}")
    try:
        return safe_component(name)
    except ArchiveError as exc:
        raise ArchiveError(f"{what}: {exc}") from None


def _rel_name(name: str) -> str:
    """A path below a backup directory as SHA256SUMS lists it (``tpm/x`` is allowed)."""
    for part in name.split("/"):
        _file_name(part, "file name")
    return name


def stamp(dt: datetime) -> str:
    """UTC, fixed width: backup directory names sort in time order as plain strings."""
    _need(dt.utcoffset() is not None, "stamp() needs an aware datetime; naive is ambiguous")
    return dt.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def final_name(stamp: str, run_id: int) -> str:
    name = f"{stamp}-{run_id}"
    _need(_is_int(run_id) and _BACKUP_RE.match(name), f"bad stamp/run id: {stamp!r}, {run_id!r}")
    return name


def _abs_root(root: str | os.PathLike) -> Path:
    _need(os.path.isabs(root), f"backup root must be an absolute path: {root!r}")
    return Path(os.path.abspath(root))


def vm_dir(root: str | os.PathLike, vm_name: str) -> Path:
    """The VM's directory; resolved and checked, so a symlink planted there cannot
    redirect writes outside the root."""
    base = _abs_root(root)
    path = base / safe_component(vm_name)
    real = Path(os.path.realpath(path))
    _need(real.parent == Path(os.path.realpath(base)), f"{path} resolves outside root {base}")
    return path


@dataclass(frozen=True)
class DiskEntry:
    """One disk image in a backup.  Validated on construction, because a manifest may have
    been edited by hand and its names end up in shell commands and file paths."""

    target: str
    source: str
    format: str  # format of the VM's disk, which a restore reproduces
    virtual_size: int
    file: str  # image in the backup dir; its suffix (.qcow2/.raw) is the image's format
    bytes: int
    sha256: str
    backing: str | None = None  # "../<parent dir>/<file>", relative so the tree can move
    backing_format: str | None = None

    def __post_init__(self) -> None:
        _file_name(self.target, "disk target")
        _file_name(self.file, "disk file")
        formats_ok = self.format in FORMATS and self.image_format in FORMATS
        _need(formats_ok, f"format must be qcow2/raw and file .qcow2/.raw: {self!r}")
        _need(_is_int(self.virtual_size) and _is_int(self.bytes), f"bad sizes: {self!r}")
        _need(isinstance(self.source, str) and _HEX_RE.match(str(self.sha256)), f"bad: {self!r}")
        if self.backing is not None or self.backing_format is not None:
            match = _BACKING_RE.match(str(self.backing))
            ok = match and self.backing_format in FORMATS and self.image_format == "qcow2"
            _need(ok, f"backing must be '../<backup>/<file>' + format, on qcow2: {self!r}")
            _file_name(match.group(2), "backing file")

    @property
    def image_format(self) -> str:
        return self.file.rpartition(".")[2]


@dataclass(frozen=True)
class Manifest:
    """backup.json.  ``version`` is the major format version: readers refuse others, and
    ignore keys they do not know so additions do not need a new major version."""

    version: int
    vm_name: str
    vm_uuid: str
    host: str
    method: str
    kind: str
    consistency: str
    started: str
    finished: str
    run_id: int
    disks: tuple[DiskEntry, ...]
    parent: str | None = None
    checkpoint: str | None = None
    skipped: tuple[dict, ...] = ()
    nvram: str | None = None
    tpm: str | None = None
    memory: str | None = None
    tool_version: str = "vmbackup 0.1"

    def __post_init__(self) -> None:
        safe_component(self.vm_name)
        strings = (self.vm_uuid, self.host, self.method, self.consistency, self.tool_version)
        _need(all(isinstance(v, str) for v in strings), "uuid/host/method/... must be strings")
        _need(_is_iso(self.started) and _is_iso(self.finished), "bad started/finished time")
        _need(_is_int(self.run_id, 1), f"run_id must be a positive int: {self.run_id!r}")
        _need(self.kind in KINDS, f"kind must be full or incremental: {self.kind!r}")
        ok = isinstance(self.disks, tuple) and all(isinstance(d, DiskEntry) for d in self.disks)
        _need(ok, "disks must be a tuple of DiskEntry")
        for values in ([d.target for d in self.disks], [d.file for d in self.disks]):
            _need(len(set(values)) == len(values), f"duplicate disk target or file: {values}")
        _check_lineage(self)
        for name in ("nvram", "tpm", "memory"):
            if getattr(self, name) is not None:
                _file_name(getattr(self, name), name)
        ok = isinstance(self.skipped, tuple) and all(_is_skip(item) for item in self.skipped)
        _need(ok, "skipped must be a tuple of {'target': str, 'reason': str}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ArchiveError(f"{MANIFEST} is not valid JSON: {exc}") from exc
        _need(isinstance(data, dict), f"{MANIFEST} is not a JSON object")
        version = data.get("version")
        _need(_is_int(version) and version == FORMAT_VERSION, f"unknown format version {version!r}")
        try:
            disks = tuple(DiskEntry(**_known(DiskEntry, d)) for d in data["disks"])
            fields = {**_known(cls, data), "disks": disks}
            fields["skipped"] = tuple(fields.get("skipped", ()))
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ArchiveError(f"{MANIFEST} is incomplete or malformed: {exc}") from exc


def _check_lineage(m: Manifest) -> None:
    """Parent and backing files must agree with kind, or a restore would miss data."""
    if m.kind == "full":
        _need(m.parent is None, "a full backup has no parent")
        _need(all(d.backing is None for d in m.disks), "a full backup has no backing files")
    else:
        ok = isinstance(m.parent, str) and _BACKUP_RE.match(m.parent)
        _need(bool(ok), f"an incremental needs a parent backup name: {m.parent!r}")
        # an image reads what its header names: only the parent, which is checked with it
        for disk in m.disks:
            parent = disk.backing and _BACKING_RE.match(disk.backing).group(1)
            ok = parent in (None, m.parent)
            _need(ok, f"{disk.file} builds on {parent}, not on its parent {m.parent}")


def _known(cls: type, data: object) -> dict:
    _need(isinstance(data, dict), f"{cls.__name__} entry is not an object")
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _is_skip(item: object) -> bool:
    return isinstance(item, dict) and all(
        isinstance(item.get(k), str) for k in ("target", "reason")
    )


def _is_iso(value: object) -> bool:
    try:
        datetime.fromisoformat(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def hash_file(
    path: str | os.PathLike,
    chunk: int = CHUNK,
    *,
    flush: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> str:
    """SHA-256 of a regular file (``open_regular``: no symlink followed, no FIFO waited on)."""
    return hash_fd(open_regular(path), chunk, flush=flush, on_bytes=on_bytes)


def hash_member(directory: str | os.PathLike, rel: str) -> tuple[str, int]:
    """SHA-256 and size of a file below a backup directory (``open_member``)."""
    fd = open_member(directory, rel)
    size = os.fstat(fd).st_size
    return hash_fd(fd), size


def hash_fd(
    fd: int,
    chunk: int = CHUNK,
    *,
    flush: bool = False,
    on_bytes: Callable[[int], None] | None = None,
) -> str:
    """SHA-256 of an open file read front to back (the descriptor is closed); the kernel
    is told so, to read ahead harder and (afterwards) to drop the pages, so hashing a huge
    image does not evict the host's working set.

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


def _tree(directory: Path) -> set[str]:
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
            _need(ok, f"{_kind(mode)} in backup directory: {rel}")
            found.update([rel] if name in filenames else [])
    return found


def _is_partial(path: Path) -> bool:
    return bool(_PARTIAL_RE.match(path.name)) and path.is_dir() and not path.is_symlink()


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
    _need(parent.parent.is_dir(), f"backup root {parent.parent} does not exist")
    with contextlib.suppress(FileExistsError):
        parent.mkdir(0o700)
        _fsync(parent.parent)
    _need(parent.is_dir(), f"{parent} is not a directory")
    parent.chmod(0o700)
    _need(not os.path.lexists(parent / name), f"backup {parent / name} already exists")
    _need(site is None or re.fullmatch(r"[0-9a-f]{8}", site), f"bad site id {site!r}")
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
    _need(_is_partial(staging), f"not a staging directory: {staging}")
    for name, digest in sums.items():
        _need(name not in GENERATED, f"{name} is written by write_metadata, not the caller")
        _need(_HEX_RE.match(str(digest)) and _rel_name(name), f"bad sha256 for {name}")
    sums = dict(sums)
    on_disk = _tree(staging) - GENERATED
    problems = [f"not in sums: {n}" for n in sorted(on_disk - sums.keys())]
    problems += [f"in sums but missing: {n}" for n in sorted(sums.keys() - on_disk)]
    problems += _coverage_problems(manifest, sums)
    _need(not problems, "cannot write metadata: " + "; ".join(problems))
    data = domain_xml.encode()
    _write_atomic(staging / "domain.xml", data)
    sums["domain.xml"] = hashlib.sha256(data).hexdigest()
    _write_generated(staging, manifest, sums)


def _coverage_problems(manifest: Manifest, sums: dict[str, str]) -> list[str]:
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


def _write_generated(directory: Path, manifest: Manifest, sums: dict[str, str]) -> None:
    """SHA256SUMS goes last because it covers the other three."""
    files = [
        (MANIFEST, manifest.to_json(), 0o600),
        ("RESTORE.md", restore.restore_md(manifest), 0o600),
        ("restore.sh", restore.restore_sh(manifest), 0o700),
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
    _need(_is_partial(staging), f"not a staging directory: {staging}")
    final = staging.parent / _PARTIAL_RE.match(staging.name).group(1)
    _sync_tree(staging)
    # rename(2) would silently replace an empty directory; run ids are unique, so the
    # check-then-rename window only matters for a bug, and then we want to know.
    _need(not os.path.lexists(final), f"refusing to overwrite existing backup {final}")
    os.rename(staging, final)
    _fsync(final.parent)
    return final


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    _fsync(directory)


def make_durable(directory: Path) -> None:
    """fsync every file and directory below ``directory``, then its parent: the step
    before a rename that makes the tree visible (used by restores too)."""
    _sync_tree(directory)
    _fsync(directory.parent)


def _sync_tree(directory: Path) -> None:
    for dirpath, _dirs, filenames in os.walk(directory):
        for name in filenames:
            _fsync(Path(dirpath, name), os.O_NOFOLLOW)
        _fsync(Path(dirpath))


def discard(staging: Path, root: str | os.PathLike) -> None:
    """Remove an unpublished backup.  Deleting is the one dangerous thing this module
    does, so the target must look exactly like ``<root>/<vm>/.<name>.partial``."""
    base = Path(os.path.realpath(_abs_root(root)))
    staging = Path(staging)
    _need(_looks_partial(staging) and not staging.is_symlink(), f"not staging: {staging}")
    real = Path(os.path.realpath(staging))
    _need(real.parent.parent == base, f"{staging} is not a staging directory below {base}")
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
        match = _BACKUP_RE.match(entry.parent.name)
        if match and is_regular(entry) and not entry.parent.is_symlink():
            found.append((match.group(1), int(match.group(2)), entry.parent))
    return [entry for *_key, entry in sorted(found)]


def partial_owner(path: Path) -> tuple[str | None, int] | None:
    """(site id or None for an older version's name, run id) of a backup's ``.partial``
    directory; None when the name is not one of ours at all."""
    match = _PARTIAL_RE.match(path.name)
    return match and (match.group(2), int(match.group(1).rpartition("-")[2]))


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
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _SUMS_LINE_RE.match(line)
        _need(match is not None, f"{SUMS} line {number} is malformed")
        name = _rel_name(match.group(2))
        _need(name not in sums, f"{SUMS} lists {name} twice")
        sums[name] = match.group(1).lower()
    return sums
