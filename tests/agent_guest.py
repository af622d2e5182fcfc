"""A tiny real guest that runs the QEMU guest agent (for fsfreeze/thaw tests).

``scripts/build-agent-guest.sh`` builds a Debian -cloud-amd64 kernel and an initramfs holding
busybox-static and qemu-ga; the guest boots by direct kernel boot under TCG, answers the agent on
a virtio-serial channel, and mounts every ext4 virtio disk on ``/mnt/<target>`` so that
``guest-fsfreeze-freeze`` has something real to freeze. Domains follow ``tests.domains``: named
``vmbt-*``, every file under ``tests.domains.BASE`` (the kernel and initrd are copied there so QEMU,
running as libvirt-qemu, can read them), registered with the ``domains`` fixture for teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import libvirt

from tests.domains import (
    BASE,
    OWNER_TAG,
    PREFIX,
    DiskSpec,
    TestDomain,
    add_disks,
    fill,
    make_dir,
    run,
)

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build-agent-guest.sh"
GUEST_DIR = Path(os.environ.get("VMBACKUP_AGENT_GUEST_DIR", "/var/tmp/vmbackup-guest"))
AGENT_CHANNEL = "org.qemu.guest_agent.0"
CMDLINE = "console=ttyS0 quiet"
MEMORY_MIB = 256


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    stamp: str


_built: dict[Path, GuestImage] = {}


def ensure_guest(outdir: Path = GUEST_DIR, timeout: float = 600) -> GuestImage:
    """Build the guest (at most once per process; the script skips an up-to-date build)."""
    outdir = Path(outdir)
    if outdir not in _built:
        done = subprocess.run(
            [str(BUILD_SCRIPT), str(outdir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{BUILD_SCRIPT} failed:\n{done.stderr.strip()}")
        _built[outdir] = GuestImage(
            kernel=outdir / "vmlinuz",
            initrd=outdir / "initrd.img",
            stamp=(outdir / "stamp").read_text().strip(),
        )
    return _built[outdir]


def agent_domain_xml(
    name: str,
    dom_uuid: str,
    kernel: Path,
    initrd: Path,
    disks: dict[str, tuple[Path, str]],
    *,
    console_log: Path | None = None,
    memory_mib: int = MEMORY_MIB,
    cmdline: str = CMDLINE,
) -> str:
    """TCG domain booting ``kernel``/``initrd`` directly, with the agent channel and
    ``disks`` (target -> (path, format)) on virtio; the serial console goes to ``console_log``."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = dom_uuid
    ET.SubElement(dom, "description").text = f"{OWNER_TAG}{os.getpid()}"
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_node = ET.SubElement(dom, "os")
    ET.SubElement(os_node, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_node, "kernel").text = str(kernel)
    ET.SubElement(os_node, "initrd").text = str(initrd)
    ET.SubElement(os_node, "cmdline").text = cmdline
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    devices = ET.SubElement(dom, "devices")
    add_disks(devices, disks)
    ET.SubElement(devices, "controller", type="usb", model="none")
    if console_log is not None:
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=str(console_log), append="off")
        ET.SubElement(serial, "target", port="0")
    else:
        serial = ET.SubElement(devices, "serial", type="null")
        ET.SubElement(serial, "target", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL)
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def make_ext4(path: Path, fmt: str, size_mib: int) -> None:
    """An empty ext4 filesystem spanning the whole disk (raw, or converted to qcow2)."""
    raw = path if fmt == "raw" else path.with_name(path.name + ".raw")
    run(["qemu-img", "create", "-q", "-f", "raw", str(raw), f"{size_mib}M"])
    run(["mkfs.ext4", "-q", "-F", "-L", path.stem, str(raw)])
    if raw != path:
        run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(path)])
        raw.unlink()


