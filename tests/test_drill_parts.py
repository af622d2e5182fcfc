"""Restore drills without libvirt: the sandbox's definition, the evidence, the requests and
their order on a host, alerts, metrics and the pages (the real drills: test_drills)."""

import struct
import uuid
import xml.etree.ElementTree as ET
import zlib
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from backups import domain_xml, inventory, jobs, metrics, notify, requests, site
from backups.models import (
    Alert,
    AlertKind,
    BackupPolicy,
    Drill,
    DrillResult,
    RunStatus,
    VirtualMachine,
)
from backups.restore import evidence
from tests.helpers import make_backup

ORIGINAL = """<domain type='qemu'><name>web</name><uuid>0b3c1c1e-0000-4000-8000-000000000001</uuid>
<memory unit='GiB'>2</memory><devices>
<disk type='file' device='disk'><source file='/srv/web.qcow2'/><target dev='vda'/></disk>
<interface type='network'><source network='default'/></interface>
<interface type='bridge'><source bridge='br0'/></interface>
<graphics type='spice' port='5901' listen='0.0.0.0'>
  <listen type='address' address='0.0.0.0'/></graphics>
<redirdev bus='usb' type='spicevmc'/>
<serial type='pty'><log file='/var/log/web.log'/><target port='0'/></serial>
<video><model type='qxl'/></video></devices></domain>"""


def test_the_sandbox_has_no_network_no_listener_and_a_console_log_of_its_own():
    xml, notes = domain_xml.sandbox_xml(
        ORIGINAL, console_log="/scratch/d/console.log", description="drill 7"
    )
    root = ET.fromstring(xml)
    devices = root.find("devices")
    assert devices.findall("interface") == [] and devices.findall("redirdev") == []
    (graphics,) = devices.findall("graphics")
    assert graphics.attrib == {"type": "vnc"}
    assert [listen.attrib for listen in graphics] == [{"type": "none"}]
    (serial,) = devices.findall("serial")
    assert [log.attrib for log in serial.findall("log")] == [
        {"file": "/scratch/d/console.log", "append": "off"}
    ]
    assert root.findtext("description") == "drill 7"
    assert devices.find("video/model").get("type") == "qxl"  # the screen stays
    assert sum("no network interface" in n for n in notes) == 2


def test_a_sandbox_without_a_serial_port_gets_one():
    xml, notes = domain_xml.sandbox_xml(
        "<domain><devices/></domain>", console_log="/s/console.log", description="d"
    )
    serial = ET.fromstring(xml).find("devices/serial")
    assert serial.get("type") == "pty" and serial.find("log").get("file") == "/s/console.log"
    assert ET.fromstring(xml).find("devices/graphics") is None
    assert notes == ["a serial port is added for the console log"]


@pytest.mark.parametrize(
    "memory, mib",
    [("<memory unit='GiB'>2</memory>", 2048), ("<memory>262144</memory>", 256),
     ("<memory unit='bytes'>1000</memory>", 1), ("", 0)],
)  # fmt: skip
def test_it_reads_the_memory_in_mib(memory, mib):
    assert domain_xml.memory_mib(f"<domain>{memory}</domain>") == mib


def test_a_ppm_screenshot_becomes_a_png():
    pixels = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    png = evidence.png_from_ppm(b"P6\n# qemu\n2 2\n255\n" + pixels)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height, depth, colour = struct.unpack(">IIBB", png[16:26])
    assert (width, height, depth, colour) == (2, 2, 8, 2)
    idat = png.index(b"IDAT")
    length = struct.unpack(">I", png[idat - 4 : idat])[0]
    assert zlib.decompress(png[idat + 4 : idat + 4 + length]) == (
        b"\x00" + pixels[:6] + b"\x00" + pixels[6:]
    )
    with pytest.raises(evidence.EvidenceError):
        evidence.png_from_ppm(b"P6\n2 2\n255\n" + pixels[:5])


