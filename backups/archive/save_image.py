"""libvirt's QEMU save image (``memory.save`` of a ``memory`` backup, ``virsh save``): read
its embedded domain definition's identity and give it a new name and UUID, in place.

Why not libvirt: ``virDomainSaveImageDefineXML`` (and ``virDomainRestoreFlags`` with an
alternate XML) refuse any change of name, UUID or MAC address ("Target domain uuid … does
not match source"), so a saved state can only ever come back as the domain it was — the
original VM, which a restore must never touch. libvirt does check everything else (the
restored disk paths, the allowlist's changes) against the saved state's ABI: the restore
hands it the new definition under the old identity first, and only then is the identity
swapped here, the one change libvirt cannot make.

The layout (libvirt ``src/qemu/qemu_saveimage.h``, version 2, host byte order): a 92-byte
header — magic ``LibvirtQemudSave``, version, ``data_len``, ``was_running``,
``compressed``, ``cookieOffset``, 14 unused words — then ``data_len`` bytes holding the
XML (NUL-terminated), the save cookie (NUL-terminated, at ``cookieOffset``) and zero
padding, then QEMU's migration stream, which is never touched. A save image is untrusted
input: every length is checked before it is used, and the file is opened as a regular
file only.
"""

from __future__ import annotations

import os
import re
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from .format import ArchiveError
from .store import open_regular

MAGIC = b"LibvirtQemudSave"
VERSION = 2
HEADER = struct.Struct("=16s19I")  # magic, version, data_len, was_running, compressed, cookie…
MAX_DATA = 16 * 1024 * 1024  # a definition and a cookie; anything larger is not libvirt's
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class SaveImage:
    xml: str
    cookie: bytes  # without its NUL; empty when there is none
    data_len: int
    name: str
    uuid: str


def read(path: str | os.PathLike) -> SaveImage:
    """The header and definition of a save image, checked (no stream byte is read)."""
    with open(open_regular(path), "rb") as f:
        raw = f.read(HEADER.size)
        if len(raw) < HEADER.size:
            raise ArchiveError(f"{path}: too short for a libvirt save image")
        magic, version, data_len, _running, _compressed, cookie_at, *_ = HEADER.unpack(raw)
        if magic != MAGIC:
            raise ArchiveError(f"{path}: not a (complete) libvirt save image")
        if version != VERSION:
            raise ArchiveError(f"{path}: save image version {version}, only {VERSION} is known")
        if not 0 < data_len <= MAX_DATA or cookie_at >= data_len:
            raise ArchiveError(f"{path}: implausible save image header ({data_len} bytes)")
        data = f.read(data_len)
    if len(data) != data_len:
        raise ArchiveError(f"{path}: save image cut short")
    end = data.find(b"\0")
    if end <= 0 or (cookie_at and cookie_at != end + 1):
        raise ArchiveError(f"{path}: save image definition not where its header says")
    cookie = b""
    if cookie_at:
        cookie_end = data.find(b"\0", cookie_at)
        if cookie_end < 0:
            raise ArchiveError(f"{path}: save image cookie not terminated")
        cookie = data[cookie_at:cookie_end]
    xml = data[:end].decode()
    root = ET.fromstring(xml)
    name, uuid = (root.findtext("name") or ""), (root.findtext("uuid") or "")
    return SaveImage(xml=xml, cookie=cookie, data_len=data_len, name=name, uuid=uuid)


def set_identity(path: str | os.PathLike, *, name: str, uuid: str) -> None:
    """Rewrite the definition's ``<name>`` and ``<uuid>`` in place, nothing else: the
    padding libvirt leaves (64 KiB) takes a longer name; the stream stays where it is."""
    if not _NAME.match(name) or not _UUID.match(uuid):
        raise ArchiveError(f"not a name and UUID for a save image: {name!r} {uuid!r}")
    image = read(path)
    xml = _swap(image.xml, "name", image.name, name)
    xml = _swap(xml, "uuid", image.uuid, uuid)
    body = xml.encode() + b"\0"
    cookie_at = len(body) if image.cookie else 0
    if image.cookie:
        body += image.cookie + b"\0"
    if len(body) > image.data_len:
        raise ArchiveError(f"{path}: the new definition does not fit the save image")
    body += b"\0" * (image.data_len - len(body))
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        header = bytearray(os.pread(fd, HEADER.size, 0))
        struct.pack_into("=I", header, 16 + 4 * 4, cookie_at)  # cookieOffset
        os.pwrite(fd, bytes(header) + body, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    again = read(path)
    if (again.name, again.uuid, again.cookie) != (name, uuid, image.cookie):
        raise ArchiveError(f"{path}: the save image's identity was not rewritten")


def _swap(xml: str, tag: str, old: str, new: str) -> str:
    """Exactly one ``<tag>old</tag>`` (the domain's own: names and UUIDs are plain text,
    nothing to escape) becomes ``<tag>new</tag>``."""
    before, after = f"<{tag}>{old}</{tag}>", f"<{tag}>{new}</{tag}>"
    if not old or xml.count(before) != 1:
        raise ArchiveError(f"the save image's definition has no single <{tag}>")
    swapped = xml.replace(before, after)
    if ET.fromstring(swapped).findtext(tag) != new:
        raise ArchiveError(f"the save image's <{tag}> is not the domain's own")
    return swapped
