"""Instant recovery against the real libvirtd and QEMU (TCG): the domain runs from the
backup within seconds, the data moves in while it runs, and the backup is never written,
never chowned, and private again afterwards."""

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from datetime import datetime
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from backups import jobs, private, qemu_img, reconcile, requests
from backups.archive import check as archive_check
from backups.models import Restore, RestoreMode, RunStatus
from backups.restore import common, instant
from tests.agent_guest import create_rooted_domain, read_marker, wait_for_agent, write_guest_file
from tests.domains import DiskSpec, guest_write
from tests.helpers import flip_byte, new_name, push, wait_until, write

pytestmark = [pytest.mark.libvirt]
GiB = 1024 * 1024 * 1024
BASE_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture
def chain(domains, backup_root, synced):
    """A full and an incremental backup of a 2 GiB disk with data spread over it; the
    original is shut off afterwards (it would only spin in its firmware)."""
    patterns = [(0, 40, 0xA1), (1000, 40, 0xA2), (2000, 40, 0xA3)]
    dom = domains.create([DiskSpec("vda", "qcow2", 2048, patterns)], start=True)
    vm = synced(dom)
    push(vm)
    write(domains, dom, 0, "write -P 0xb7 500M 8M")
    incremental = push(vm).backup
    assert incremental.kind == "incremental"
    domains.lookup(dom).destroy()
    return vm, incremental


def images(backup) -> list[Path]:
    dirs = archive_check.chain_dirs(backup.path)
    return [d / "vda.qcow2" for d in dirs]


def assert_backup_private(backup) -> None:
    """Owner, mode and no ACL: as published, whatever QEMU was lent meanwhile."""
    for image in images(backup):
        for path, mode in ((image, 0o600), (image.parent, 0o700), (image.parent.parent, 0o700)):
            st = path.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, mode), path
            assert not private.has_acl(path), path


def during_move(monkeypatch, action):
    """Run ``action(restore)`` once, when every copy has started and the domain runs."""
    real = instant._wait_ready

    def wait_ready(hv, progress, uuid, sizes):
        action(progress.restore, hv)
        return real(hv, progress, uuid, sizes)

    monkeypatch.setattr(instant, "_wait_ready", wait_ready)


def running_after(restore, since: float) -> float:
    """Seconds from ``since`` (epoch) to the journal's ``running`` step."""
    entry = next(e for e in restore.journal if e["step"] == "running")
    return datetime.fromisoformat(entry["at"]).timestamp() - since


@pytest.mark.django_db
def test_it_runs_at_once_moves_the_data_and_keeps_the_guests_writes(
    chain, domains, restore_root, settings, monkeypatch, tmp_path
):
    vm, backup = chain
    settings.VMBACKUP_INSTANT_MOVE_MIB_S = 1  # slow enough to act during it, then unthrottled
    settings.VMBACKUP_KEEP_MANUAL = 1  # prune would fold the full into the incremental
    before = common.fingerprint(Path(backup.path))
    seen = {}

    def while_moving(restore, hv):
        restore.refresh_from_db()
        dom = domains.conn.lookupByUUIDString(restore.domain_uuid)
        seen["active"] = bool(dom.isActive())
        job = dom.blockJobInfo("vda", 0)
        seen["moving"] = bool(job) and job["cur"] < job["end"]
        for image in images(backup):  # QEMU reads them through an ACL: never chowned
            st = image.stat()
            assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o007 == 0
            assert private.has_acl(image)
        seen["pinned"] = [r.name for r in Restore.objects.pinning(backup.parent)]
        with pytest.raises(CommandError) as skipped:
            call_command("vmbackup_prune", stdout=StringIO())
        seen["prune"] = str(skipped.value)
        guest_write(domains.conn, restore.domain_uuid, 0, "write -P 0x5a 1500M 1M")
        guest_write(domains.conn, restore.domain_uuid, 0, "flush")
        dom.blockJobSetSpeed("vda", 0, 0)

    during_move(monkeypatch, while_moving)
    t0 = time.time()
    restore = requests.request_restore(
        backup, name=new_name(), root=str(restore_root), start=True, instant=True
    )
    jobs.run_restore(restore.pk)
    moved = time.time() - t0
    restore.refresh_from_db()

    assert restore.status == RunStatus.SUCCEEDED, restore.error
    to_running = running_after(restore, t0)
    print(f"\ninstant 2 GiB: running after {to_running:.2f} s, independent after {moved:.1f} s")
    assert to_running < 10
    assert seen["active"] and seen["moving"]
    assert seen["pinned"] == [restore.name]
    assert restore.name in seen["prune"] and "in use" in seen["prune"]
    assert common.fingerprint(Path(backup.path)) == before  # prune left the chain alone
    final = restore_root / restore.name
    assert sorted(p.name for p in final.iterdir()) == ["vda.qcow2"]  # overlays gone
    dom = domains.conn.lookupByName(restore.name)
    assert dom.isActive()
    for flags in (0, 2):  # live and persistent: the moved disk, no backing store
        xml = dom.XMLDesc(flags)
        assert f"file='{final / 'vda.qcow2'}'" in xml
        assert str(Path(backup.path).parent) not in xml
    moved_disk = str(final / "vda.qcow2")
    assert qemu_img.info(moved_disk, "qcow2", force_share=True).backing_filename is None
    reference = tmp_path / "ref.qcow2"  # the backup plus what the guest wrote
    qemu_img.convert(str(images(backup)[0]), "qcow2", str(reference), "qcow2")
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 1500M 1M", str(reference)], check=True)
    assert qemu_img.compare(str(reference), "qcow2", moved_disk, "qcow2", force_share=True)
    assert_backup_private(backup)
    assert archive_check.verify(backup.path).ok
    assert not Restore.objects.pinning(backup).exists()


