"""What a restored definition keeps: nothing that hands the new domain the host (pure XML)."""

import xml.etree.ElementTree as ET

import pytest

from backups import allowlist
from backups.domain_xml import restored_xml

# One of each thing a backed-up domain.xml may carry that reaches into the host.
DANGEROUS = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>evil</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>
  <sysinfo type='fwcfg'><entry name='opt/com.example/x' file='/etc/shadow'/></sysinfo>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/etc/shadow</loader>
    <nvram template='/root/.ssh/id_rsa'>/var/lib/libvirt/qemu/nvram/evil_VARS.fd</nvram>
    <kernel>/boot/vmlinuz</kernel>
    <initrd>/etc/shadow</initrd>
    <cmdline>console=ttyS0</cmdline>
    <acpi><table type='slic'>/etc/shadow</table></acpi>
  </os>
  <seclabel type='none' model='none'/>
  <seclabel type='dynamic' model='dac' relabel='no'/>
  <devices>
    <emulator>/tmp/evil-qemu</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/evil.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='cdrom'>
      <source dev='/dev/sda'/><target dev='sda' bus='sata'/><readonly/>
    </disk>
    <interface type='direct'><source dev='eth0' mode='bridge'/></interface>
    <interface type='hostdev' managed='yes'><source><address type='pci' domain='0' bus='3'
      slot='0' function='0'/></source></interface>
    <interface type='ethernet'><script path='/tmp/evil.sh'/><downscript path='/tmp/x'/>
      <backend tap='/dev/net/tun' vhost='/dev/vhost-net'/></interface>
    <interface type='network'><source network='default'/></interface>
    <serial type='file'><source path='/etc/cron.d/evil'/><target port='0'/></serial>
    <serial type='dev'><source path='/dev/ttyS0'/><target port='1'/></serial>
    <console type='unix'><source mode='connect' path='/run/evil.sock'/>
      <target type='serial' port='0'/><log file='/etc/evil.log'/></console>
    <parallel type='pipe'><source path='/tmp/pipe'/><target port='0'/></parallel>
    <channel type='unix'><source mode='bind' path='/etc/evil.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <channel type='file'><source path='/etc/passwd'/><target type='virtio' name='x.y'/></channel>
    <hostdev mode='subsystem' type='pci'/>
    <filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>
    <redirdev bus='usb' type='tcp'><source mode='connect' host='localhost' service='4000'/>
      </redirdev>
    <redirdev bus='usb' type='spicevmc'/>
    <smartcard mode='host'/>
    <shmem name='evil'><model type='ivshmem-plain'/></shmem>
    <memory model='nvdimm'><source><path>/dev/dax0.0</path></source>
      <target><size unit='KiB'>524288</size></target></memory>
    <input type='evdev'><source dev='/dev/input/event0'/></input>
    <input type='tablet' bus='usb'/>
    <tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>
    <rng model='virtio'><backend model='random'>/dev/hwrng</backend></rng>
    <audio id='1' type='file' path='/etc/evil.wav'/>
    <graphics type='vnc' socket='/etc/vnc.sock' passwd='secret'/>
    <graphics type='spice'><listen type='socket' socket='/etc/spice.sock'/>
      <gl enable='yes' rendernode='/dev/dri/renderD128'/></graphics>
    <lease><lockspace>x</lockspace><key>y</key><target path='/etc/lease'/></lease>
  </devices>
  <qemu:commandline><qemu:arg value='-device'/><qemu:arg value='evil'/></qemu:commandline>
  <qemu:capabilities><qemu:add capability='blockdev'/></qemu:capabilities>
