"""Restoring a backup over its own (shut off) VM's disks, against the real libvirtd."""

import socket
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from backups import jobs, qemu_img, reconcile, requests
from backups.models import Backup, Restore, RestoreMode, RunStatus
from backups.restore import in_place as restore_in_place
from tests.domains import DiskSpec, make_dir
from tests.helpers import modes_at_copy

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]


def offline_backup(vm) -> Backup:
    run = requests.request_backup(vm, method="offline", enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    return run.backup


def qemu_io(path: Path, fmt: str, command: str) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(path)], check=True,
                   capture_output=True, timeout=60)  # fmt: skip


def copy_of(path: Path, fmt: str, dest: Path) -> Path:
    out = dest / f"{path.name}.copy"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", fmt, str(path), str(out)],
                   check=True, timeout=60)  # fmt: skip
    return out


def restore_now(backup, start=False) -> Restore:
    restore = requests.request_restore(backup, in_place=True, start=start, enqueue=False)
    jobs.run_restore(restore.pk)
    restore.refresh_from_db()
    return restore


def row_backup(host, tmp_path) -> Backup:
    """A backup row only (no files): for the journal-driven repair tests."""
    from backups.models import VirtualMachine

    vm = VirtualMachine.objects.create(host=host, uuid=uuid.uuid4(), name="vm")
    return Backup.objects.create(vm=vm, path=str(tmp_path / "backup"))


def dead_restore(backup, **fields) -> Restore:
    """An in-place restore left running by a worker that is gone (no such pid here)."""
    fields.setdefault("worker", f"{socket.gethostname()}:999999999")
    return Restore.objects.create(
        backup=backup,
        mode=RestoreMode.IN_PLACE,
        name=backup.vm.name,
        status=RunStatus.RUNNING,
        **fields,
    )


def hidden_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".restore-" in p.name)


@pytest.fixture
def changed_vm(domains, backup_root, synced):
    """A shut-off domain (qcow2 + raw + NVRAM), backed up, then written to: the disks now
    differ from the backup, and a copy of that changed state is kept for comparison."""
    dom = domains.create(
        [DiskSpec("vda", "qcow2", 16, [(0, 4, 0xA1)]), DiskSpec("vdb", "raw", 8, [(1, 1, 0xB1)])],
        nvram=True,
    )
    vm = synced(dom)
    backup = offline_backup(vm)
    qemu_io(dom.disks["vda"], "qcow2", "write -P 0x99 0 2M")
    qemu_io(dom.disks["vdb"], "raw", "write -P 0x98 1M 1M")
    changed = make_dir(dom.dir / "changed")
    copies = {t: copy_of(p, dom.formats[t], changed) for t, p in dom.disks.items()}
    return dom, vm, backup, copies


def test_it_puts_the_backup_back_and_keeps_what_it_replaced(domains, changed_vm, monkeypatch):
    dom, vm, backup, copies = changed_vm
    xml_before = domains.lookup(dom).XMLDesc(0)
    dom.disks["vda"].chmod(0o640)  # a disk the admin shares with a group: the group stays
    dom.disks["vdb"].chmod(0o644)  # others may read the disk: not the restored one
    copying = modes_at_copy(monkeypatch)

    restore = restore_now(backup, start=True)

    assert restore.status == RunStatus.SUCCEEDED, restore.error
    assert sorted(copying.values()) == [0o600, 0o600]  # private before the first byte
    assert dom.disks["vda"].stat().st_mode & 0o777 == 0o640
    assert dom.disks["vdb"].stat().st_mode & 0o777 == 0o640
    assert restore.mode == RestoreMode.IN_PLACE and restore.domain_uuid == dom.uuid
    for target, path in dom.disks.items():
        fmt = dom.formats[target]
        image = Path(backup.path) / f"{target}.qcow2"
        assert qemu_img.compare(str(image), "qcow2", str(path), fmt, force_share=True)
        kept = Path(restore_in_place.kept_name(str(path), restore.pk))
        assert qemu_img.compare(str(copies[target]), fmt, str(kept), fmt)
    d = domains.lookup(dom)
    assert d.isActive()  # started, on the same definition and the same files
    assert d.XMLDesc(0).count("file='") >= xml_before.count("file='")
    for path in dom.disks.values():
        assert f"file='{path}'" in d.XMLDesc(0)
    assert hidden_leftovers(dom.dir) == []
    assert any("before-restore" in note for note in restore.notes)


def test_it_refuses_a_running_vm_and_changes_nothing(domains, changed_vm):
    dom, vm, backup, copies = changed_vm
    domains.lookup(dom).create()

    restore = restore_now(backup)

    assert restore.status == RunStatus.FAILED
    assert "shut it down before restoring in place" in restore.error
    for target, path in dom.disks.items():
        fmt = dom.formats[target]
        assert qemu_img.compare(str(copies[target]), fmt, str(path), fmt, force_share=True)
    assert hidden_leftovers(dom.dir) == []