@pytest.mark.django_db
def test_a_failed_check_stops_and_removes_the_domain(chain, domains, restore_root):
    vm, backup = chain
    full = images(backup)[-1]
    with open(full, "rb") as f:  # in the 0xa2 data, not a header: only SHA-256 sees it
        at = f.read(64 << 20).index(b"\xa2" * 4096) + 100
    flip_byte(full, at)

    restore = requests.request_restore(
        backup, name=new_name(), root=str(restore_root), start=True, instant=True
    )
    jobs.run_restore(restore.pk)
    restore.refresh_from_db()

    assert restore.status == RunStatus.FAILED
    assert "failed its check" in restore.error
    steps = [e["step"] for e in restore.journal]
    assert "running" in steps and "pivot" not in steps  # it ran, it never went independent
    assert restore.name not in [d.name() for d in domains.conn.listAllDomains()]
    assert list(restore_root.iterdir()) == []
    assert_backup_private(backup)


@pytest.mark.django_db
def test_a_cancel_during_the_move_removes_the_domain_and_its_overlays(
    chain, domains, restore_root, settings, monkeypatch
):
    vm, backup = chain
    settings.VMBACKUP_INSTANT_MOVE_MIB_S = 1
    monkeypatch.setattr(instant, "CANCEL_CHECK_EVERY", 0)
    during_move(monkeypatch, lambda restore, hv: requests.request_restore_cancel(restore))

    restore = requests.request_restore(
        backup, name=new_name(), root=str(restore_root), start=True, instant=True
    )
    jobs.run_restore(restore.pk)
    restore.refresh_from_db()

    assert restore.status == RunStatus.CANCELLED, restore.error
    assert restore.name not in [d.name() for d in domains.conn.listAllDomains()]
    assert list(restore_root.iterdir()) == []
    assert_backup_private(backup)