</domain>"""


@pytest.fixture
def restored():
    xml, notes = restored_xml(
        DANGEROUS,
        name="clone",
        uuid="99999999-8888-7777-6666-555555555555",
        disks={"vda": ("/restore/clone/vda.qcow2", "qcow2")},
        nvram="/restore/clone/nvram.fd",
    )
    return xml, ET.fromstring(xml), notes


def host_paths(xml: str) -> list[str]:
    markers = ("/etc/", "/dev/", "/tmp/", "/run/", "/root/", "/boot/", "/images/")
    return [m for m in markers if m in xml.replace("/dev/urandom", "")]


def test_it_keeps_no_host_path_no_raw_option_and_no_custom_emulator(restored):
    xml, root, _notes = restored
    assert host_paths(xml) == []
    assert "commandline" not in xml and "capabilities" not in xml
    assert allowlist.QEMU_NS not in xml
    assert root.find("devices/emulator") is None  # libvirt fills in its default


def test_it_removes_host_devices_and_host_bound_interfaces(restored):
    _xml, root, _notes = restored
    devices = root.find("devices")
    for tag in ("hostdev", "filesystem", "shmem", "smartcard", "memory", "lease"):
        assert devices.find(tag) is None, tag
    assert [i.get("type") for i in devices.findall("interface")] == ["ethernet", "network"]
    assert list(devices.find("interface")) == []  # no script, downscript, backend
    assert [r.get("type") for r in devices.findall("redirdev")] == ["spicevmc"]
    assert [i.get("type") for i in devices.findall("input")] == ["tablet"]
    assert devices.find("tpm") is None


def test_serial_console_and_parallel_become_ptys_and_the_agent_keeps_its_channel(restored):
    _xml, root, _notes = restored
    devices = root.find("devices")
    for tag in ("serial", "console", "parallel"):
        for node in devices.findall(tag):
            assert node.get("type") == "pty" and node.find("source") is None, tag
            assert node.find("log") is None
    [channel] = devices.findall("channel")
    assert channel.find("target").get("name") == "org.qemu.guest_agent.0"
    assert channel.find("source").attrib == {"mode": "bind"}  # libvirt picks the path


def test_cdroms_are_emptied(restored):
    _xml, root, notes = restored
    cdrom = next(d for d in root.iter("disk") if d.get("device") == "cdrom")
    assert cdrom.get("type") == "file" and cdrom.find("source") is None
    assert "the cdrom sda is emptied (it held /dev/sda)" in notes


def test_boot_files_labels_memory_and_backends_are_made_harmless(restored):
    _xml, root, _notes = restored
    os_node = root.find("os")
    assert [c.tag for c in os_node] == ["type", "nvram"]
    assert os_node.find("nvram").attrib == {}
    assert root.find(".//seclabel") is None
    assert root.find("memoryBacking/source") is None
    assert root.find("memoryBacking/access") is not None
    assert root.find("sysinfo/entry") is None
    assert root.find("devices/rng/backend").text == "/dev/urandom"
    assert root.find("devices/audio").attrib == {"id": "1", "type": "none"}
    vnc, spice = root.findall("devices/graphics")
    assert vnc.get("passwd") == "secret" and "socket" not in vnc.attrib
    assert spice.find("listen") is None and spice.find("gl").attrib == {"enable": "yes"}


def test_each_removal_is_a_note(restored):
    _xml, _root, notes = restored
    expected = [
        "qemu:commandline is left out",
        "qemu:capabilities is left out",
        "the emulator '/tmp/evil-qemu' is not kept",
        "direct kernel boot (/boot/vmlinuz)",
        "ACPI tables",
        "the firmware '/etc/shadow'",
        "the UEFI variable template '/root/.ssh/id_rsa'",
        "a security label (type=none, relabel=yes)",
        "a security label (type=dynamic, relabel=no)",
        "file-backed guest memory",
        "a nvdimm memory device",
        "the firmware config entry read from /etc/shadow",
        "a host device (hostdev)",
        "a shared directory (filesystem)",
        "a shared memory device (shmem)",
        "a lock lease (lease)",
        "the serial on the host's /etc/cron.d/evil (file) becomes a pty",
        "the serial on the host's /dev/ttyS0 (dev) becomes a pty",
        "the console log file /etc/evil.log",
        "the console on the host's /run/evil.sock (unix) becomes a pty",
        "the parallel on the host's /tmp/pipe (pipe) becomes a pty",
        "channel org.qemu.guest_agent.0: its socket is made by libvirt, not at /etc/evil.sock",
        "a channel to the host's /etc/passwd is left out",
        "a direct interface",
        "a hostdev interface",
        "the interface script /tmp/evil.sh",
        "the interface downscript /tmp/x",
        "the interface's host device paths (<backend>)",
        "a USB redirection from the host (redirdev)",
        "a host smartcard (smartcard)",
        "a host input device (input)",
        "a host TPM (tpm)",
        "the random number source /dev/hwrng is replaced by /dev/urandom",
        "the file audio backend",
        "the vnc socket /etc/vnc.sock",
        "the spice socket /etc/spice.sock",
        "the host render node /dev/dri/renderD128",
    ]
    for start in expected:
        assert any(note.startswith(start) for note in notes), start


def test_an_ordinary_definition_keeps_its_devices_without_a_note():
    ordinary = """<domain type='kvm'><name>n</name><uuid>u</uuid>
      <os><type arch='x86_64' machine='q35'>hvm</type>
        <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
        <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/x/VARS.fd</nvram></os>
      <seclabel type='dynamic' model='dac' relabel='yes'/>
      <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
        <disk type='file' device='cdrom'><target dev='sdc' bus='sata'/><readonly/></disk>
        <serial type='pty'><target port='0'/></serial><console type='pty'/>
        <channel type='unix'><source mode='bind'/>
          <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
        <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
        <redirdev bus='usb' type='spicevmc'/>
        <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
        <graphics type='spice' autoport='yes'><listen type='address'/></graphics>
        <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
        <audio id='1' type='spice'/>
      </devices></domain>"""
    root = ET.fromstring(ordinary)
    before = len(list(root.iter()))

    notes = allowlist.restrict(root)

    assert notes == []
    assert root.find("devices/emulator") is None  # dropped silently: it is the default
    assert len(list(root.iter())) == before - 2  # the emulator and the default seclabel
    assert root.find("os/loader").text == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert root.find("os/nvram").get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"


def test_a_firmware_path_cannot_climb_out_of_the_firmware_dir():
    root = ET.fromstring("<domain><os><loader>/usr/share/../../etc/shadow</loader></os></domain>")
    notes = allowlist.restrict(root)
    assert root.find("os/loader") is None and len(notes) == 1
