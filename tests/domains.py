"""Tiny real libvirt domains for tests: TCG, no OS, small disks with known content.

Every domain is named ``vmbt-<random>`` so a crashed test run's leftovers can be swept, and
every file lives under one directory that QEMU (running as libvirt-qemu) can traverse.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

URI = os.environ.get("VMBACKUP_TEST_URI", "qemu:///system")
BASE = Path(os.environ.get("VMBACKUP_TEST_DIR", "/var/tmp/vmbackup-tests"))
PREFIX = "vmbt-"
OWNER_TAG = "vmbackup-tests pid="
MiB = 1024 * 1024
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"


def run(argv: list[str], timeout: float = 120) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed: {done.stderr.strip()}")
    return done.stdout


def make_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


@dataclass
class DiskSpec:
    target: str
    fmt: str = "qcow2"  # qcow2 | raw
    size_mib: int = 64
    # (offset MiB, length MiB, byte) written with qemu-io before the domain starts
    patterns: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class TestDomain:
    name: str
    uuid: str
    dir: Path
    disks: dict[str, Path]
    formats: dict[str, str]
    nvram: Path | None = None


def fill(path: Path, fmt: str, patterns) -> None:
    for offset, length, byte in patterns:
        run(["qemu-io", "-f", fmt, "-c", f"write -P {byte} {offset}M {length}M", str(path)])


def default_disks() -> list[DiskSpec]:
    return [
        DiskSpec("vda", "qcow2", 64, [(0, 2, 0xA1), (10, 3, 0xA2), (60, 1, 0xA3)]),
        DiskSpec("vdb", "raw", 64, [(1, 2, 0xB1), (30, 1, 0xB2)]),
    ]


def add_disks(devices: ET.Element, disks: dict[str, tuple[Path, str]]) -> None:
    """One virtio file disk per target -> (path, format)."""
    for target, (path, fmt) in disks.items():
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=fmt)
        ET.SubElement(disk, "source", file=str(path))
        ET.SubElement(disk, "target", dev=target, bus="virtio")


def domain_xml(
    name: str,
    dom_uuid: str,
    disks: dict[str, tuple[Path, str]],
    *,
    cdrom: bool = False,
    nvram: Path | None = None,
    agent: bool = False,
    tpm: bool = False,
    memory_mib: int = 64,
) -> str:
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = dom_uuid
    ET.SubElement(dom, "description").text = f"{OWNER_TAG}{os.getpid()}"
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_node = ET.SubElement(dom, "os")
    ET.SubElement(os_node, "type", arch="x86_64", machine="q35" if nvram else "pc").text = "hvm"
    if nvram:
        ET.SubElement(os_node, "loader", readonly="yes", type="pflash").text = OVMF_CODE
        ET.SubElement(os_node, "nvram", template=OVMF_VARS).text = str(nvram)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    devices = ET.SubElement(dom, "devices")
    add_disks(devices, disks)
    if cdrom:
        disk = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(disk, "driver", name="qemu", type="raw")
        ET.SubElement(disk, "target", dev="sdc", bus="sata")
        ET.SubElement(disk, "readonly")
    if tpm:
        tpm_node = ET.SubElement(devices, "tpm", model="tpm-crb")
        ET.SubElement(tpm_node, "backend", type="emulator", version="2.0")
    if agent:
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


class Domains:
    """Creates test domains and removes every one of them (and their files) at close."""

    def __init__(self, uri: str = URI):
        self.uri = uri
        self.conn = libvirt.open(uri)
        self.created: list[TestDomain] = []

    def create(
        self,
        disks: list[DiskSpec] | None = None,
        *,
        name: str | None = None,
        start: bool = False,
        cdrom: bool = False,
        nvram: bool = False,
        agent: bool = False,
        tpm: bool = False,
    ) -> TestDomain:
        token = uuidlib.uuid4().hex[:8]
        name = name or f"{PREFIX}{token}"
        directory = make_dir(BASE / f"{PREFIX}{token}")
        dom_uuid = str(uuidlib.uuid4())
        domain = TestDomain(name=name, uuid=dom_uuid, dir=directory, disks={}, formats={})
        self.created.append(domain)  # first: teardown removes the directory whatever fails
        paths: dict[str, tuple[Path, str]] = {}
        for spec in disks if disks is not None else default_disks():
            path = directory / f"{spec.target}.{spec.fmt}"
            run(["qemu-img", "create", "-q", "-f", spec.fmt, str(path), f"{spec.size_mib}M"])
            fill(path, spec.fmt, spec.patterns)
            paths[spec.target] = (path, spec.fmt)
        nvram_path = directory / "VARS.fd" if nvram else None
        xml = domain_xml(name, dom_uuid, paths, cdrom=cdrom, nvram=nvram_path, agent=agent, tpm=tpm)
        domain.disks.update({t: p for t, (p, _f) in paths.items()})
        domain.formats.update({t: f for t, (_p, f) in paths.items()})
        domain.nvram = nvram_path
        dom = self.conn.defineXML(xml)
        if start:
            dom.create()
        return domain

    def lookup(self, domain: TestDomain):
        return self.conn.lookupByUUIDString(domain.uuid)

    def remove(self, domain: TestDomain) -> None:
        remove_domain(self.conn, domain.uuid)
        shutil.rmtree(domain.dir, ignore_errors=True)

    def close(self) -> None:
        for domain in self.created:
            self.remove(domain)
        self.conn.close()


def remove_domain(conn, dom_uuid: str) -> None:
    """Destroy and undefine, with its checkpoints and snapshots metadata; never raises."""
    try:
        dom = conn.lookupByUUIDString(dom_uuid)
    except libvirt.libvirtError:
        return
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    try:
        for checkpoint in dom.listAllCheckpoints():
            checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError:
        pass
    try:
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            | libvirt.VIR_DOMAIN_UNDEFINE_TPM
        )
    except libvirt.libvirtError:
        pass


def _owner_alive(xml: str) -> bool:
    """Test domains carry their creator's pid: a sweep never takes a live run's domains."""
    description = ET.fromstring(xml).findtext("description") or ""
    pid = description.removeprefix(OWNER_TAG)
    if not description.startswith(OWNER_TAG) or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    return int(pid) != os.getpid()


def sweep(uri: str = URI) -> None:
    """Remove leftovers of an earlier, killed test run (domains and files)."""
    conn = libvirt.open(uri)
    keep_dirs = set()
    try:
        for dom in conn.listAllDomains():
            if not dom.name().startswith(PREFIX):
                continue
            try:
                xml = dom.XMLDesc(0)
            except libvirt.libvirtError:  # removed meanwhile by the test run that made it
                continue
            if _owner_alive(xml):
                sources = ET.fromstring(xml).findall("devices/disk/source")
                keep_dirs |= {Path(s.get("file", "")).parent.name for s in sources}
                continue
            remove_domain(conn, dom.UUIDString())
    finally:
        conn.close()
    if BASE.exists():
        for child in BASE.iterdir():
            if child.name.startswith(PREFIX) and child.name not in keep_dirs:
                if time.time() - child.stat().st_mtime > 3600:
                    shutil.rmtree(child, ignore_errors=True)


def hmp(conn, dom_uuid: str, command: str) -> str:
    """A human monitor command (qemu-io into a running guest's disk, for example)."""
    import libvirt_qemu

    dom = conn.lookupByUUIDString(dom_uuid)
    return libvirt_qemu.qemuMonitorCommand(
        dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    )


def guest_write(conn, dom_uuid: str, index: int, command: str) -> None:
    """Write into the running guest's disk number ``index`` (virtio-disk<index>) via qemu-io."""
    qom = f"/machine/peripheral/virtio-disk{index}/virtio-backend"
    out = hmp(conn, dom_uuid, f'qemu-io -d {qom} "{command}"')
    if "error" in out.lower() or "invalid" in out.lower():
        raise RuntimeError(out)