def create_agent_domain(
    domains,
    disks: list[DiskSpec] | None = None,
    *,
    ext4: tuple[str, ...] | set[str] = (),
    start: bool = True,
    image: GuestImage | None = None,
) -> TestDomain:
    """Define (and start) an agent guest through the ``domains`` fixture, which removes it.

    ``disks`` are created like ``tests.domains`` does (pattern-filled); targets listed in
    ``ext4`` get an ext4 filesystem instead, which the guest mounts on ``/mnt/<target>``.
    """
    image = image or ensure_guest()
    token = uuidlib.uuid4().hex[:8]
    name = f"{PREFIX}agent-{token}"
    directory = make_dir(BASE / f"{PREFIX}agent-{token}")
    dom_uuid = str(uuidlib.uuid4())
    domain = TestDomain(name=name, uuid=dom_uuid, dir=directory, disks={}, formats={})
    domains.created.append(domain)  # registered first: teardown removes the directory anyway

    kernel = directory / "vmlinuz"
    initrd = directory / "initrd.img"
    for src, dst in ((image.kernel, kernel), (image.initrd, initrd)):
        shutil.copyfile(src, dst)
        dst.chmod(0o644)
    paths: dict[str, tuple[Path, str]] = {}
    for spec in disks or []:
        path = directory / f"{spec.target}.{spec.fmt}"
        if spec.target in ext4:
            if spec.patterns:
                raise ValueError(f"{spec.target}: an ext4 disk takes no patterns")
            make_ext4(path, spec.fmt, spec.size_mib)
        else:
            run(["qemu-img", "create", "-q", "-f", spec.fmt, str(path), f"{spec.size_mib}M"])
            fill(path, spec.fmt, spec.patterns)
        paths[spec.target] = (path, spec.fmt)
        domain.disks[spec.target] = path
        domain.formats[spec.target] = spec.fmt

    xml = agent_domain_xml(
        name, dom_uuid, kernel, initrd, paths, console_log=console_log_path(domain)
    )
    dom = domains.conn.defineXML(xml)
    if start:
        dom.create()
    return domain


def console_log_path(domain: TestDomain) -> Path:
    return domain.dir / "console.log"


def console_tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return "(no console log)"
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(console log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _console_log_of(dom) -> Path | None:
    try:
        root = ET.fromstring(dom.XMLDesc(0))
    except libvirt.libvirtError:
        return None
    source = root.find("./devices/serial[@type='file']/source")
    return Path(source.get("path")) if source is not None else None


def agent_connected(dom) -> bool:
    """Whether qemu-ga in the guest has opened its port (libvirt's live channel state)."""
    root = ET.fromstring(dom.XMLDesc(0))
    for target in root.iterfind("./devices/channel/target[@type='virtio']"):
        if target.get("name") == AGENT_CHANNEL:
            return target.get("state") == "connected"
    return False


def agent_command(dom, execute: str, arguments: dict | None = None, timeout: int = 5):
    """Run one guest agent command on the libvirt domain ``dom``; returns its ``return``."""
    import libvirt_qemu

    command: dict = {"execute": execute}
    if arguments is not None:
        command["arguments"] = arguments
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), timeout, 0)
    return json.loads(reply)["return"]


def wait_for_agent(conn, dom_uuid: str, timeout: float = 90) -> float:
    """Poll ``guest-ping`` until the agent answers; returns the seconds waited.

    Raises TimeoutError (with the end of the serial console log) if it does not answer in time
    or the domain stops running.
    """
    import libvirt_qemu

    dom = conn.lookupByUUIDString(dom_uuid)
    started = time.monotonic()
    deadline = started + timeout
    last_error = ""
    while True:
        if not dom.isActive():
            last_error = "domain is not running"
            break
        try:
            # Ping only once the port is open: no "agent is not connected" error per poll.
            if agent_connected(dom):
                libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 5, 0)
                return time.monotonic() - started
            last_error = "agent channel not connected"
        except libvirt.libvirtError as exc:
            last_error = str(exc)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    raise TimeoutError(
        f"guest agent of {dom.name()} did not answer within {timeout:.0f} s: {last_error}\n"
        f"--- serial console ---\n{console_tail(_console_log_of(dom))}"
    )
