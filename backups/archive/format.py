"""The on-disk backup format: names, patterns and the manifest — the contract with anyone
restoring without vmbackup (DESIGN.md, "On-disk format"). Pure: no I/O, no Django.

A backup is a plain directory ``<root>/<vm>/<stamp>-<run>/``, built in a dot-named
``.<stamp>-<run>.<site>.partial`` sibling. File names are restricted (one component, or below
``tpm/``; no backslash or control characters) so each SHA256SUMS line is a plain
``<hex>  <name>``, and so names that end up in shell commands and paths cannot escape.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePath

FORMAT_VERSION = 1
SUMS = "SHA256SUMS"
MANIFEST = "backup.json"
# Files write_metadata() produces itself; a caller's checksum list must not claim them.
GENERATED = frozenset({MANIFEST, "domain.xml", "RESTORE.md", "restore.sh", SUMS})
FORMATS = frozenset({"qcow2", "raw"})
KINDS = frozenset({"full", "incremental"})
_STAMP = r"\d{8}T\d{6}Z"
BACKUP_RE = re.compile(rf"^({_STAMP})-([1-9]\d*)$")
# ``.<stamp>-<run>.<site>.partial`` (versions before the site id: no ``.<site>``)
PARTIAL_RE = re.compile(rf"^\.({_STAMP}-[1-9]\d*)(?:\.([0-9a-f]{{8}}))?\.partial$")
_BACKING_RE = re.compile(rf"^\.\./({_STAMP}-[1-9]\d*)/([^/]+)$")
HEX_RE = re.compile(r"^[0-9a-f]{64}$")
SUMS_LINE_RE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class ArchiveError(Exception):
    """A backup directory, name or manifest that vmbackup refuses to write or trust."""


def need(cond: object, message: str) -> None:
    if not cond:
        raise ArchiveError(message)


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
    need(ok, f"not usable as a directory name ('/', control chars, leading '.'): {name!r}")
    need(len(name.encode("utf-8", "surrogateescape")) <= 255, f"name too long: {name!r}")
    return name


def _file_name(name: object, what: str) -> str:
    """A file name from a manifest: one component that sha256sum lists without escaping
    (no backslash) and that no command takes for an option (no leading '-')."""
    ok = isinstance(name, str) and "\\" not in name and not name.startswith("-")
    need(ok, f"{what} must be a string without '\\' or a leading '-': {name!r}")
    try:
        return safe_component(name)
    except ArchiveError as exc:
        raise ArchiveError(f"{what}: {exc}") from None


def rel_name(name: str) -> str:
    """A path below a backup directory as SHA256SUMS lists it (``tpm/x`` is allowed)."""
    for part in name.split("/"):
        _file_name(part, "file name")
    return name


def stamp(dt: datetime) -> str:
    """UTC, fixed width: backup directory names sort in time order as plain strings."""
    need(dt.utcoffset() is not None, "stamp() needs an aware datetime; naive is ambiguous")
    return dt.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def final_name(stamp: str, run_id: int) -> str:
    name = f"{stamp}-{run_id}"
    need(_is_int(run_id) and BACKUP_RE.match(name), f"bad stamp/run id: {stamp!r}, {run_id!r}")
    return name


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
        need(formats_ok, f"format must be qcow2/raw and file .qcow2/.raw: {self!r}")
        need(_is_int(self.virtual_size) and _is_int(self.bytes), f"bad sizes: {self!r}")
        need(isinstance(self.source, str) and HEX_RE.match(str(self.sha256)), f"bad: {self!r}")
        if self.backing is not None or self.backing_format is not None:
            match = _BACKING_RE.match(str(self.backing))
            ok = match and self.backing_format in FORMATS and self.image_format == "qcow2"
            need(ok, f"backing must be '../<backup>/<file>' + format, on qcow2: {self!r}")
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
        need(all(isinstance(v, str) for v in strings), "uuid/host/method/... must be strings")
        need(_is_iso(self.started) and _is_iso(self.finished), "bad started/finished time")
        need(_is_int(self.run_id, 1), f"run_id must be a positive int: {self.run_id!r}")
        need(self.kind in KINDS, f"kind must be full or incremental: {self.kind!r}")
        ok = isinstance(self.disks, tuple) and all(isinstance(d, DiskEntry) for d in self.disks)
        need(ok, "disks must be a tuple of DiskEntry")
        for values in ([d.target for d in self.disks], [d.file for d in self.disks]):
            need(len(set(values)) == len(values), f"duplicate disk target or file: {values}")
        _check_lineage(self)
        for name in ("nvram", "tpm", "memory"):
            if getattr(self, name) is not None:
                _file_name(getattr(self, name), name)
        ok = isinstance(self.skipped, tuple) and all(_is_skip(item) for item in self.skipped)
        need(ok, "skipped must be a tuple of {'target': str, 'reason': str}")

    def to_dict(self) -> dict:
        """The manifest as JSON types (what the database keeps of it)."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ArchiveError(f"{MANIFEST} is not valid JSON: {exc}") from exc
        need(isinstance(data, dict), f"{MANIFEST} is not a JSON object")
        version = data.get("version")
        need(_is_int(version) and version == FORMAT_VERSION, f"unknown format version {version!r}")
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
        need(m.parent is None, "a full backup has no parent")
        need(all(d.backing is None for d in m.disks), "a full backup has no backing files")
    else:
        ok = isinstance(m.parent, str) and BACKUP_RE.match(m.parent)
        need(bool(ok), f"an incremental needs a parent backup name: {m.parent!r}")
        # an image reads what its header names: only the parent, which is checked with it
        for disk in m.disks:
            parent = disk.backing and _BACKING_RE.match(disk.backing).group(1)
            ok = parent in (None, m.parent)
            need(ok, f"{disk.file} builds on {parent}, not on its parent {m.parent}")


def _known(cls: type, data: object) -> dict:
    need(isinstance(data, dict), f"{cls.__name__} entry is not an object")
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


def partial_owner(path: PurePath) -> tuple[str | None, int] | None:
    """(site id or None for an older version's name, run id) of a backup's ``.partial``
    directory; None when the name is not one of ours at all."""
    match = PARTIAL_RE.match(path.name)
    return match and (match.group(2), int(match.group(1).rpartition("-")[2]))
