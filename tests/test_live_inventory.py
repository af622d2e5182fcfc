"""Live inventory: libvirt's domain events reach the VM rows within seconds (real libvirtd)."""

import os
import signal
import subprocess
import threading
import time

import libvirt
import pytest
from django.core.management import CommandError, call_command

from backups import live_inventory
from backups.models import Disk, Host, VirtualMachine

pytestmark = [pytest.mark.libvirt, pytest.mark.django_db(transaction=True)]

WITHIN = 5  # seconds: what the dashboard promises


@pytest.fixture
def follower(host):
    """A follower of the test host in a thread, stopped (and its connection closed) after."""
    stop = threading.Event()
    follower = live_inventory.Follower(host.pk, stop, keepalive=(1, 2))
    thread = threading.Thread(target=follower.run, daemon=True)
    thread.start()
    assert follower.connected.wait(30), "the follower did not connect"
    yield follower
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()


def eventually(check, timeout: float = WITHIN) -> float:
    """Seconds until ``check()`` was true; fails after ``timeout``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"not within {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - start


def row(dom):
    return VirtualMachine.objects.filter(uuid=dom.uuid).first()


def test_it_shows_a_destroyed_vm_shut_off_within_seconds(domains, follower):
    dom = domains.create(start=True)
    eventually(lambda: row(dom) is not None and row(dom).state == "running")
    domains.lookup(dom).destroy()
    took = eventually(lambda: row(dom).state == "shutoff")
    print(f"shut off seen after {took:.2f}s")


def test_it_adds_a_newly_defined_domain_within_seconds(domains, follower):
    dom = domains.create()
    took = eventually(lambda: row(dom) is not None)
    vm = row(dom)
    assert vm.name == dom.name and vm.state == "shutoff" and vm.gone_at is None
    assert sorted(vm.disks.values_list("target", flat=True)) == ["vda", "vdb"]
    print(f"new domain seen after {took:.2f}s")


def test_it_marks_an_undefined_domain_gone_and_back(domains, follower):
    dom = domains.create()
    eventually(lambda: row(dom) is not None)
    xml = domains.lookup(dom).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    domains.lookup(dom).undefine()
    eventually(lambda: row(dom).gone_at is not None)
    domains.conn.defineXML(xml)
    eventually(lambda: row(dom).gone_at is None)
    assert VirtualMachine.objects.filter(uuid=dom.uuid).count() == 1


def test_it_follows_a_disk_hot_plugged_and_unplugged(domains, follower):
    dom = domains.create(start=True)
    eventually(lambda: row(dom) is not None)
    extra = dom.dir / "sdc.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(extra), "16M"], check=True)
    disk = (
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{extra}'/><target dev='sdc' bus='usb'/></disk>"
    )
    domains.lookup(dom).attachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    eventually(lambda: Disk.objects.filter(vm__uuid=dom.uuid, target="sdc").exists())
    # a USB disk leaves at once: a virtio one would wait for a guest OS to let it go
    domains.lookup(dom).detachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    eventually(lambda: not Disk.objects.filter(vm__uuid=dom.uuid, target="sdc").exists())


def test_it_follows_a_renamed_domain_by_uuid(domains, follower):
    dom = domains.create()
    eventually(lambda: row(dom) is not None)
    new_name = dom.name + "-r"
    domains.lookup(dom).rename(new_name, 0)
    dom.name = new_name
    eventually(lambda: row(dom).name == new_name)
    assert VirtualMachine.objects.filter(uuid=dom.uuid).count() == 1


def restart_libvirtd():
    """Kill libvirtd (its guests keep running) and start it again, as after a crash."""
    pids = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True).stdout
    for pid in pids.split():
        os.kill(int(pid), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "libvirtd did not stop"
        time.sleep(0.1)
    subprocess.run(["libvirtd", "-d"], check=True, timeout=30)
    while subprocess.run(["virsh", "-c", "qemu:///system", "version"],
                         capture_output=True).returncode != 0:  # fmt: skip
        assert time.monotonic() < deadline + 30, "libvirtd did not come back"
        time.sleep(0.2)


@pytest.mark.slow
def test_it_reconnects_after_libvirtd_restarts(domains, follower):
    dom = domains.create(start=True)
    eventually(lambda: row(dom) is not None and row(dom).state == "running")
    restart_libvirtd()
    domains.conn = libvirt.open(domains.uri)  # the fixture's own connection died too
    eventually(lambda: follower.connections >= 2 and follower.connected.is_set(), timeout=30)
    domains.lookup(dom).destroy()
    eventually(lambda: row(dom).state == "shutoff")


def test_it_stops_when_asked(host):
    stop = threading.Event()
    threads = live_inventory.follow([host], stop)
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_it_follows_the_hosts_of_its_own_cluster(db):
    plain = Host.objects.create(name="plain", uri="test:///default")
    Host.objects.create(name="far", uri="test:///default", cluster="far")
    assert live_inventory.hosts_for("") == [plain]
    assert live_inventory.hosts_for("vmbackup") == [plain]  # the site's own name
    assert [h.name for h in live_inventory.hosts_for("far")] == ["far"]


def test_the_command_refuses_an_unknown_host(db):
    with pytest.raises(CommandError, match="no host named nope"):
        call_command("vmbackup_events", "--host", "nope")
