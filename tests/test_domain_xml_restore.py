"""The backed-up definition turned into a new domain (pure XML, no libvirt)."""

import xml.etree.ElementTree as ET

from backups.domain_xml import restored_xml, with_backing_chain

ORIGINAL = """<domain type='qemu'>
  <name>web 'one'</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/vg0/web'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/images/web-data.qcow2'/>
      <backingStore type='file'>
        <format type='qcow2'/><source file='/images/base.qcow2'/>
      </backingStore>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='pool/web-shared'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
    </interface>
    <graphics type='vnc' port='5901' autoport='no'/>
  </devices>
</domain>"""


def restored(**overrides):
    args = {
        "name": "web-restored",
        "uuid": "99999999-8888-7777-6666-555555555555",
        "disks": {"vda": ("/restore/web-restored/vda.raw", "raw"),
                  "vdb": ("/restore/web-restored/vdb.qcow2", "qcow2")},
        "nvram": "/restore/web-restored/nvram.fd",
    } | overrides  # fmt: skip
    xml, notes = restored_xml(ORIGINAL, **args)
    return ET.fromstring(xml), notes


def disk(root, target):
    return next(d for d in root.iter("disk") if d.find("target").get("dev") == target)


def test_it_gets_a_new_name_uuid_and_no_fixed_mac_or_port():
    root, _notes = restored()
    assert root.findtext("name") == "web-restored"
    assert root.findtext("uuid") == "99999999-8888-7777-6666-555555555555"
    assert root.find("devices/interface/mac") is None
    assert root.find("devices/interface/source").get("network") == "default"
    graphics = root.find("devices/graphics")
    assert graphics.get("autoport") == "yes" and graphics.get("port") is None


def test_each_restored_disk_points_at_its_standalone_file():
    root, _notes = restored()
    vda = disk(root, "vda")
    assert vda.get("type") == "file"
    assert vda.find("source").attrib == {"file": "/restore/web-restored/vda.raw"}
    assert vda.find("driver").attrib == {"name": "qemu", "type": "raw", "cache": "none",
                                         "io": "native"}  # fmt: skip
    vdb = disk(root, "vdb")
    assert vdb.find("source").get("file") == "/restore/web-restored/vdb.qcow2"
    assert vdb.find("backingStore") is None
    assert [c.tag for c in vdb] == ["driver", "source", "target"]


def test_a_disk_not_in_the_backup_is_left_out_never_shared_with_the_original():
    root, notes = restored()
    targets = [d.find("target").get("dev") for d in root.iter("disk")]
    assert targets == ["vda", "vdb", "sda"]  # the cdrom stays, emptied
    assert disk(root, "sda").find("source") is None
    assert notes == [
        "disk vdc was not in the backup and is left out",
        "the cdrom sda is emptied (it held /isos/install.iso)",
    ]


def test_nvram_points_at_the_restored_copy_or_is_made_fresh():
    root, _notes = restored()
    assert root.findtext("os/nvram") == "/restore/web-restored/nvram.fd"
    root, notes = restored(nvram=None)
    assert root.find("os/nvram") is None
    assert "no UEFI variable store in the backup: a fresh one is created" in notes


def test_names_are_escaped_not_interpreted():
    root, _notes = restored(name="a<b>&'\"")
    assert root.findtext("name") == "a<b>&'\""


def test_shares_passthrough_and_luns_stay_with_the_original():
    original = ORIGINAL.replace(
        "<devices>",
        "<genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90d</genid><devices>"
        "<disk type='block' device='lun'><source dev='/dev/sdz'/><target dev='sdb' bus='scsi'/>"
        "</disk><filesystem type='mount'><source dir='/srv/share'/><target dir='share'/>"
        "</filesystem><hostdev mode='subsystem' type='pci'/>",
    )
    xml, notes = restored_xml(original, name="n", uuid="u", disks={}, nvram=None)
    root = ET.fromstring(xml)
    assert [d.get("device") for d in root.iter("disk")] == ["cdrom"]
    assert root.find("devices/filesystem") is None and root.find("devices/hostdev") is None
    assert not (root.findtext("genid") or "")
    assert "disk sdb was not in the backup and is left out" in notes
    assert any("shared directory" in n for n in notes) and any("host device" in n for n in notes)


def test_an_instant_restore_spells_out_the_backing_chain_and_forbids_relabelling():
    """libvirt would chown every image of a probed chain to QEMU's user: each link of the
    backup's chain is named with ``relabel='no'``, and the chain ends explicitly."""

    xml, _notes = restored_xml(
        ORIGINAL, name="now", uuid="u", disks={"vda": ("/r/now/vda.overlay.qcow2", "qcow2")},
        nvram=None,
    )  # fmt: skip
    chain = [("/b/vm/2-inc/vda.qcow2", "qcow2"), ("/b/vm/1-full/vda.qcow2", "qcow2")]

    disk = next(
        d
        for d in ET.fromstring(with_backing_chain(xml, "vda", chain)).findall("devices/disk")
        if d.find("target").get("dev") == "vda"
    )

    assert disk.find("source").get("file") == "/r/now/vda.overlay.qcow2"
    store, found = disk.find("backingStore"), []
    while store is not None and store.find("source") is not None:
        label = store.find("source/seclabel")
        found.append((store.find("source").get("file"), store.find("format").get("type")))
        assert (label.get("model"), label.get("relabel")) == ("dac", "no")
        store = store.find("backingStore")
    assert found == chain
    assert store is not None and len(store) == 0  # the explicit end: nothing probed
