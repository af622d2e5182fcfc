"""The agent guest fixture: boots under TCG, answers the QEMU guest agent, freezes and thaws."""

import time

import pytest

from tests.agent_guest import (
    agent_command,
    console_log_path,
    console_tail,
    create_agent_domain,
    ensure_guest,
    wait_for_agent,
)
from tests.domains import DiskSpec

pytestmark = pytest.mark.libvirt


def test_guest_is_built_once():
    first = ensure_guest()
    assert first.kernel.stat().st_size > 1024 * 1024
    assert first.initrd.stat().st_size > 1024 * 1024
    assert "kernel=linux-image-" in first.stamp
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