def test_the_console_tail_drops_escapes_and_keeps_the_last_lines(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(
        b"\x1b[2J\x1b[0;1mSeaBIOS\r\n" + b"".join(b"line %d\r\n" % i for i in range(60))
    )
    tail = evidence.console_tail(log)
    assert tail.splitlines() == [f"line {i}" for i in range(20, 60)]
    assert evidence.console_tail(tmp_path / "none") == ""
    (tmp_path / "link").symlink_to(log)
    with pytest.raises(OSError):
        evidence.console_tail(tmp_path / "link")


# --------------------------------------------------------------------- requests and order


@pytest.fixture
def backup(vm):
    return make_backup(vm)


def test_a_drill_is_named_for_the_site_and_takes_its_policys_settings(backup, policy):
    policy.drill_command, policy.drill_timeout = "/bin/true", 60
    policy.save()
    drill = requests.request_drill(backup, enqueue=False)
    assert drill.name == f"vmbackup-drill-{site.site_id()}-{drill.pk}"
    assert site.parse_drill_name(drill.name) == (site.site_id(), drill.pk)
    assert (drill.policy, drill.command, drill.timeout_seconds) == (policy, "/bin/true", 60)
    assert (drill.vm, drill.host) == (backup.vm, backup.vm.host)
    with pytest.raises(requests.DrillRefused, match="already queued or running"):
        requests.request_drill(backup, enqueue=False)


def test_one_drill_runs_per_host_and_the_next_starts_when_it_ends(
    host, backup, async_calls, django_capture_on_commit_callbacks
):
    other_vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="db-1")
    running = requests.request_drill(backup, enqueue=False)
    assert Drill.claim(running.pk, "me:1")
    with django_capture_on_commit_callbacks(execute=True):
        waiting = requests.request_drill(make_backup(other_vm))
    assert jobs.run_drill(waiting.pk) == "waiting for the host's running drill"
    assert Drill.objects.get(pk=waiting.pk).status == RunStatus.QUEUED
    running.finish(RunStatus.SUCCEEDED)
    async_calls.clear()
    with django_capture_on_commit_callbacks(execute=True):
        jobs.drill_next(host.pk)
    assert [c[0] for c in async_calls] == [("backups.jobs.run_drill", waiting.pk)]


def test_a_policys_schedule_drills_each_vm_newest_usable_backup(
    vm, policy, async_calls, django_capture_on_commit_callbacks
):
    bare = VirtualMachine.objects.create(host=vm.host, uuid=uuid.uuid4(), name="bare")
    policy.vms.add(bare)
    good = make_backup(vm, ago=timedelta(hours=2))
    make_backup(vm, ago=timedelta(hours=1), verify_status="corrupt")
    with django_capture_on_commit_callbacks(execute=True):
        outcome = jobs.run_policy_drills(policy.pk)
    assert outcome == "1 drills requested; skipped: bare: no backup"
    drill = Drill.objects.get()
    assert (drill.backup, drill.trigger, drill.policy) == (good, "schedule", policy)
    assert len(async_calls) == 1


def test_the_inventory_never_lists_a_sandbox(host):
    sandbox = domain_xml.parse_domain_xml(
        f"<domain><name>{site.DRILL_PREFIX}0badc0de-4</name>"
        "<uuid>0b3c1c1e-0000-4000-8000-0000000000aa</uuid></domain>"
    )
    assert inventory._apply(host, [sandbox]).seen == 0
    assert inventory._apply_one(host, sandbox.uuid, sandbox) == "ignored"
    assert not VirtualMachine.objects.exists()


# ----------------------------------------------------------------- alerts, metrics, pages


def judged(backup, result, alive=None, **fields) -> Drill:
    status = RunStatus.SUCCEEDED if result == DrillResult.PASSED else RunStatus.FAILED
    return Drill.objects.create(
        backup=backup,
        status=status,
        result=result,
        alive_after_seconds=alive,
        finished_at=timezone.now(),
        **fields,
    )


def test_a_failed_drill_alerts_once_and_a_passing_one_resolves(
    backup, settings, mailoutbox, django_capture_on_commit_callbacks
):
    settings.VMBACKUP_NOTIFY_TO = ["ops@example.com"]
    with django_capture_on_commit_callbacks(execute=True):
        notify.drill_finished(
            judged(backup, DrillResult.FAILED, error="no sign of life within 20 s")
        )
        notify.drill_finished(judged(backup, DrillResult.FAILED))
    alert = Alert.objects.get(kind=AlertKind.DRILL_FAILED)
    assert len(mailoutbox) == 1 and "no sign of life within 20 s" in mailoutbox[0].body
    notify.drill_finished(judged(backup, DrillResult.PASSED, alive=9.5))
    alert.refresh_from_db()
    assert alert.resolved_at is not None


