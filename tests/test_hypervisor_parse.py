"""Pure parsing of domain XML (the real-daemon tests are in test_inventory.py)."""

from backups.hypervisor import parse_domain_xml

XML = """
<domain type='kvm'>
  <name>web 1</name>
  <uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/web-data'/>
      <target dev='vdb' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/image'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>
"""


def test_it_parses_disks_of_every_kind():
    info = parse_domain_xml(XML, state="running")
    by_target = {d.target: d for d in info.disks}
    assert by_target["vda"].source == "/var/lib/libvirt/images/web.qcow2"
    assert by_target["vda"].format == "qcow2"
    assert by_target["vda"].alias == "virtio-disk0"
    assert by_target["vdb"].source_type == "block"
    assert by_target["vdb"].source == "/dev/vg0/web-data"
    assert by_target["vdb"].shareable
    assert by_target["vdc"].source_type == "network"
    assert by_target["sda"].device == "cdrom"
    assert by_target["sda"].readonly
    assert by_target["sda"].source == ""


def test_it_reads_firmware_tpm_and_agent():
    info = parse_domain_xml(XML)
    assert info.name == "web 1"
    assert info.uuid == "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    assert info.loader == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert info.nvram == "/var/lib/libvirt/qemu/nvram/web_VARS.fd"
    assert info.tpm is not None and info.tpm.version == "2.0"
    assert info.has_agent_channel


def test_it_builds_an_incremental_backup_xml_per_disk():
    import xml.etree.ElementTree as ET

    from backups.domain_xml import backup_xml

    xml = backup_xml(
        {"vda": "/b/.x.partial/vda.qcow2", "vdb": "/b/.x.partial/vdb.qcow2"},
        ["vda", "vdb", "vdc"],
        "vmbackup-7",
        ["vda"],
    )
    disks = {d.get("name"): d for d in ET.fromstring(xml).findall("disks/disk")}
    assert disks["vda"].get("backupmode") == "incremental"
    assert disks["vda"].get("incremental") == "vmbackup-7"
    assert disks["vdb"].get("backupmode") == "full"  # raw: no bitmap, copied whole
    assert disks["vdc"].get("backup") == "no"  # excluded disks are named, not defaulted
    assert disks["vda"].find("target").get("file") == "/b/.x.partial/vda.qcow2"


def test_it_escapes_names_in_generated_xml():
    from backups.domain_xml import snapshot_xml

    xml = snapshot_xml("s", {"vda": '/v/it\'s <a> & "b".qcow2'}, ["vda"], None)
    assert "&lt;a&gt; &amp;" in xml
