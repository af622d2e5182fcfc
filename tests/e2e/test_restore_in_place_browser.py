"""Restoring a backup over its own shut-off VM from the browser, against a live server, a
real django-q2 worker and a real TCG domain whose disk changed since the backup: refuse a
wrong confirmation, then type the VM's name, watch the restore page finish by itself, and
find the VM running on the backup's disk with the replaced file kept beside it."""

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest
from django.db import connection
from playwright.sync_api import expect

from backups import jobs, qemu_img, requests
from backups.models import Restore, RunStatus
from backups.restore import in_place as restore_in_place
from tests import domains as test_domains
from tests.domains import DiskSpec, make_dir
from tests.e2e.browser import (
    CHROMIUM,
    log_in,
    record_problems,
    watch_the_restore_without_reloading,
)

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (make test installs it)"
    ),
]


class Changed(NamedTuple):
    dom: test_domains.TestDomain
    backup_id: int
    image: Path  # the backup's vda.qcow2
    copy: Path  # the disk as it was after the backup, before the restore


@pytest.fixture
def changed_vm(domains, synced, backup_root):
    """A shut-off TCG domain, one offline backup of it taken in this process, then 1 MiB of
    its disk overwritten; a copy of the changed disk is kept (in the domain's directory,
    which the ``domains`` fixture removes) to recognise the file the restore replaces."""
    dom = domains.create([DiskSpec("vda", "qcow2", 16, [(0, 4, 0xA1)])])
    run = requests.request_backup(synced(dom), method="offline", enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    disk = dom.disks["vda"]
    image = Path(run.backup.path) / "vda.qcow2"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 1M", str(disk)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    copy = make_dir(dom.dir / "changed") / "vda.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(disk), str(copy)],
                   check=True, timeout=60)  # fmt: skip
    assert not qemu_img.compare(str(image), "qcow2", str(disk), "qcow2")
    return Changed(dom, run.backup.pk, image, copy)


def restores_of(backup_id: int) -> int:
    """Counted in another thread: Playwright's event loop is current in this one, and
    Django refuses ORM calls there."""

    def count() -> int:
        try:
            return Restore.objects.filter(backup_id=backup_id).count()
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(count).result()


def refuse_a_wrong_confirmation(page, changed, live_server) -> None:
    name = changed.dom.name
    page.goto(f"/backups/{changed.backup_id}/")
    expect(page.get_by_role("heading", level=1)).to_contain_text(f"Backup of {name}")
    page.get_by_role("link", name="Restore in place…").click()
    form_url = f"{live_server.url}/backups/{changed.backup_id}/restore-in-place/"
    expect(page).to_have_url(form_url)
    expect(page.get_by_role("heading", level=1)).to_contain_text("in place")
    page.get_by_label("Type the VM's name to confirm").fill(name.upper())
    page.get_by_role("button", name="Replace the VM's disks").click()
    expect(page).to_have_url(form_url)
    expect(page.locator(".field.has-error")).to_contain_text(f"Type {name} exactly to confirm.")
    assert restores_of(changed.backup_id) == 0


def request_the_restore(page, changed, live_server, screenshot) -> int:
    name = changed.dom.name
    page.get_by_label("Type the VM's name to confirm").fill(name)
    page.get_by_label("Start the VM when restored").check()
    screenshot(page, "restore-in-place-01-confirm")
    page.get_by_role("button", name="Replace the VM's disks").click()
    expect(page).to_have_url(re.compile(re.escape(live_server.url) + r"/restores/\d+/$"))
    expect(page.get_by_text(f"over {name} queued.")).to_be_visible()
    assert restores_of(changed.backup_id) == 1
    return int(page.url.rstrip("/").rsplit("/", 1)[1])


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_it_restores_a_backup_in_place_and_starts_the_vm_from_the_browser(
    changed_vm, domains, admin_user, qcluster, live_server, browser_page, screenshot
):
    page = browser_page
    dom = changed_vm.dom
    disk = dom.disks["vda"]
    problems = record_problems(page)
    log_in(page, live_server)
    refuse_a_wrong_confirmation(page, changed_vm, live_server)
    restore_id = request_the_restore(page, changed_vm, live_server, screenshot)

    seen = watch_the_restore_without_reloading(page, qcluster)
    print("\nrestore states:", *seen, sep="\n  ")
    box = page.locator("#restore-progress")
    facts = box.locator("dl.facts")
    expect(facts).to_contain_text(dom.name)
    expect(facts.locator("code").first).to_have_text(dom.uuid)
    kept = Path(restore_in_place.kept_name(str(disk), restore_id))
    expect(box.locator("ul.notes")).to_contain_text(f"kept as <file>.before-restore-{restore_id}")
    screenshot(page, "restore-in-place-02-done")

    vm = domains.lookup(dom)  # by the UUID it had before the restore
    assert vm.isActive() and vm.name() == dom.name
    assert f"file='{disk}'" in vm.XMLDesc(0)
    assert qemu_img.compare(str(changed_vm.image), "qcow2", str(disk), "qcow2", force_share=True)
    assert kept.exists() and kept.parent == dom.dir  # removed with the domain's directory
    assert qemu_img.compare(str(changed_vm.copy), "qcow2", str(kept), "qcow2")
    assert [p.name for p in dom.dir.iterdir() if ".restore-" in p.name] == []
    assert problems == []