@pytest.mark.django_db(transaction=True)
def test_a_killed_worker_s_move_is_finished_by_the_next_one(
    chain, domains, restore_root, settings, tmp_path, async_calls
):
    """SIGKILL mid-move: the copy goes on inside QEMU; reconcile hands the restore to a
    worker, which finds the copy, checks the chain again and pivots."""
    vm, backup = chain
    name = new_name()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env |= {
        "DJANGO_SETTINGS_MODULE": "vmbackup_site.settings",
        "VMBACKUP_DATA_DIR": str(tmp_path),
        "VMBACKUP_SQLITE_PATH": str(connection.settings_dict["NAME"]),
        "VMBACKUP_RESTORE_ROOTS": str(restore_root),
        "VMBACKUP_INSTANT_MOVE_MIB_S": "1",
    }
    argv = [sys.executable, str(BASE_DIR / "manage.py"), "vmbackup_restore", str(backup.pk)]
    argv += ["--instant", "--name", name, "--root", str(restore_root), "--start", "--wait"]
    proc = subprocess.Popen(argv, cwd=BASE_DIR, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:

        def copying() -> bool:
            row = Restore.objects.filter(name=name).first()
            if not row or "copy" not in [e["step"] for e in row.journal]:
                return False
            return bool(domains.conn.lookupByName(name).blockJobInfo("vda", 0))

        wait_until(copying, 60, lambda: proc.stdout.read1().decode())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    restore = Restore.objects.get(name=name)
    dom = domains.conn.lookupByUUIDString(restore.domain_uuid)
    assert dom.isActive() and dom.blockJobInfo("vda", 0)  # the copy outlived the worker

    report = reconcile.reconcile()

    assert report.restores_resumed == [restore.pk]
    restore.refresh_from_db()
    assert restore.status == RunStatus.QUEUED
    assert [args[1] for args, _kw in async_calls] == [restore.pk]
    dom.blockJobSetSpeed("vda", 0, 0)
    jobs.run_restore(restore.pk)  # the worker that takes it
    restore.refresh_from_db()
    assert restore.status == RunStatus.SUCCEEDED, restore.error
    steps = [e["step"] for e in restore.journal]
    assert steps.count("define") == 1 and "resume" in steps and "independent" in steps
    moved = restore_root / name / "vda.qcow2"
    assert qemu_img.info(str(moved), "qcow2", force_share=True).backing_filename is None
    assert qemu_img.compare(str(images(backup)[0]), "qcow2", str(moved), "qcow2",
                            force_share=True)  # fmt: skip
    assert_backup_private(backup)


@pytest.mark.django_db
def test_reconcile_removes_a_dead_restore_that_defined_nothing(
    chain, domains, restore_root, settings
):
    vm, backup = chain
    restore = Restore.objects.create(
        backup=backup, name=new_name(), root=str(restore_root), mode=RestoreMode.INSTANT,
        status=RunStatus.RUNNING, worker="localhost-gone:1",
    )  # fmt: skip
    final = restore_root / restore.name
    progress = common.Progress(restore)
    progress.step("staging", path=str(final))
    private.mkdir(final, private.TRAVERSE)
    (final / "vda.overlay.qcow2").write_bytes(b"")
    chains = {"vda": [(str(p), "qcow2") for p in images(backup)]}
    instant.lend(restore, progress, chains)

    Restore.objects.filter(pk=restore.pk).update(worker=f"{socket.gethostname()}:999999999")

    reconcile.reconcile()

    restore.refresh_from_db()
    assert restore.status == RunStatus.INTERRUPTED
    assert not final.exists()
    assert_backup_private(backup)


@pytest.mark.django_db
def test_the_rooted_guest_boots_from_the_backup_and_keeps_what_it_wrote_meanwhile(
    domains, backup_root, synced, restore_root, settings, monkeypatch
):
    """A system whose whole root lives on its disk boots from the backup at once; what it
    writes while its data moves is on the moved disk, which boots alone afterwards."""
    marker = f"proof-{os.urandom(8).hex()}"
    spec = create_rooted_domain(domains, marker=marker)
    wait_for_agent(domains.conn, spec.uuid, timeout=90)
    backup = push(synced(spec)).backup
    domains.lookup(spec).destroy()
    settings.VMBACKUP_INSTANT_MOVE_MIB_S = 1
    seen = {}

    def while_moving(restore, hv):
        dom = domains.conn.lookupByName(restore.name)
        seen["boot"] = wait_for_agent(domains.conn, dom.UUIDString(), timeout=120)
        seen["moving"] = bool(dom.blockJobInfo("vda", 0))
        seen["marker"] = read_marker(dom)
        write_guest_file(dom, "/var/lib/during-move", "written while the data moved")
        dom.blockJobSetSpeed("vda", 0, 0)

    during_move(monkeypatch, while_moving)
    restore = requests.request_restore(
        backup, name=new_name(), root=str(restore_root), start=True, instant=True
    )
    jobs.run_restore(restore.pk)
    restore.refresh_from_db()

    assert restore.status == RunStatus.SUCCEEDED, restore.error
    print(f"\ninstant rooted guest: boot to guest-ping {seen['boot']:.1f} s during the move")
    assert seen["moving"] and seen["marker"] == marker
    dom = domains.conn.lookupByName(restore.name)
    dom.destroy()  # the moved disk alone: the backup is private again, not readable by QEMU
    dom.create()
    wait_for_agent(domains.conn, dom.UUIDString(), timeout=120)
    assert read_marker(dom) == marker
    assert read_marker(dom, "/var/lib/during-move") == "written while the data moved"
    assert_backup_private(backup)
