"""What a restored definition may keep: nothing that gives the new domain the host.

A backup's ``domain.xml`` is untrusted input (whoever could edit a backup, or define the
original domain, wrote it), and libvirt runs what a definition asks for as root or as
QEMU's user: a custom ``<emulator>`` binary, ``qemu:commandline`` options, serial ports
writing host files, interfaces bound to host NICs, host devices, a cdrom holding a host
file, a kernel or firmware read from anywhere... Each of those is removed or replaced by
its harmless equivalent here, with one note per removal for the restore page. Pure
ElementTree, unit-tested as data.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
_STANDARD_EMULATOR = re.compile(r"^/usr/(bin|libexec)/(qemu-system-[A-Za-z0-9_]+|qemu-kvm|kvm)$")
FIRMWARE_DIR = "/usr/share/"  # OVMF, SeaBIOS and friends: read-only files of packages
RNG_SOURCES = frozenset({"", "/dev/urandom", "/dev/random"})
HOST_PATH_CHR_TYPES = frozenset({"file", "unix", "dev", "pipe"})
SAFE_AUDIO = frozenset({"none", "spice", "dbus"})
DROPPED_INTERFACES = frozenset({"direct", "hostdev", "vhostuser", "vdpa"})
ALWAYS_DROPPED = (
    ("hostdev", "host device"),
    ("filesystem", "shared directory"),
    ("shmem", "shared memory device"),
    ("lease", "lock lease"),
)


def restrict(root: ET.Element) -> list[str]:
    """Strip ``root`` (a ``<domain>``) down to what the allowlist keeps; returns the notes."""
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    notes: list[str] = []
    for rule in (_namespaced, _os_files, _security_labels, _memory, _sysinfo):
        notes += rule(root)
    for rule in (
        _emulator,
        _always_dropped,
        _char_devices,
        _interfaces,
        _removable_media,
        _passthrough_devices,
        _rng,
        _audio,
        _graphics,
    ):
        notes += rule(devices)
    notes += _render_nodes(root)
    return list(dict.fromkeys(notes))


def _emulator(devices: ET.Element) -> list[str]:
    notes = []
    for node in devices.findall("emulator"):
        path = (node.text or "").strip()
        devices.remove(node)  # libvirt fills in its default emulator for the machine
        if not _STANDARD_EMULATOR.match(path):
            notes.append(f"the emulator {path!r} is not kept: libvirt uses its default")
    return notes


def _namespaced(root: ET.Element) -> list[str]:
    """``qemu:commandline``, ``qemu:capabilities``, ``qemu:override`` (and any other
    hypervisor namespace): raw options handed to the hypervisor, bypassing every check."""
    notes = []
    for child in [c for c in root if isinstance(c.tag, str) and c.tag.startswith("{")]:
        uri, _, local = child.tag[1:].partition("}")
        prefix = "qemu" if uri == QEMU_NS else uri
        root.remove(child)
        notes.append(f"{prefix}:{local} is left out (raw hypervisor options)")
    return notes


def _firmware_path(path: str) -> bool:
    return os.path.isabs(path) and os.path.normpath(path).startswith(FIRMWARE_DIR)


def _os_files(root: ET.Element) -> list[str]:
    """Files QEMU reads at boot: a kernel, an initrd or an ACPI table could be any host
    file (the guest then reads it); firmware must come from the system's packages."""
    os_node = root.find("os")
    if os_node is None:
        return []
    notes = []
    kernel = os_node.find("kernel")
    for tag in ("kernel", "initrd", "dtb", "cmdline"):
        for node in os_node.findall(tag):
            os_node.remove(node)
    if kernel is not None:
        notes.append(
            f"direct kernel boot ({(kernel.text or '').strip()}) is left out: "
            "the new domain boots from its disks"
        )
    for acpi in os_node.findall("acpi"):
        os_node.remove(acpi)
        notes.append("ACPI tables read from host files (<os><acpi>) are left out")
    loader = os_node.find("loader")
    if loader is not None and not _firmware_path((loader.text or "").strip()):
        os_node.remove(loader)
        notes.append(
            f"the firmware {(loader.text or '').strip()!r} is not under {FIRMWARE_DIR}:"
            " left out, libvirt uses its default"
        )
    nvram = os_node.find("nvram")
    if nvram is not None and "template" in nvram.attrib:
        if not _firmware_path(nvram.get("template", "")):
            notes.append(f"the UEFI variable template {nvram.get('template')!r} is left out")
            del nvram.attrib["template"]
    return notes


