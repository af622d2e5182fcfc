"""Restore drills against the real libvirtd and QEMU (TCG), on push backups of the
disk-rooted guest: a good backup proves it boots (and what it holds), a backup of a wiped
disk fails with "no sign of life", and either way nothing is left behind and the backup
is exactly as it was: unchanged, private, verifying."""

import hashlib
import socket
import stat
import struct
import time
import uuid
import xml.etree.ElementTree as ET
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core import mail
from django.core.management import call_command
from django.utils import timezone

from backups import hypervisor, jobs, private, reconcile, requests, site, verify
from backups.archive import check as archive_check
from backups.models import Alert, AlertKind, BackupPolicy, Drill, DrillResult, RunStatus
from backups.restore import common, evidence
from tests import domains as domains_mod
from tests.agent_guest import create_rooted_domain, wait_for_agent
from tests.helpers import make_backup, push

pytestmark = [pytest.mark.libvirt, pytest.mark.django_db]


@pytest.fixture
def drill_dirs(settings, tmp_path, domains):
    """The drills' scratch directory (QEMU must reach it) and evidence directory; every
    sandbox a drill of this test made is removed afterwards, whatever happened."""
    top = domains_mod.make_dir(
        domains_mod.BASE / f"{domains_mod.PREFIX}drills-{uuid.uuid4().hex[:8]}"
    )
    settings.VMBACKUP_DRILL_DIR = str(top / "sandboxes")
    settings.VMBACKUP_DRILL_EVIDENCE_DIR = str(tmp_path / "evidence")
    settings.VMBACKUP_NOTIFY_TO = ["ops@example.com"]
    try:
        yield top
    finally:
        names = set(Drill.objects.values_list("name", flat=True))
        for dom in domains.conn.listAllDomains():
            if dom.name() in names:
                domains_mod.remove_domain(domains.conn, dom.UUIDString())
        domains_mod.run(["rm", "-rf", "--one-file-system", str(top)])


def state_of(backup) -> dict[str, tuple]:
    """Every file of the chain: digest, owner, mode, ACL (what a drill must not change)."""
    found = {}
    for directory in archive_check.chain_dirs(backup.path):
        for path in [directory, directory.parent, *sorted(directory.iterdir())]:
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            acl = private.has_acl(path)
            found[str(path)] = (digest, st.st_uid, stat.S_IMODE(st.st_mode), acl, st.st_mtime_ns)
    return found


def assert_nothing_left(domains, drill: Drill) -> None:
    assert drill.name and drill.scratch
    assert [d.name() for d in domains.conn.listAllDomains() if d.name() == drill.name] == []
    assert not Path(drill.scratch).exists()
    assert not Drill.objects.active().exists()  # the chain is no longer pinned
    steps = [e["step"] for e in drill.journal]
    assert steps.count("cleaned") == 1 and drill.journal[-1].get("problems") == []


def test_a_good_backup_boots_proves_its_data_and_leaves_nothing(
    domains, backup_root, synced, drill_dirs
):
    marker = f"proof-{uuid.uuid4().hex}"
    spec = create_rooted_domain(domains, marker=marker)
    wait_for_agent(domains.conn, spec.uuid, timeout=120)
    vm = synced(spec)
    policy = BackupPolicy.objects.create(
        name="drilled", schedule="", drill_timeout=120,
        drill_command=f"/bin/grep -q {marker} /etc/vmbackup-proof",
        drill_console_pattern=r"init on the root\s+disk",
    )  # fmt: skip
    policy.vms.add(vm)
    backup = push(vm).backup
    before = state_of(backup)
    fingerprint = common.fingerprint(Path(backup.path))

    out = StringIO()
    call_command("vmbackup_drill", vm.name, "--wait", stdout=out)

    drill = Drill.objects.get()
    assert (drill.status, drill.result) == (RunStatus.SUCCEEDED, DrillResult.PASSED), drill.error
    assert drill.backup == backup and drill.policy == policy and drill.trigger == "command"
    print(f"\ndrill of the rooted guest: alive after {drill.alive_after_seconds} s (TCG)")
    assert 0 < drill.alive_after_seconds < 120
    assert f"alive after {drill.alive_after_seconds} s" in out.getvalue()
    console = "console: agent-guest: init on the root disk ("
    assert drill.proof.startswith(f"guest-ping; {policy.drill_command} exited 0; {console}")
    assert "agent-guest: init on the root disk" in drill.evidence_text
    evidence = Path(drill.evidence_path)
    assert evidence.name == "console.txt" and evidence.read_text() == drill.evidence_text
    assert stat.S_IMODE(evidence.stat().st_mode) == 0o600
    assert stat.S_IMODE(evidence.parent.stat().st_mode) == 0o700
    assert_nothing_left(domains, drill)
    assert state_of(backup) == before and common.fingerprint(Path(backup.path)) == fingerprint
    assert verify.verify_backup(backup) and backup.verify_status == "ok"
    assert not Alert.objects.filter(kind=AlertKind.DRILL_FAILED).exists()


