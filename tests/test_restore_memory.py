"""The running state: a ``memory`` backup restored as a new domain resumes from its saved RAM."""

import time
import uuid

import libvirt
import pytest

from backups import jobs, requests
from backups.archive import save_image
from backups.models import RunStatus
from tests.agent_guest import (
    create_rooted_domain,
    guest_exec,
    read_marker,
    wait_for_agent,
    write_guest_file,
)
from tests.helpers import restore_now

pytestmark = [pytest.mark.django_db, pytest.mark.libvirt]


def uptime(dom) -> float:
    code, out, err = guest_exec(dom, "/bin/cat", ["/proc/uptime"])
    assert code == 0, err
    return float(out.split()[0])


def memory_backup(vm):
    run = requests.request_backup(vm, method="memory", enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    return run.backup


def test_a_memory_backup_restored_and_started_resumes_instead_of_booting(
    domains, backup_root, synced, restore_root
):
    marker = f"proof-{uuid.uuid4().hex}"
    spec = create_rooted_domain(domains, marker=marker)
    dom = domains.lookup(spec)
    wait_for_agent(domains.conn, spec.uuid, timeout=90)
    write_guest_file(dom, "/var/lib/before-backup", "written by the guest")
    while uptime(dom) < 30:  # far above a fresh boot's uptime at its first agent answer
        time.sleep(2)
    at_backup = uptime(dom)
    backup = memory_backup(synced(spec))
    assert backup.manifest["memory"] == "memory.save"

    started = time.monotonic()
    restore = restore_now(backup, restore_root, start=True)
    took = time.monotonic() - started

    assert restore.status == RunStatus.SUCCEEDED, restore.error
    new = domains.conn.lookupByUUIDString(restore.domain_uuid)
    assert new.name() == restore.name and restore.domain_uuid != spec.uuid
    state, reason = new.state()
    assert (state, reason) == (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_RESTORED)
    assert any(note.startswith("resumed from the saved RAM state") for note in restore.notes)
    wait_for_agent(domains.conn, restore.domain_uuid, timeout=30)
    resumed = uptime(new)
    print(f"\nmemory restore: {took:.1f} s; guest uptime {at_backup:.1f} s -> {resumed:.1f} s")
    assert at_backup <= resumed < at_backup + took + 60  # continues: no boot in between
    assert read_marker(new) == marker
    assert read_marker(new, "/var/lib/before-backup") == "written by the guest"
    assert new.isPersistent()
    assert "memory.save" not in {p.name for p in (restore_root / restore.name).iterdir()}
    assert dom.isActive()  # the original runs on, untouched
    assert domains.conn.lookupByUUIDString(spec.uuid).name() == spec.name


def test_without_start_it_defines_the_domain_and_says_so(
    domains, backup_root, synced, restore_root
):
    spec = create_rooted_domain(domains)
    wait_for_agent(domains.conn, spec.uuid, timeout=90)
    backup = memory_backup(synced(spec))

    restore = restore_now(backup, restore_root)

    assert restore.status == RunStatus.SUCCEEDED, restore.error
    new = domains.conn.lookupByUUIDString(restore.domain_uuid)
    assert not new.isActive()
    assert "the RAM state is resumed only when the restore starts the domain" in restore.notes


def test_set_identity_changes_name_and_uuid_only(tmp_path):
    path = tmp_path / "x.save"
    xml = b"<domain type='qemu'>\n  <name>old</name>\n  <uuid>" + b"1" * 8 + b"-1111-1111-1111-"
    xml += b"1" * 12 + b"</uuid>\n  <description>&lt;name&gt;old&lt;/name&gt;</description>\n"
    xml += b"</domain>\n"
    cookie = b"<cookie/>"
    data = xml + b"\0" + cookie + b"\0" + b"\0" * 1024
    header = save_image.HEADER.pack(save_image.MAGIC, 2, len(data), 1, 0, len(xml) + 1, *([0] * 14))
    stream = b"QEVM" + bytes(range(256)) * 16
    path.write_bytes(header + data + stream)

    new_uuid = str(uuid.uuid4())
    save_image.set_identity(path, name="a-much-longer-new-name", uuid=new_uuid)

    image = save_image.read(path)
    assert (image.name, image.uuid, image.cookie) == ("a-much-longer-new-name", new_uuid, cookie)
    assert "&lt;name&gt;old&lt;/name&gt;" in image.xml
    assert path.read_bytes()[len(header) + len(data) :] == stream  # the stream untouched
    with pytest.raises(save_image.ArchiveError, match="not a name and UUID"):
        save_image.set_identity(path, name="../x", uuid=new_uuid)
    path.write_bytes(b"LibvirtQemudPart" + path.read_bytes()[16:])
    with pytest.raises(save_image.ArchiveError, match="not a .complete. libvirt save image"):
        save_image.read(path)