def _security_labels(root: ET.Element) -> list[str]:
    """Every ``<seclabel>`` goes: the host's default confinement (a dynamic label, files
    relabelled) applies. Only a non-default one is worth a note."""
    notes = []
    for parent in list(root.iter()):
        for label in parent.findall("seclabel"):
            parent.remove(label)
            default = (
                parent is root
                and label.get("type", "dynamic") == "dynamic"
                and label.get("relabel", "yes") == "yes"
                and len(label) == 0
            )
            if not default:
                what = f"type={label.get('type', 'dynamic')}, relabel={label.get('relabel', 'yes')}"
                notes.append(f"a security label ({what}) is left out: the host's default applies")
    return notes


def _memory(root: ET.Element) -> list[str]:
    notes = []
    backing = root.find("memoryBacking")
    if backing is not None:
        for source in backing.findall("source"):
            if source.get("type") == "file":
                backing.remove(source)
                notes.append("file-backed guest memory is left out: anonymous memory is used")
    devices = root.find("devices")
    for node in devices.findall("memory") if devices is not None else []:
        if node.find("source/path") is not None or node.get("model") in {"nvdimm", "virtio-pmem"}:
            devices.remove(node)
            notes.append(f"a {node.get('model')} memory device backed by a host file is left out")
    return notes


def _sysinfo(root: ET.Element) -> list[str]:
    """SMBIOS strings are fine; a firmware config entry read from a host file is not."""
    notes = []
    for sysinfo in root.findall("sysinfo"):
        for entry in [e for e in sysinfo.findall("entry") if "file" in e.attrib]:
            sysinfo.remove(entry)
            notes.append(f"the firmware config entry read from {entry.get('file')} is left out")
    return notes


def _always_dropped(devices: ET.Element) -> list[str]:
    notes = []
    for tag, what in ALWAYS_DROPPED:
        for node in devices.findall(tag):
            devices.remove(node)
            notes.append(f"a {what} ({tag}) of the original is left out: add it by hand if wanted")
    return notes


def _chr_path(node: ET.Element) -> str:
    source = node.find("source")
    return "" if source is None else source.get("path", "")


def _char_devices(devices: ET.Element) -> list[str]:
    """Serial ports, consoles, parallel ports and channels never touch host paths: a file,
    socket, device or pipe becomes a pty; a virtio unix channel (the guest agent's) keeps
    its socket, in the place libvirt chooses; other channels to host paths go."""
    notes = []
    for tag in ("serial", "console", "parallel", "channel"):
        for node in devices.findall(tag):
            for log in node.findall("log"):
                node.remove(log)
                notes.append(f"the {tag} log file {log.get('file')} is left out")
            kind = node.get("type", "pty")
            if kind not in HOST_PATH_CHR_TYPES:
                continue
            path = _chr_path(node)
            target = node.find("target")
            if tag == "channel":
                if kind == "unix" and target is not None and target.get("type") == "virtio":
                    for source in node.findall("source"):
                        if source.attrib.pop("path", None):
                            notes.append(
                                f"channel {target.get('name')}: its socket is made by "
                                f"libvirt, not at {path}"
                            )
                        source.set("mode", "bind")
                    continue
                devices.remove(node)
                notes.append(f"a channel to the host's {path or kind} is left out")
                continue
            node.set("type", "pty")
            for source in node.findall("source"):
                node.remove(source)
            notes.append(f"the {tag} on the host's {path or kind} ({kind}) becomes a pty")
    return notes