def test_a_backup_of_a_wiped_disk_shows_no_sign_of_life_and_alerts(
    domains, backup_root, synced, drill_dirs, settings, django_capture_on_commit_callbacks
):
    settings.VMBACKUP_DRILL_TIMEOUT = 20
    spec = create_rooted_domain(domains, broken="zeros")
    vm = synced(spec)
    backup = push(vm).backup
    before = state_of(backup)

    with django_capture_on_commit_callbacks(execute=True):
        drill = requests.request_drill(backup, enqueue=False)
        jobs.run_drill(drill.pk)
    drill.refresh_from_db()

    assert (drill.status, drill.result) == (RunStatus.FAILED, DrillResult.FAILED)
    assert drill.error.startswith("no sign of life within 20 s"), drill.error
    assert drill.alive_after_seconds is None
    assert "No bootable device." in drill.evidence_text
    alert = Alert.objects.get(kind=AlertKind.DRILL_FAILED, vm=vm)
    assert alert.resolved_at is None and alert.mailed_at is not None
    assert [m.subject for m in mail.outbox] == [f"[vmbackup] restore drill of {vm.name} failed"]
    assert "No bootable device." in mail.outbox[0].body
    assert_nothing_left(domains, drill)
    assert state_of(backup) == before


def test_reconcile_removes_a_dead_drills_sandbox_files_and_acls(domains, drill_dirs, vm):
    """A worker killed mid-drill: its sandbox runs on, its scratch directory and the ACLs
    it lent stay. Reconcile removes all three from the journal and alerts; a sandbox of
    ours whose drill has ended is destroyed too."""
    vm_dir = private_dir(drill_dirs / "web-1")
    backup_dir = private_dir(vm_dir / "20261130T010000Z-1")
    image = backup_dir / "vda.qcow2"
    private.write_file(image, b"not read")
    backup = make_backup(vm, path=str(backup_dir))
    running = domains.create(start=True)
    drill = Drill.objects.create(backup=backup, status=RunStatus.RUNNING,
                                 worker=f"{socket.gethostname()}:999999999",
                                 heartbeat_at=timezone.now() - timedelta(hours=1))  # fmt: skip
    drill.name = site.drill_name(drill.pk)
    drill.save()
    scratch = Path(drill_dirs / "sandboxes")
    scratch.mkdir(mode=0o711)
    (scratch / drill.name).mkdir(mode=0o711)
    (scratch / drill.name / "vda.overlay.qcow2").write_bytes(b"overlay")
    lent = [str(image), str(backup_dir), str(vm_dir)]
    drill.log("scratch", path=str(scratch / drill.name))
    drill.log("lend", user="libvirt-qemu", paths=lent)
    uid = private.owner_of("libvirt-qemu")[0]
    for path, perm in ((vm_dir, 1), (backup_dir, 1), (image, 4)):
        private.grant_acl(path, uid, perm)
    drill.log("start", uuid=running.uuid, name=drill.name)
    ended = Drill.objects.create(backup=backup, status=RunStatus.FAILED)
    ended.name = site.drill_name(ended.pk)  # the fixture removes it, whatever happens
    ended.save()
    stray = stray_sandbox(domains, running, ended.name)

    report = reconcile.reconcile()

    drill.refresh_from_db()
    assert report.drills_interrupted == [drill.pk] and report.sandboxes == [stray]
    assert (
        drill.status == RunStatus.INTERRUPTED and "sandbox and its files are removed" in drill.error
    )
    assert running.uuid not in {d.UUIDString() for d in domains.conn.listAllDomains()}
    assert stray not in {d.name() for d in domains.conn.listAllDomains()}
    assert not (scratch / drill.name).exists()
    for path, mode in ((image, 0o600), (backup_dir, 0o700), (vm_dir, 0o700)):
        assert not private.has_acl(path) and stat.S_IMODE(path.stat().st_mode) == mode
    assert Alert.objects.get(kind=AlertKind.DRILL_FAILED, vm=vm).subject.endswith("interrupted")


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def stray_sandbox(domains, template, name: str) -> str:
    """A transient copy of ``template``'s definition named like one of our sandboxes."""
    root = ET.fromstring(domains.lookup(template).XMLDesc(0))
    root.find("name").text = name
    root.remove(root.find("uuid"))
    for disk in root.findall("devices/disk"):  # no disk: it would share the template's
        root.find("devices").remove(disk)
    domains.conn.createXML(ET.tostring(root, encoding="unicode"), 0)
    return name


def test_a_screenshot_of_a_domain_with_graphics_becomes_a_png(domains):
    """The evidence where a sandbox has a screen: libvirt's screenshot (PNG from this QEMU,
    PPM from older ones) as PNG, through a VNC display that listens nowhere, as the
    sandbox has it."""
    template = domains.create()
    root = ET.fromstring(domains.lookup(template).XMLDesc(0))
    devices = root.find("devices")
    screen = ET.SubElement(devices, "graphics", type="vnc")
    ET.SubElement(screen, "listen", type="none")
    ET.SubElement(ET.SubElement(devices, "video"), "model", type="vga")
    domains.conn.createXML(ET.tostring(root, encoding="unicode"), 0)
    with hypervisor.session(domains.uri) as hv:
        time.sleep(1)  # SeaBIOS draws something
        mime, data = hv.screenshot(template.uuid)
    png = evidence.as_png(mime, data)
    assert mime in ("image/png", "image/x-portable-pixmap") and png.startswith(b"\x89PNG")
    assert struct.unpack(">II", png[16:24]) == (720, 400)  # VGA text mode: SeaBIOS