def test_a_failure_during_the_switch_puts_every_disk_back(domains, changed_vm, monkeypatch):
    dom, vm, backup, copies = changed_vm
    real_rename = restore_in_place.os.rename

    def rename(src, dst):
        if str(src).endswith(".partial") and Path(dst).name == "vdb.raw":
            raise OSError(5, "injected I/O error")
        real_rename(src, dst)

    monkeypatch.setattr(restore_in_place.os, "rename", rename)
    restore = restore_now(backup)

    assert restore.status == RunStatus.FAILED
    assert "injected I/O error" in restore.error and "put back" in restore.error
    for target, path in dom.disks.items():
        fmt = dom.formats[target]
        assert qemu_img.compare(str(copies[target]), fmt, str(path), fmt)
    assert hidden_leftovers(dom.dir) == []
    assert not domains.lookup(dom).isActive()


def test_a_backup_is_refused_while_the_vm_is_restored_in_place(domains, changed_vm):
    dom, vm, backup, _copies = changed_vm
    Restore.objects.create(backup=backup, mode=RestoreMode.IN_PLACE, name=vm.name,
                           status=RunStatus.RUNNING)  # fmt: skip
    run = requests.request_backup(vm, method="offline", enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    assert "being restored in place" in run.error


def test_reconcile_rolls_back_a_restore_that_died_mid_switch(db, host, tmp_path):
    restore = dead_restore(row_backup(host, tmp_path))
    vda, vdb = tmp_path / "vda.qcow2", tmp_path / "vdb.raw"
    # vda was switched (original kept, restored copy in place); vdb was not yet
    Path(restore_in_place.kept_name(str(vda), restore.pk)).write_text("vda original")
    vda.write_text("vda restored")
    vdb.write_text("vdb original")
    Path(restore_in_place.partial_name(str(vdb), restore.pk)).write_text("vdb restored")
    restore.journal = journal(restore, vda, vdb, swapped=[vda])
    restore.save()

    reconcile.reconcile()

    restore.refresh_from_db()
    assert restore.status == RunStatus.INTERRUPTED
    assert "as they were before" in restore.error
    assert vda.read_text() == "vda original" and vdb.read_text() == "vdb original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vda.qcow2", "vdb.raw"]


def journal(restore, *paths, swapped) -> list[dict]:
    entries = [{"step": "partial", "path": restore_in_place.partial_name(str(p), restore.pk)}
               for p in paths]  # fmt: skip
    entries.append({"step": "switch", "files": [str(p) for p in paths]})
    entries += [
        {"step": "swap", "path": str(p), "kept": restore_in_place.kept_name(str(p), restore.pk)}
        for p in swapped
    ]
    return entries


def test_reconcile_leaves_disks_the_worker_already_put_back(db, host, tmp_path):
    """The worker undid its switch, then died before recording the outcome: the disks at
    the paths are the originals again and must not be mistaken for restored copies."""
    restore = dead_restore(row_backup(host, tmp_path))
    vda, vdb = tmp_path / "vda.qcow2", tmp_path / "vdb.raw"
    vda.write_text("vda original")
    vdb.write_text("vdb original")
    restore.journal = journal(restore, vda, vdb, swapped=[vda, vdb])
    restore.save()

    reconcile.reconcile()

    restore.refresh_from_db()
    assert restore.status == RunStatus.INTERRUPTED
    assert vda.read_text() == "vda original" and vdb.read_text() == "vdb original"


def test_vmbackup_restore_in_place(domains, changed_vm):
    from io import StringIO

    from django.core.management import CommandError, call_command

    dom, vm, backup, _copies = changed_vm
    with pytest.raises(CommandError, match="no --name or --root"):
        call_command("vmbackup_restore", str(backup.pk), "--in-place", "--name", "x")
    out = StringIO()

    call_command("vmbackup_restore", str(backup.pk), "--in-place", "--wait", stdout=out)

    assert f"restored in place {vm.name}" in out.getvalue()
    image = Path(backup.path) / "vda.qcow2"
    assert qemu_img.compare(str(image), "qcow2", str(dom.disks["vda"]), "qcow2")


def test_it_refuses_a_disk_whose_definition_names_its_backing_chain(domains, changed_vm):
    dom, vm, backup, copies = changed_vm
    base = dom.dir / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(dom.disks["vda"])], check=True)  # fmt: skip
    d = domains.lookup(dom)
    source = f"<source file='{dom.disks['vda']}'/>"
    chain = (
        f"<backingStore type='file'><format type='qcow2'/><source file='{base}'/></backingStore>"
    )
    xml = d.XMLDesc(0)
    assert source in xml
    domains.conn.defineXML(xml.replace(source, source + chain, 1))

    restore = restore_now(backup)

    assert restore.status == RunStatus.FAILED
    assert "names its backing chain" in restore.error
    assert qemu_img.compare(str(copies["vdb"]), "raw", str(dom.disks["vdb"]), "raw")
    assert hidden_leftovers(dom.dir) == []