def _interfaces(devices: ET.Element) -> list[str]:
    notes = []
    for node in devices.findall("interface"):
        kind = node.get("type", "")
        if kind in DROPPED_INTERFACES:
            devices.remove(node)
            notes.append(
                f"a {kind} interface (host network device) is left out: add it by hand if wanted"
            )
            continue
        for tag in ("script", "downscript"):
            for script in node.findall(tag):
                node.remove(script)
                notes.append(f"the interface {tag} {script.get('path')} is left out")
        for backend in node.findall("backend"):
            node.remove(backend)
            notes.append("the interface's host device paths (<backend>) are left out")
    return notes


def _removable_media(devices: ET.Element) -> list[str]:
    """cdroms and floppies are emptied: their media are not backed up, and a source may be
    any host file or device (the guest would read it)."""
    notes = []
    for disk in devices.findall("disk"):
        device = disk.get("device", "disk")
        if device not in {"cdrom", "floppy"}:
            continue
        target = disk.find("target").get("dev", "") if disk.find("target") is not None else ""
        sources = [c for c in disk if c.tag in ("source", "backingStore")]
        held = next(
            (
                v
                for s in sources
                for k, v in s.attrib.items()
                if k in ("file", "dev", "name", "volume")
            ),
            "",
        )
        for child in sources:
            disk.remove(child)
        if disk.get("type", "file") != "file" or sources:
            disk.set("type", "file")
            notes.append(f"the {device} {target} is emptied (it held {held or 'media'})")
    return notes


def _passthrough_devices(devices: ET.Element) -> list[str]:
    notes = []
    rules = (
        ("redirdev", lambda n: n.get("type") != "spicevmc", "USB redirection from the host"),
        (
            "smartcard",
            lambda n: n.get("mode") != "passthrough" or n.get("type") != "spicevmc",
            "host smartcard",
        ),
        ("input", lambda n: n.get("type") in {"passthrough", "evdev"}, "host input device"),
        (
            "tpm",
            lambda n: n.find("backend") is not None and n.find("backend").get("type") != "emulator",
            "host TPM",
        ),
    )
    for tag, dangerous, what in rules:
        for node in devices.findall(tag):
            if dangerous(node):
                devices.remove(node)
                notes.append(f"a {what} ({tag}) is left out: add it by hand if wanted")
    return notes


def _rng(devices: ET.Element) -> list[str]:
    notes = []
    for rng in devices.findall("rng"):
        for backend in rng.findall("backend"):
            source = (backend.text or "").strip()
            if backend.get("model") == "builtin":
                continue
            if backend.get("model") == "random" and source in RNG_SOURCES:
                continue
            rng.remove(backend)
            fresh = ET.SubElement(rng, "backend", model="random")
            fresh.text = "/dev/urandom"
            notes.append(
                f"the random number source {source or backend.get('model')} is "
                "replaced by /dev/urandom"
            )
    return notes


def _audio(devices: ET.Element) -> list[str]:
    notes = []
    for audio in devices.findall("audio"):
        if audio.get("type", "none") in SAFE_AUDIO:
            continue
        kind, audio_id = audio.get("type"), audio.get("id")
        audio.attrib.clear()
        audio.set("type", "none")
        if audio_id:
            audio.set("id", audio_id)  # sound devices refer to it
        for child in list(audio):
            audio.remove(child)
        notes.append(f"the {kind} audio backend (host sound or files) becomes none")
    return notes


def _graphics(devices: ET.Element) -> list[str]:
    notes = []
    for graphics in devices.findall("graphics"):
        socket = graphics.attrib.pop("socket", None)
        for listen in graphics.findall("listen"):
            if listen.get("type") == "socket":
                socket = socket or listen.get("socket", "")
                graphics.remove(listen)
        if socket is not None:
            notes.append(
                f"the {graphics.get('type')} socket {socket} is left out: "
                "the usual listen address applies"
            )
    return notes


def _render_nodes(root: ET.Element) -> list[str]:
    notes = []
    for node in root.iter():
        path = node.attrib.pop("rendernode", None)
        if path:
            notes.append(f"the host render node {path} is left out")
    return notes
