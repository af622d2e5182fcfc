"""The agent guests: boot under TCG and answer the QEMU guest agent; the initramfs-only one
freezes and thaws, the disk-rooted one boots only from a disk that holds its system."""

import time
import uuid

import libvirt
import pytest

from backups.models import RunStatus
from tests.agent_guest import (
    MARKER_PATH,
    NO_BOOT_LINE,
    NO_ROOT_LINE,
    agent_command,
    console_log_path,
    console_tail,
    create_agent_domain,
    create_rooted_domain,
    ensure_guest,
    guest_exec,
    read_marker,
    wait_for_agent,
    wait_for_console,
    write_guest_file,
)
from tests.domains import DiskSpec
from tests.helpers import push, restore_now

pytestmark = pytest.mark.libvirt


def test_guest_is_built_once():
    first = ensure_guest()
    assert first.kernel.stat().st_size > 1024 * 1024
    assert first.initrd.stat().st_size > 1024 * 1024
    assert "kernel=linux-image-" in first.stamp
    assert first.disk_root.stat().st_size == 64 * 1024 * 1024
    assert ensure_guest() is first


def test_agent_guest_boots_and_freezes(domains):
    spec = create_agent_domain(
        domains,
        [DiskSpec("vda", "raw", 32), DiskSpec("vdb", "qcow2", 16, [(0, 1, 0xC1)])],
        ext4={"vda"},
        start=False,
    )
    dom = domains.lookup(spec)
    assert dom.OSType() == "hvm"
    started = time.monotonic()
    dom.create()
    waited = wait_for_agent(domains.conn, spec.uuid, timeout=90)
    print(f"\nagent guest: boot to guest-ping {time.monotonic() - started:.1f} s (TCG)")

    log = console_log_path(spec)
    mounts = [fs["mountpoint"] for fs in agent_command(dom, "guest-get-fsinfo")]
    assert mounts == ["/mnt/vda"], console_tail(log)  # the pattern-filled vdb is not mounted
    assert agent_command(dom, "guest-fsfreeze-status") == "thawed"

    assert dom.fsFreeze() == 1
    try:
        assert agent_command(dom, "guest-fsfreeze-status") == "frozen"
    finally:
        thawed = dom.fsThaw()
    assert thawed == 1
    assert agent_command(dom, "guest-fsfreeze-status") == "thawed"
    assert waited < 90


def test_freeze_without_filesystems(domains):
    """No disk at all: the freeze succeeds with nothing frozen, and qemu-ga (7.2) then drops its
    frozen state at once, so the status stays "thawed" (a backup must not insist on "frozen")."""
    spec = create_agent_domain(domains)
    dom = domains.lookup(spec)
    wait_for_agent(domains.conn, spec.uuid, timeout=90)
    assert agent_command(dom, "guest-get-fsinfo") == []
    assert dom.fsFreeze() == 0
    try:
        assert agent_command(dom, "guest-fsfreeze-status") == "thawed"
    finally:
        assert dom.fsThaw() == 0
    assert agent_command(dom, "guest-ping") == {}


# --------------------------------------------------------------- the disk-rooted guest


def test_rooted_guest_boots_from_its_disk_and_shows_the_marker(domains):
    marker = f"proof-{uuid.uuid4().hex}"
    started = time.monotonic()
    spec = create_rooted_domain(domains, marker=marker, size_mib=256)
    dom = domains.lookup(spec)
    waited = wait_for_agent(domains.conn, spec.uuid, timeout=90)
    print(f"\nrooted guest: define+boot to guest-ping {time.monotonic() - started:.1f} s (TCG)")

    log = console_log_path(spec)
    assert "<kernel>" not in dom.XMLDesc(0)  # nothing of the system comes from the host
    assert "agent-guest: init on the root disk" in log.read_text(), console_tail(log)
    assert read_marker(dom) == marker
    assert guest_exec(dom, "/bin/cat", [MARKER_PATH]) == (0, marker, "")
    assert [fs["mountpoint"] for fs in agent_command(dom, "guest-get-fsinfo")] == ["/"]
    assert dom.blockInfo("vda")[0] == 256 * 1024 * 1024  # grown past the system's 64 MiB
    assert waited < 90


def test_a_disk_without_a_working_system_never_answers(domains):
    """A zeroed disk stops in SeaBIOS, a zeroed root partition in the initramfs: both say so
    on the console, and neither ever opens the agent's port."""
    zeros = create_rooted_domain(domains, broken="zeros")
    no_root = create_rooted_domain(domains, broken="root")

    wait_for_console(console_log_path(zeros), NO_BOOT_LINE, timeout=60)
    wait_for_console(console_log_path(no_root), f"{NO_ROOT_LINE}: no ext4 filesystem", timeout=90)
    for spec in (zeros, no_root):
        with pytest.raises(TimeoutError, match="did not answer within 3 s"):
            wait_for_agent(domains.conn, spec.uuid, timeout=3)
        assert domains.lookup(spec).isActive()  # up, not crashed: only the proof is missing


@pytest.mark.django_db
def test_a_push_backup_of_the_rooted_guest_restores_to_a_system_that_boots(
    domains, backup_root, synced, restore_root
):
    marker = f"proof-{uuid.uuid4().hex}"
    spec = create_rooted_domain(domains, marker=marker)
    dom = domains.lookup(spec)
    wait_for_agent(domains.conn, spec.uuid, timeout=90)
    write_guest_file(dom, "/var/lib/before-backup", "written by the guest")
    run = push(synced(spec))
    assert run.consistency == "filesystem-frozen"  # the root filesystem, "/", was frozen
    backup = run.backup
    write_guest_file(dom, "/var/lib/after-backup", "too late")

    restore = restore_now(backup, restore_root, start=True)

    assert restore.status == RunStatus.SUCCEEDED, restore.error
    new = domains.conn.lookupByUUIDString(restore.domain_uuid)
    started = time.monotonic()
    wait_for_agent(domains.conn, restore.domain_uuid, timeout=90)
    print(f"\nrestored rooted guest: boot to guest-ping {time.monotonic() - started:.1f} s")
    assert read_marker(new) == marker
    assert read_marker(new, "/var/lib/before-backup") == "written by the guest"
    with pytest.raises(libvirt.libvirtError, match="No such file"):
        read_marker(new, "/var/lib/after-backup")
    assert dom.isActive()  # the original runs on, on its own disk
