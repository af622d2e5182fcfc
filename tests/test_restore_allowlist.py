"""A backup whose domain.xml carries every dangerous element is restored, against the real
libvirtd, as a domain that has none of them (the allowlist, backups/allowlist.py)."""

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from backups import allowlist, jobs, requests
from backups.models import RunStatus
from tests.domains import DiskSpec
from tests.helpers import restore_now

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]

DEVICES = """<devices>
  <emulator>/tmp/vmbt-evil-qemu</emulator>
  <serial type='file'><source path='/etc/cron.d/vmbt-evil'/><target port='0'/></serial>
  <console type='unix'><source mode='connect' path='/run/vmbt-evil.sock'/>
    <target type='serial' port='0'/></console>
  <parallel type='pipe'><source path='/tmp/vmbt-pipe'/><target port='0'/></parallel>
  <channel type='file'><source path='/etc/passwd'/><target type='virtio' name='x.evil'/></channel>
  <hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0' bus='0'
    slot='31' function='3'/></source></hostdev>
  <interface type='direct'><source dev='lo' mode='bridge'/><model type='virtio'/></interface>
  <interface type='hostdev' managed='yes'><source><address type='pci' domain='0' bus='0'
    slot='31' function='4'/></source></interface>
  <filesystem type='mount'><source dir='/'/><target dir='hostroot'/></filesystem>
  <redirdev bus='usb' type='tcp'><source mode='connect' host='localhost' service='4000'/>
    </redirdev>
  <smartcard mode='host'/>
  <shmem name='vmbt-evil'><model type='ivshmem-plain'/><size unit='M'>4</size></shmem>
  <rng model='virtio'><backend model='random'>/dev/hwrng</backend></rng>
  <input type='evdev'><source dev='/dev/input/event0'/></input>
</devices>"""


def dangerous(xml: str, cdrom_source: str) -> str:
    """The backed-up definition with one of each dangerous element added."""
    ET.register_namespace("qemu", allowlist.QEMU_NS)
    root = ET.fromstring(xml)
    devices = root.find("devices")
    for node in devices.findall("emulator"):
        devices.remove(node)
    for node in ET.fromstring(DEVICES):
        devices.append(node)
    cdrom = next(d for d in devices.findall("disk") if d.get("device") == "cdrom")
    cdrom.insert(0, ET.Element("source", file=cdrom_source))
    os_node = root.find("os")
    ET.SubElement(os_node, "kernel").text = "/boot/vmbt-vmlinuz"
    ET.SubElement(os_node, "initrd").text = "/etc/shadow"
    backing = ET.SubElement(root, "memoryBacking")
    ET.SubElement(backing, "source", type="file")
    ET.SubElement(root, "seclabel", type="none", model="none")
    line = ET.SubElement(root, f"{{{allowlist.QEMU_NS}}}commandline")
    ET.SubElement(line, f"{{{allowlist.QEMU_NS}}}arg", value="-evil")
    caps = ET.SubElement(root, f"{{{allowlist.QEMU_NS}}}capabilities")
    ET.SubElement(caps, f"{{{allowlist.QEMU_NS}}}del", capability="blockdev")
    return ET.tostring(root, encoding="unicode")


def replace_domain_xml(backup_dir: Path, xml: str) -> None:
    """As whoever can write the backup would: domain.xml and its SHA256SUMS line."""
    data = xml.encode()
    (backup_dir / "domain.xml").write_bytes(data)
    sums = backup_dir / "SHA256SUMS"
    lines = [
        f"{hashlib.sha256(data).hexdigest()}  domain.xml" if line.endswith("  domain.xml") else line
        for line in sums.read_text().splitlines()
    ]
    sums.write_text("\n".join(lines) + "\n")


def test_a_restored_definition_keeps_nothing_that_reaches_into_the_host(
    domains,
    backup_root,
    synced,
    restore_root,  # noqa: F811
):
    dom = domains.create([DiskSpec("vda", "qcow2", 8, [(0, 1, 0x42)])], cdrom=True)
    run = requests.request_backup(synced(dom), method="offline", enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    backup_dir = Path(run.backup.path)
    xml = (backup_dir / "domain.xml").read_text()
    replace_domain_xml(backup_dir, dangerous(xml, cdrom_source=str(dom.disks["vda"])))

    restore = restore_now(run.backup, restore_root)

    assert restore.status == RunStatus.SUCCEEDED, restore.error
    defined = domains.conn.lookupByName(restore.name).XMLDesc(0)
    root = ET.fromstring(defined)
    devices = root.find("devices")
    for tag in ("hostdev", "filesystem", "shmem", "smartcard"):
        assert devices.find(tag) is None, tag
    assert [i.get("type") for i in devices.findall("interface")] == []
    assert devices.find("redirdev") is None and devices.find("input[@type='evdev']") is None
    assert devices.findtext("emulator") != "/tmp/vmbt-evil-qemu"  # libvirt's default
    for tag in ("serial", "console", "parallel"):
        assert {n.get("type") for n in devices.findall(tag)} == {"pty"}, tag
    assert [c.find("target").get("name") for c in devices.findall("channel")] == []
    cdrom = next(d for d in devices.findall("disk") if d.get("device") == "cdrom")
    assert cdrom.find("source") is None
    assert devices.find("rng/backend").text == "/dev/urandom"
    assert root.find("os/kernel") is None and root.find("os/initrd") is None
    assert root.find("memoryBacking/source") is None
    assert "commandline" not in defined and "capabilities" not in defined
    assert "type='none'" not in defined.split("<devices>")[0]  # no seclabel type none
    for path in ("/etc/", "'/tmp/", "/run/vmbt", "/boot/", str(dom.disks["vda"])):
        assert path not in defined, path
    assert len(restore.notes) >= 18  # each removal said on the restore page
    assert any("qemu:commandline" in note for note in restore.notes)