def test_it_refuses_a_vm_with_a_saved_state(domains, changed_vm):
    dom, vm, backup, copies = changed_vm
    d = domains.lookup(dom)
    d.create()
    d.managedSave(0)
    assert not d.isActive() and d.hasManagedSaveImage(0)

    restore = restore_now(backup)

    assert restore.status == RunStatus.FAILED
    assert "saved state" in restore.error
    qcow = dom.disks["vda"]
    assert qemu_img.compare(str(copies["vda"]), "qcow2", str(qcow), "qcow2")
    assert hidden_leftovers(dom.dir) == []


def test_a_start_that_fails_after_the_switch_keeps_the_restored_disks(domains, changed_vm,
                                                                      monkeypatch):  # fmt: skip
    from backups import hypervisor

    dom, vm, backup, _copies = changed_vm

    def refuse(self, uuid):
        raise hypervisor.HypervisorError("start domain: injected failure")

    monkeypatch.setattr(hypervisor.Session, "start", refuse)
    restore = restore_now(backup, start=True)

    assert restore.status == RunStatus.SUCCEEDED, restore.error
    assert any("did not start" in note for note in restore.notes)
    image = Path(backup.path) / "vda.qcow2"
    assert qemu_img.compare(str(image), "qcow2", str(dom.disks["vda"]), "qcow2")


def test_a_vm_with_a_generation_id_gets_a_new_one(domains, changed_vm):
    dom, vm, backup, _copies = changed_vm
    d = domains.lookup(dom)
    old = "43dc0cf8-809b-4adb-9bea-a9abb5f3d90d"
    domains.conn.defineXML(d.XMLDesc(0).replace("</uuid>", f"</uuid><genid>{old}</genid>", 1))
    assert old in domains.lookup(dom).XMLDesc(0)

    restore = restore_now(backup)

    assert restore.status == RunStatus.SUCCEEDED, restore.error
    xml = domains.lookup(dom).XMLDesc(0)
    assert "<genid>" in xml and old not in xml
    assert any("genid" in note for note in restore.notes)


def test_reconcile_never_switches_disks_under_a_vm_started_mid_restore(domains, changed_vm):
    import shutil

    dom, vm, backup, copies = changed_vm
    restore = dead_restore(backup)
    vda = dom.disks["vda"]
    kept = restore_in_place.kept_name(str(vda), restore.pk)
    partial = restore_in_place.partial_name(str(vda), restore.pk)
    shutil.copyfile(Path(backup.path) / "vda.qcow2", partial)
    restore.journal = [{"step": "partial", "path": partial},
                       {"step": "switch", "files": [str(vda)]},
                       {"step": "swap", "path": str(vda), "kept": kept}]  # fmt: skip
    restore.save()
    Path(vda).rename(kept)  # the worker died right after switching vda...
    Path(partial).rename(vda)
    domains.lookup(dom).create()  # ... and the VM was started on the mixed disks

    report = reconcile.reconcile()

    restore.refresh_from_db()
    assert restore.status == RunStatus.RUNNING  # still holds the VM: no backup reads it
    assert any("shut it down" in e for e in report.errors)
    assert Path(kept).exists() and domains.lookup(dom).isActive()

    domains.lookup(dom).destroy()
    reconcile.reconcile()

    restore.refresh_from_db()
    assert restore.status == RunStatus.INTERRUPTED
    assert qemu_img.compare(str(copies["vda"]), "qcow2", str(vda), "qcow2")
    assert hidden_leftovers(dom.dir) == [] and not Path(kept).exists()


def test_another_machines_dead_restore_is_left_to_that_machine(db, host, tmp_path):
    restore = dead_restore(row_backup(host, tmp_path), worker="elsewhere:123",
                           heartbeat_at=timezone.now() - timedelta(hours=1))  # fmt: skip

    report = reconcile.reconcile()

    restore.refresh_from_db()
    assert restore.status == RunStatus.RUNNING
    assert any("elsewhere:123" in e for e in report.errors)
    Restore.objects.filter(pk=restore.pk).update(heartbeat_at=timezone.now() - timedelta(days=2))
    reconcile.reconcile()
    restore.refresh_from_db()
    assert restore.status == RunStatus.INTERRUPTED and "never came back" in restore.error


def test_a_cancel_before_the_switch_leaves_the_vm_as_it_was(domains, changed_vm, monkeypatch):

    dom, vm, backup, copies = changed_vm
    real_flatten = restore_in_place.flatten

    def flatten_then_cancel(*args):
        real_flatten(*args)
        Restore.objects.update(cancel_requested=True)  # the user clicks Cancel meanwhile

    monkeypatch.setattr(restore_in_place, "flatten", flatten_then_cancel)
    restore = restore_now(backup)

    assert restore.status == RunStatus.CANCELLED
    for target, path in dom.disks.items():
        fmt = dom.formats[target]
        assert qemu_img.compare(str(copies[target]), fmt, str(path), fmt)
    assert hidden_leftovers(dom.dir) == []
