"""Tiny real guests that run the QEMU guest agent, built by ``scripts/build-agent-guest.sh``.

The initramfs-only guest (``create_agent_domain``; fsfreeze/thaw, shutdown tests): a Debian
-cloud-amd64 kernel and an initramfs holding busybox-static and qemu-ga, booted by direct kernel
boot under TCG; it answers the agent on a virtio-serial channel and mounts every ext4 virtio disk
on ``/mnt/<target>`` so that ``guest-fsfreeze-freeze`` has something real to freeze. Its system
is not on its disks, so a backup of them proves nothing about booting.

The disk-rooted guest (``create_rooted_domain``; restore and drill tests): the whole system is on
virtio disk vda — MBR, syslinux, the kernel and a small initramfs on partition 1, an ext4 root with
busybox, qemu-ga and ``/sbin/init`` on partition 2 (``/dev/vda2``) — and SeaBIOS boots it, so a
restored definition (which drops direct kernel boot) boots it too. ``make_root_disk`` writes a
marker of the test's choosing into ``/etc/vmbackup-proof`` (with debugfs, nothing mounted);
``read_marker`` reads it back through the agent (``guest-file-open``/``read``), ``guest_exec``
runs a command (qemu-ga 7.2 as Debian builds it allows ``guest-exec``: no command is blocked).
A disk that holds no working system never answers the agent: a zeroed disk leaves SeaBIOS
printing "No bootable device." and a broken root partition leaves the initramfs printing
"agent-guest: no root on /dev/vda2: <why>" on the serial console (``wait_for_console``).

Domains follow ``tests.domains``: named ``vmbt-*``, every file under ``tests.domains.BASE`` (the
kernel and initrd are copied there so QEMU, running as libvirt-qemu, can read them), registered
with the ``domains`` fixture for teardown.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import libvirt

from tests.domains import (
    BASE,
    OWNER_TAG,
    PREFIX,
    DiskSpec,
    MiB,
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
ROOT_DEVICE = "/dev/vda2"  # the disk-rooted guest's root, partition 2 of vda
MARKER_PATH = "/etc/vmbackup-proof"
NO_ROOT_LINE = f"agent-guest: no root on {ROOT_DEVICE}"
NO_BOOT_LINE = "No bootable device."  # SeaBIOS, on the serial console with useserial


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    stamp: str
    disk_root: Path  # raw, bootable, the disk-rooted guest's whole system; never written


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
            disk_root=outdir / "disk-root.img",
        )
    return _built[outdir]


def agent_domain_xml(
    name: str,
    dom_uuid: str,
    kernel: Path | None,
    initrd: Path | None,
    disks: dict[str, tuple[Path, str]],
    *,
    console_log: Path | None = None,
    memory_mib: int = MEMORY_MIB,
    cmdline: str = CMDLINE,
) -> str:
    """TCG domain booting ``kernel``/``initrd`` directly (or, with ``kernel`` None, SeaBIOS
    booting the first disk, its messages on the serial console too), with the agent channel and
    ``disks`` (target -> (path, format)) on virtio; the serial console goes to ``console_log``."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = dom_uuid
    ET.SubElement(dom, "description").text = f"{OWNER_TAG}{os.getpid()}"
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_node = ET.SubElement(dom, "os")
    ET.SubElement(os_node, "type", arch="x86_64", machine="pc").text = "hvm"
    if kernel is None:
        ET.SubElement(os_node, "boot", dev="hd")
        ET.SubElement(os_node, "bios", useserial="yes")
    else:
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
    domain = _new_domain(domains, "agent")
    directory, dom_uuid, name = domain.dir, domain.uuid, domain.name

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


def _new_domain(domains, kind: str) -> TestDomain:
    """A name, a UUID and a directory under BASE, registered for teardown before anything
    is made (teardown removes the directory whatever fails next)."""
    token = uuidlib.uuid4().hex[:8]
    name = f"{PREFIX}{kind}-{token}"
    directory = make_dir(BASE / name)
    domain = TestDomain(name=name, uuid=str(uuidlib.uuid4()), dir=directory, disks={}, formats={})
    domains.created.append(domain)
    return domain


def partition_offset(raw: Path, number: int) -> tuple[int, int]:
    """(offset, length) in bytes of MBR partition ``number`` (1-4) of the raw image."""
    with open(raw, "rb") as f:
        mbr = f.read(512)
    if mbr[510:512] != b"\x55\xaa":
        raise ValueError(f"{raw}: no MBR")
    entry = mbr[446 + 16 * (number - 1) : 446 + 16 * number]
    start = int.from_bytes(entry[8:12], "little")
    sectors = int.from_bytes(entry[12:16], "little")
    return start * 512, sectors * 512


