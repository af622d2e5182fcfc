"""Domain, backup, checkpoint and snapshot XML: read and written with ElementTree, never by
formatting strings, and without libvirt so it can be tested as plain data.

``hypervisor`` re-exports the dataclasses; everything else goes through it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass

from . import allowlist

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


def _to_string(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def backup_xml(
    targets: dict[str, str],
    all_targets: Iterable[str],
    incremental: str | None,
    bitmap_disks: Iterable[str],
    pull_socket: str | None = None,
) -> str:
    """``<domainbackup>``: each target gets a qcow2 file; other disks are left out.

    Push mode: QEMU writes the targets. Pull mode (``pull_socket``): QEMU exports each disk
    over NBD on that unix socket, named after its target, and keeps the data the guest
    overwrites meanwhile in the target file, which is then a scratch file.
    Incremental per disk: qcow2 disks (with a bitmap) copy what changed since the checkpoint,
    the others are copied in full.
    """
    bitmap_disks = set(bitmap_disks)
    backup = ET.Element("domainbackup", mode="pull" if pull_socket else "push")
    if pull_socket:
        ET.SubElement(backup, "server", transport="unix", socket=pull_socket)
    disks = ET.SubElement(backup, "disks")
    for target in all_targets:
        if target not in targets:
            ET.SubElement(disks, "disk", name=target, backup="no")
    for target, path in targets.items():
        disk = ET.SubElement(disks, "disk", name=target, backup="yes", type="file")
        if incremental and target in bitmap_disks:
            disk.set("backupmode", "incremental")
            disk.set("incremental", incremental)
        elif incremental:
            disk.set("backupmode", "full")
        ET.SubElement(disk, "scratch" if pull_socket else "target", file=path)
        ET.SubElement(disk, "driver", type="qcow2")
        if pull_socket:
            disk.set("exportname", target)
    return _to_string(backup)


def checkpoint_xml(name: str, targets: Iterable[str], bitmap_disks: Iterable[str]) -> str:
    """A checkpoint with a bitmap on ``bitmap_disks`` and none on the other ``targets``."""
    bitmap_disks = set(bitmap_disks)
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    disks = ET.SubElement(root, "disks")
    for target in dict.fromkeys(targets):
        mode = "bitmap" if target in bitmap_disks else "no"
        ET.SubElement(disks, "disk", name=target, checkpoint=mode)
    return _to_string(root)


def snapshot_xml(
    name: str, overlays: dict[str, str], all_targets: Iterable[str], memory_file: str | None
) -> str:
    """External snapshot of the disks in ``overlays`` (others excluded), RAM optional."""
    snap = ET.Element("domainsnapshot")
    ET.SubElement(snap, "name").text = name
    if memory_file:
        ET.SubElement(snap, "memory", snapshot="external", file=memory_file)
    disks = ET.SubElement(snap, "disks")
    for target in all_targets:
        if target in overlays:
            disk = ET.SubElement(disks, "disk", name=target, snapshot="external")
            ET.SubElement(disk, "driver", type="qcow2")
            ET.SubElement(disk, "source", file=overlays[target])
        else:
            ET.SubElement(disks, "disk", name=target, snapshot="no")
    return _to_string(snap)


def with_disk_source(xml: str, target: str, path: str, fmt: str) -> str:
    """The definition with one disk pointed at ``path`` (its backing chain dropped)."""
    root = ET.fromstring(xml)
    for disk in root.findall("devices/disk"):
        if _text(disk.find("target"), "dev") != target:
            continue
        source = disk.find("source")
        source.set("dev" if disk.get("type") == "block" else "file", path)
        driver = disk.find("driver")
        if driver is not None:
            driver.set("type", fmt)
        backing = disk.find("backingStore")
        if backing is not None:
            disk.remove(backing)
    return _to_string(root)


def with_backing_chain(xml: str, target: str, chain: list[tuple[str, str]]) -> str:
    """The definition with ``target``'s backing chain spelled out (``chain``: (path, format)
    from the image under the disk's source down to the last), ended by an empty
    ``<backingStore/>`` so libvirt probes nothing, and every link marked
    ``<seclabel model='dac' relabel='no'/>``: libvirt's DAC driver must not chown a
    backup's images to QEMU's user (they stay root's, 0600; QEMU reads them through an
    ACL for the time it needs them, see ``private.grant_acl``)."""
    root = ET.fromstring(xml)
    for disk in root.findall("devices/disk"):
        if _text(disk.find("target"), "dev") != target:
            continue
        for old in disk.findall("backingStore"):
            disk.remove(old)
        parent = disk
        for path, fmt in chain:
            store = ET.Element("backingStore", type="file")
            ET.SubElement(store, "format", type=fmt)
            source = ET.SubElement(store, "source", file=path)
            ET.SubElement(source, "seclabel", model="dac", relabel="no")
            _insert_after_source(parent, store)
            parent = store
        _insert_after_source(parent, ET.Element("backingStore"))
    return _to_string(root)


def _insert_after_source(parent: ET.Element, child: ET.Element) -> None:
    source = parent.find("source")
    at = list(parent).index(source) + 1 if source is not None else len(parent)
    parent.insert(at, child)


def restored_xml(
    xml: str,
    *,
    name: str,
    uuid: str,
    disks: dict[str, tuple[str, str]],
    nvram: str | None,
) -> tuple[str, list[str]]:
    """The backed-up definition turned into a new domain that can run beside the original.

    New name and UUID; every ``<mac>`` dropped so libvirt generates fresh addresses; each
    restored disk (``disks``: target -> (path, format)) pointed at its standalone file;
    disks that are not in the backup are left out (a disk we do not have must not silently
    point at the original VM's live image); fixed graphics ports become automatic; and
    nothing outside ``allowlist`` (host paths, devices, raw hypervisor options) is kept.
    Returns the XML and one note for each thing the caller should tell the user.
    """
    root = ET.fromstring(xml)
    notes: list[str] = []
    _set_child_text(root, "name", name)
    _set_child_text(root, "uuid", uuid)
    devices = root.find("devices")
    devices = devices if devices is not None else ET.SubElement(root, "devices")
    for disk in devices.findall("disk"):
        target = _text(disk.find("target"), "dev")
        if disk.get("device", "disk") == "cdrom":
            continue  # not backed up; the allowlist empties it
        if target not in disks:
            # a disk we do not have (a LUN, a shared or network disk...) must not be handed
            # to a second guest next to the original
            devices.remove(disk)
            notes.append(f"disk {target} was not in the backup and is left out")
            continue
        path, fmt = disks[target]
        for child in [c for c in disk if c.tag in ("source", "backingStore")]:
            disk.remove(child)
        disk.set("type", "file")
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver", name="qemu")
            disk.insert(0, driver)
        driver.set("type", fmt)  # cache/io/discard settings are kept
        disk.insert(list(disk).index(driver) + 1, ET.Element("source", file=path))
    notes += allowlist.restrict(root)
    genid = root.find("genid")
    if genid is not None:
        genid.text = None  # a clone must not share the VM generation ID: libvirt makes one
    for interface in devices.findall("interface"):
        for mac in interface.findall("mac"):
            interface.remove(mac)
    for graphics in devices.findall("graphics"):
        for attr in ("port", "tlsPort", "websocket"):
            graphics.attrib.pop(attr, None)
        if graphics.get("autoport") == "no":
            graphics.set("autoport", "yes")
    os_node = root.find("os")
    loader_nvram = os_node.find("nvram") if os_node is not None else None
    if loader_nvram is not None:
        if nvram:
            loader_nvram.text = nvram
        else:
            os_node.remove(loader_nvram)  # libvirt creates a fresh one from the template
            notes.append("no UEFI variable store in the backup: a fresh one is created")
    return _to_string(root), notes


def without_genid(xml: str) -> str:
    """The definition with an empty ``<genid/>`` (libvirt generates a new one) when it has a
    generation ID; unchanged otherwise."""
    root = ET.fromstring(xml)
    genid = root.find("genid")
    if genid is None or not (genid.text or "").strip():
        return xml
    genid.text = None
    return _to_string(root)


def _set_child_text(root: ET.Element, tag: str, text: str) -> None:
    node = root.find(tag)
    if node is None:
        node = ET.Element(tag)
        root.insert(0, node)
    node.text = text


_UNITS = {"b": 1, "bytes": 1, "kb": 10**3, "k": 2**10, "kib": 2**10, "mb": 10**6, "m": 2**20,
          "mib": 2**20, "gb": 10**9, "g": 2**30, "gib": 2**30, "tb": 10**12, "t": 2**40,
          "tib": 2**40}  # fmt: skip


def memory_mib(xml: str) -> int:
    """The domain's memory (``<memory>``, libvirt's units; KiB without one), in MiB rounded up."""
    node = ET.fromstring(xml).find("memory")
    if node is None or not (node.text or "").strip().isdigit():
        return 0
    factor = _UNITS.get(node.get("unit", "KiB").lower())
    if factor is None:
        raise ValueError(f"unknown memory unit {node.get('unit')!r}")
    return -(-int(node.text.strip()) * factor // 2**20)


def sandbox_xml(xml: str, *, console_log: str, description: str) -> tuple[str, list[str]]:
    """A restored definition (``restored_xml``) made into a drill's sandbox: no network
    interface and no USB redirection or smartcard (nothing reaches the guest from outside
    or leaves it), graphics with no listener at all (the screenshot comes through libvirt),
    and the first serial port logged to ``console_log`` (written by virtlogd, as root) so
    the drill reads the console itself. Returns the XML and one note per change."""
    root = ET.fromstring(xml)
    _set_child_text(root, "description", description)
    devices = root.find("devices")
    devices = devices if devices is not None else ET.SubElement(root, "devices")
    notes = []
    for tag, what in (("interface", "network interface"), ("redirdev", "USB redirection"),
                      ("smartcard", "smartcard")):  # fmt: skip
        for node in devices.findall(tag):
            devices.remove(node)
            notes.append(f"the sandbox has no {what}: a {node.get('type', '')} {tag} is left out")
    graphics = devices.findall("graphics")
    for node in graphics:
        devices.remove(node)
    if graphics:
        screen = ET.SubElement(devices, "graphics", type="vnc")
        ET.SubElement(screen, "listen", type="none")
        notes.append("graphics: VNC with no listener (screenshots only)")
    serial = devices.find("serial")
    if serial is None:
        serial = ET.SubElement(devices, "serial", type="pty")
        ET.SubElement(serial, "target", port="0")
        notes.append("a serial port is added for the console log")
    for log in serial.findall("log"):
        serial.remove(log)
    ET.SubElement(serial, "log", file=console_log, append="off")
    return _to_string(root), notes
