"""A small demo domain so a newcomer whose libvirtd is empty has something to back up.

TCG (works on any host, nested or not), no OS, two disks with known content: a qcow2 system
disk and a raw data disk. It idles in the firmware, which is all a backup needs.
"""

import os
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

from . import hypervisor, qemu_img

NAME = "vmbackup-demo"
IMAGES = Path("/var/lib/libvirt/images")
MiB = 1024 * 1024


def _write_pattern(path: Path, size: int) -> None:
    """A recognisable raw image: a text header, a patterned region, then a hole."""
    with open(path, "wb") as handle:
        handle.truncate(size)
        handle.write(b"vmbackup demo disk\n" * 1000)
        handle.seek(8 * MiB)
        handle.write(bytes(range(256)) * 4096)


def demo_xml(name: str, disks: list[tuple[str, Path, str]]) -> str:
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = str(uuid.uuid4())
    ET.SubElement(dom, "memory", unit="MiB").text = "64"
    ET.SubElement(dom, "vcpu").text = "1"
    os_node = ET.SubElement(dom, "os")
    ET.SubElement(os_node, "type", arch="x86_64", machine="pc").text = "hvm"
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    devices = ET.SubElement(dom, "devices")
    for target, path, fmt in disks:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=fmt)
        ET.SubElement(disk, "source", file=str(path))
        ET.SubElement(disk, "target", dev=target, bus="virtio")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def create_demo(uri: str, images: Path = IMAGES, start: bool = True) -> str:
    """Define (and start) the demo domain unless it exists; returns a one-line status."""
    with hypervisor.session(uri) as hv:
        if any(d.name == NAME for d in hv.domains()):
            return f"demo domain {NAME!r} already exists"
        images.mkdir(parents=True, exist_ok=True)
        raw = images / f"{NAME}-data.raw"
        system = images / f"{NAME}-system.qcow2"
        seed = images / f".{NAME}-seed.raw"
        _write_pattern(raw, 64 * MiB)
        _write_pattern(seed, 128 * MiB)
        qemu_img.convert(str(seed), "raw", str(system), "qcow2")
        os.unlink(seed)
        uuid_ = hv.define(demo_xml(NAME, [("vda", system, "qcow2"), ("vdb", raw, "raw")]))
        if start:
            hv.start(uuid_)
    return f"demo domain {NAME!r} defined" + (" and started" if start else "")