def make_root_disk(
    path: Path,
    fmt: str = "qcow2",
    *,
    marker: str | None = None,
    broken: str | None = None,
    size_mib: int | None = None,
    image: GuestImage | None = None,
) -> None:
    """A fresh copy of the disk-rooted guest's disk at ``path`` (raw or qcow2).

    ``marker`` is written into ``MARKER_PATH`` on the root filesystem (debugfs, not mounted).
    ``broken`` makes a disk that holds no working system: "zeros" (the whole disk wiped: SeaBIOS
    finds nothing to boot) or "root" (the root partition wiped: the initramfs finds no root).
    ``size_mib`` grows the disk past its 64 MiB (unpartitioned, unallocated space after the
    root partition, for data a test writes with qemu-io).
    """
    image = image or ensure_guest()
    raw = path if fmt == "raw" else path.with_name(path.name + ".raw")
    run(["cp", "--sparse=always", str(image.disk_root), str(raw)])
    raw.chmod(0o644)
    if size_mib is not None:
        if size_mib * MiB < raw.stat().st_size:
            raise ValueError(f"size_mib={size_mib}: the disk-rooted guest needs 64 MiB")
        os.truncate(raw, size_mib * MiB)
    offset, length = partition_offset(raw, 2)
    if marker is not None:
        source = path.with_name(path.name + ".marker")
        source.write_text(marker)
        source.chmod(0o644)
        fs = f"{raw}?offset={offset}"
        run(["debugfs", "-w", "-R", f"write {source} {MARKER_PATH}", fs])
        source.unlink()
        written = run(["debugfs", "-R", f"cat {MARKER_PATH}", fs])
        if written != marker:
            raise RuntimeError(f"{raw}: marker not written ({written!r})")
    if broken == "zeros":
        run(["qemu-io", "-f", "raw", "-c", f"write -z 0 {raw.stat().st_size}", str(raw)])
    elif broken == "root":
        run(["qemu-io", "-f", "raw", "-c", f"write -z {offset} {length}", str(raw)])
    elif broken is not None:
        raise ValueError(f"broken={broken!r}: 'zeros' or 'root'")
    if raw != path:
        run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw), str(path)])
        raw.unlink()


def create_rooted_domain(
    domains,
    *,
    marker: str | None = None,
    broken: str | None = None,
    size_mib: int | None = None,
    fmt: str = "qcow2",
    start: bool = True,
    image: GuestImage | None = None,
) -> TestDomain:
    """Define (and start) a disk-rooted agent guest through the ``domains`` fixture, which
    removes it: vda is a fresh ``make_root_disk`` copy, SeaBIOS boots it (no kernel from the
    host), the serial console (SeaBIOS, syslinux, the guest) goes to ``console_log_path``."""
    domain = _new_domain(domains, "rooted")
    path = domain.dir / f"vda.{fmt}"
    make_root_disk(path, fmt, marker=marker, broken=broken, size_mib=size_mib, image=image)
    domain.disks["vda"] = path
    domain.formats["vda"] = fmt
    xml = agent_domain_xml(
        domain.name,
        domain.uuid,
        None,
        None,
        {"vda": (path, fmt)},
        console_log=console_log_path(domain),
    )
    dom = domains.conn.defineXML(xml)
    if start:
        dom.create()
    return domain


def wait_for_console(path: Path, text: str, timeout: float = 60) -> float:
    """Poll the serial console log until ``text`` shows; returns the seconds waited."""
    started = time.monotonic()
    while True:
        try:
            if text in path.read_text(errors="replace"):
                return time.monotonic() - started
        except FileNotFoundError:
            pass
        if time.monotonic() - started >= timeout:
            raise TimeoutError(
                f"{text!r} not on the console within {timeout:.0f} s\n"
                f"--- serial console ---\n{console_tail(path)}"
            )
        time.sleep(0.25)


def read_marker(dom, path: str = MARKER_PATH) -> str:
    """The guest file ``path`` read through the agent (guest-file-open/read/close)."""
    handle = agent_command(dom, "guest-file-open", {"path": path, "mode": "r"})
    try:
        data = b""
        while True:
            chunk = agent_command(dom, "guest-file-read", {"handle": handle, "count": 65536})
            data += base64.b64decode(chunk["buf-b64"])
            if chunk["eof"] or not chunk["count"]:
                break
    finally:
        agent_command(dom, "guest-file-close", {"handle": handle})
    return data.decode()


def write_guest_file(dom, path: str, text: str) -> None:
    """Write ``text`` into the guest file ``path`` through the agent, then sync the guest's
    filesystems (guest-exec of busybox sync), so the bytes are on its disk, not only cached."""
    handle = agent_command(dom, "guest-file-open", {"path": path, "mode": "w"})
    try:
        data = base64.b64encode(text.encode()).decode()
        agent_command(dom, "guest-file-write", {"handle": handle, "buf-b64": data})
        agent_command(dom, "guest-file-flush", {"handle": handle})
    finally:
        agent_command(dom, "guest-file-close", {"handle": handle})
    code, _, err = guest_exec(dom, "/bin/sync")
    if code != 0:
        raise RuntimeError(f"sync in the guest failed ({code}): {err}")


def guest_exec(
    dom, path: str, args: Sequence[str] = (), timeout: float = 10
) -> tuple[int, str, str]:
    """Run ``path args`` in the guest through the agent; (exit code, stdout, stderr)."""
    started = agent_command(
        dom, "guest-exec", {"path": path, "arg": list(args), "capture-output": True}
    )
    deadline = time.monotonic() + timeout
    while True:
        status = agent_command(dom, "guest-exec-status", {"pid": started["pid"]})
        if status["exited"]:
            out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
            err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
            return status.get("exitcode", -1), out, err
        if time.monotonic() >= deadline:
            raise TimeoutError(f"guest-exec {path} {list(args)} still running after {timeout} s")
        time.sleep(0.1)


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
