"""The only module that imports libvirt.

Everything crosses this boundary as plain frozen dataclasses or strings: no libvirt object
leaks out, no connection is opened at import, every libvirt error becomes
``HypervisorError`` raised from its cause. Domain XML is read with ElementTree and written
with ElementTree (escaped), never by formatting strings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import libvirt


class HypervisorError(Exception):
    """A libvirt call failed; the message is libvirt's, prefixed with what we were doing."""


# libvirt logs every error to stderr by default; we report them ourselves.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}
AGENT_CHANNEL = "org.qemu.guest_agent.0"


@dataclass(frozen=True)
class DiskInfo:
    target: str
    device: str  # disk | cdrom | floppy | lun
    source_type: str  # file | block | network | volume | ""
    source: str  # path (file/block), "" when empty (e.g. an ejected cdrom) or network
    format: str  # qcow2 | raw | ...
    bus: str
    readonly: bool
    shareable: bool
    alias: str = ""  # e.g. virtio-disk0 (running domains only)
    backing: bool = False  # the source has a backing chain (libvirt's <backingStore>)
    capacity: int | None = None  # virtual size in bytes, when libvirt could tell


@dataclass(frozen=True)
class TpmInfo:
    model: str
    backend: str  # emulator | passthrough
    version: str


@dataclass(frozen=True)
class DomainInfo:
    uuid: str
    name: str
    state: str
    persistent: bool
    disks: tuple[DiskInfo, ...]
    loader: str
    nvram: str
    tpm: TpmInfo | None
    has_agent_channel: bool
    xml: str


def _text(node: ET.Element | None, attr: str, default: str = "") -> str:
    return default if node is None else node.get(attr, default)


def _parse_disk(disk: ET.Element) -> DiskInfo:
    source = disk.find("source")
    source_type = disk.get("type", "")
    if source_type == "file":
        path = _text(source, "file")
    elif source_type == "block":
        path = _text(source, "dev")
    elif source_type == "volume":
        path = _text(source, "volume")
    else:
        path = _text(source, "name")
    backing = disk.find("backingStore")
    return DiskInfo(
        target=_text(disk.find("target"), "dev"),
        device=disk.get("device", "disk"),
        source_type=source_type,
        source=path,
        format=_text(disk.find("driver"), "type"),
        bus=_text(disk.find("target"), "bus"),
        readonly=disk.find("readonly") is not None,
        shareable=disk.find("shareable") is not None,
        alias=_text(disk.find("alias"), "name"),
        backing=backing is not None and backing.find("source") is not None,
    )


def parse_domain_xml(xml: str, state: str = "other", persistent: bool = True) -> DomainInfo:
    """Read what a backup needs to know from a domain definition (pure; unit-tested)."""
    root = ET.fromstring(xml)
    os_node = root.find("os")
    loader = os_node.find("loader") if os_node is not None else None
    nvram = os_node.find("nvram") if os_node is not None else None
    tpm_node = root.find("devices/tpm")
    tpm = None
    if tpm_node is not None:
        backend = tpm_node.find("backend")
        tpm = TpmInfo(
            model=tpm_node.get("model", ""),
            backend=_text(backend, "type"),
            version=_text(backend, "version"),
        )
    has_agent = any(
        _text(channel.find("target"), "name") == AGENT_CHANNEL
        for channel in root.findall("devices/channel")
    )
    return DomainInfo(
        uuid=root.findtext("uuid", "").strip(),
        name=root.findtext("name", "").strip(),
        state=state,
        persistent=persistent,
        disks=tuple(_parse_disk(d) for d in root.findall("devices/disk")),
        loader=(loader.text or "").strip() if loader is not None else "",
        nvram=(nvram.text or "").strip() if nvram is not None else "",
        tpm=tpm,
        has_agent_channel=has_agent,
        xml=xml,
    )


def _capacity(dom, target: str) -> int | None:
    """Virtual size of a disk; None when libvirt cannot tell (e.g. an unreadable source)."""
    try:
        return dom.blockInfo(target)[0]
    except libvirt.libvirtError:
        return None


class Session:
    """One libvirt connection, used as a context manager; hands out plain data only."""

    def __init__(self, uri: str):
        self.uri = uri
        self._conn = None

    def __enter__(self) -> Session:
        try:
            self._conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot connect to {self.uri}: {exc}") from exc
        return self

    def __exit__(self, *exc_info) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    # -- lookups -------------------------------------------------------------------------
    def _dom(self, uuid: str):
        try:
            return self._conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"domain {uuid} not found: {exc}") from exc

    def _info(self, dom, flags: int = 0) -> DomainInfo:
        state, _reason = dom.state()
        info = parse_domain_xml(
            dom.XMLDesc(flags),
            state=_STATES.get(state, "other"),
            persistent=bool(dom.isPersistent()),
        )
        disks = tuple(
            dataclasses.replace(d, capacity=_capacity(dom, d.target)) if d.source else d
            for d in info.disks
        )
        return dataclasses.replace(info, disks=disks)

    def domains(self) -> list[DomainInfo]:
        """Every domain (running and defined), with its current definition."""
        try:
            return [self._info(dom) for dom in self._conn.listAllDomains()]
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot list domains on {self.uri}: {exc}") from exc

    def domain(self, uuid: str) -> DomainInfo:
        try:
            return self._info(self._dom(uuid))
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot read domain {uuid}: {exc}") from exc

    def inactive_xml(self, uuid: str) -> str:
        """The persistent definition (what a restore should define), secure parts included."""
        dom = self._dom(uuid)
        flags = libvirt.VIR_DOMAIN_XML_SECURE
        if dom.isPersistent():
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        return self._call(dom.XMLDesc, flags, doing="read definition")

    def _call(self, fn: Callable, *args, doing: str):
        try:
            return fn(*args)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"{doing}: {exc}") from exc

    # -- lifecycle -------------------------------------------------------------------------
    def define(self, xml: str) -> str:
        """Define a domain; returns its UUID."""
        dom = self._call(self._conn.defineXML, xml, doing="define domain")
        return dom.UUIDString()

    def start(self, uuid: str) -> None:
        self._call(self._dom(uuid).create, doing="start domain")

    def shutdown(self, uuid: str) -> None:
        """Ask the guest to shut down (ACPI); returns at once."""
        self._call(self._dom(uuid).shutdown, doing="shut down domain")

    def destroy(self, uuid: str) -> None:
        self._call(self._dom(uuid).destroy, doing="force off domain")

    def undefine(self, uuid: str) -> None:
        """Undefine with everything libvirt keeps beside the definition (metadata only)."""
        dom = self._dom(uuid)
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        self._call(dom.undefineFlags, flags, doing="undefine domain")

    def rename(self, uuid: str, new_name: str) -> None:
        self._call(self._dom(uuid).rename, new_name, 0, doing="rename domain")

    def wait_state(self, uuid: str, state: str, timeout: float, interval: float = 0.5) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.domain(uuid).state == state:
                return True
            time.sleep(interval)
        return self.domain(uuid).state == state


@contextlib.contextmanager
def session(uri: str) -> Iterator[Session]:
    with Session(uri) as opened:
        yield opened


_event_loop_lock = threading.Lock()
_event_loop_started = False


def ensure_event_loop() -> None:
    """Run libvirt's default event loop in a daemon thread (needed for job events).

    Must run before the connection whose events we want is opened.
    """
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def loop():
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True
