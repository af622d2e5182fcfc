"""Inventory against the real libvirtd."""

import pytest

from backups import inventory
from backups.models import Host, VirtualMachine
from tests.domains import DiskSpec

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]


@pytest.fixture
def host(libvirt_uri):
    return Host.objects.create(name="local", uri=libvirt_uri)


def test_it_reads_two_disks_a_cdrom_and_uefi_nvram(domains, host):
    dom = domains.create(
        [DiskSpec("vda", "qcow2", 64), DiskSpec("vdb", "raw", 128)], cdrom=True, nvram=True
    )
    inventory.sync_host(host)
    vm = VirtualMachine.objects.get(uuid=dom.uuid)
    assert vm.name == dom.name
    assert vm.state == "shutoff"
    assert vm.nvram == str(dom.nvram)
    assert vm.loader.endswith("OVMF_CODE_4M.fd")
    disks = {d.target: d for d in vm.disks.all()}
    assert set(disks) == {"vda", "vdb", "sdc"}
    assert (disks["vda"].format, disks["vda"].source) == ("qcow2", str(dom.disks["vda"]))
    assert (disks["vdb"].format, disks["vdb"].source) == ("raw", str(dom.disks["vdb"]))
    assert disks["vda"].virtual_size == 64 * 1024 * 1024
    assert disks["vdb"].virtual_size == 128 * 1024 * 1024
    assert disks["sdc"].device == "cdrom" and disks["sdc"].readonly
    assert disks["vda"].device == "disk" and not disks["vda"].readonly
    assert host.last_sync_error == ""


def test_it_follows_rename_undefine_and_redefine(domains, host):
    dom = domains.create([DiskSpec("vda", "qcow2", 64)])
    inventory.sync_host(host)
    vm = VirtualMachine.objects.get(uuid=dom.uuid)

    new_name = dom.name + "-renamed"
    domains.lookup(dom).rename(new_name, 0)
    result = inventory.sync_host(host)
    vm.refresh_from_db()
    assert vm.name == new_name
    assert (dom.name, new_name) in result.renamed
    assert VirtualMachine.objects.filter(uuid=dom.uuid).count() == 1

    xml = domains.lookup(dom).XMLDesc(0)
    domains.lookup(dom).undefine()
    result = inventory.sync_host(host)
    vm.refresh_from_db()
    assert vm.gone_at is not None
    assert new_name in result.gone
    assert not VirtualMachine.objects.present().filter(pk=vm.pk).exists()

    domains.conn.defineXML(xml)
    result = inventory.sync_host(host)
    vm.refresh_from_db()
    assert vm.gone_at is None
    assert new_name in result.returned


def test_it_records_a_connection_failure_on_the_host(db):
    host = Host.objects.create(name="nowhere", uri="qemu+tls://127.0.0.1:1/system")
    with pytest.raises(inventory.hypervisor.HypervisorError):
        inventory.sync_host(host)
    host.refresh_from_db()
    assert "cannot connect" in host.last_sync_error