def test_metrics_export_each_vms_last_drill(backup, settings):
    judged(backup, DrillResult.FAILED)
    judged(backup, DrillResult.PASSED, alive=12.5)
    Drill.objects.create(backup=backup)  # queued: no verdict yet
    families = {f.name: f for f in metrics.collect()}
    labels = {"host": "hv1", "vm": "web-1", "uuid": str(backup.vm.uuid)}
    assert families["vmbackup_vm_last_drill_passed"].samples == [(labels, 1)]
    assert families["vmbackup_vm_last_drill_alive_seconds"].samples == [(labels, 12.5)]
    assert len(families["vmbackup_vm_last_drill_timestamp_seconds"].samples) == 1
    totals = dict((s[0]["status"], s[1]) for s in families["vmbackup_drills_total"].samples)
    assert (totals["succeeded"], totals["failed"]) == (1, 1)


def test_the_vm_page_and_the_overview_show_the_proof(owner_client, backup, policy):
    drill = judged(backup, DrillResult.PASSED, alive=11.04, evidence_text="agent-guest: up")
    page = owner_client.get(reverse("vm_detail", args=[backup.vm_id])).content.decode()
    assert f"proven bootable {timezone.localtime(drill.finished_at):%Y-%m-%d %H:%M}" in page
    assert "alive in 11.0 s" in page
    overview = owner_client.get(reverse("overview")).content.decode()
    assert reverse("drill_detail", args=[drill.pk]) in overview and "alive in 11 s" in overview
    detail = owner_client.get(reverse("drill_detail", args=[drill.pk])).content.decode()
    assert "agent-guest: up" in detail and "screenshot.png" not in detail


def test_the_screenshot_is_served_as_a_png(owner_client, backup):
    drill = judged(backup, DrillResult.PASSED, alive=1.0, screenshot=b"\x89PNG-bytes")
    assert (
        reverse("drill_screenshot", args=[drill.pk])
        in owner_client.get(reverse("drill_detail", args=[drill.pk])).content.decode()
    )
    response = owner_client.get(reverse("drill_screenshot", args=[drill.pk]))
    assert (response["Content-Type"], response.content) == ("image/png", b"\x89PNG-bytes")


def test_the_button_drills_the_newest_usable_backup(
    owner, vm, async_calls, django_capture_on_commit_callbacks
):
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    good = make_backup(vm, ago=timedelta(hours=2))
    make_backup(vm, ago=timedelta(hours=1), verify_status="missing")
    page = client.get(reverse("vm_detail", args=[vm.pk]))
    token = str(page.context["csrf_token"])
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("vm_drill", args=[vm.pk]), {"csrfmiddlewaretoken": token})
    drill = Drill.objects.get()
    assert response["Location"] == reverse("drill_detail", args=[drill.pk])
    assert (drill.backup, drill.trigger, drill.requested_by) == (good, "button", owner)
    assert [c[0] for c in async_calls] == [("backups.jobs.run_drill", drill.pk)]
    again = client.post(reverse("backup_drill", args=[good.pk]), {"csrfmiddlewaretoken": token})
    assert again["Location"] == reverse("backup_detail", args=[good.pk])
    assert Drill.objects.count() == 1


def test_a_vm_without_a_usable_backup_is_not_drilled(owner_client, vm):
    response = owner_client.post(reverse("vm_drill", args=[vm.pk]), follow=True)
    assert "has no usable backup to drill" in response.content.decode()
    assert not Drill.objects.exists()
    assert BackupPolicy.objects.count() == 0


def test_a_png_screenshot_is_kept_and_anything_else_refused():
    png = evidence.png_from_ppm(b"P6 1 1 255\n" + bytes(3))
    assert evidence.as_png("image/png", png) == png
    assert evidence.as_png("image/x-portable-pixmap", b"P6 1 1 255\n" + bytes(3)) == png
    with pytest.raises(evidence.EvidenceError, match="neither PNG nor PPM"):
        evidence.as_png("text/html", b"<html>")
