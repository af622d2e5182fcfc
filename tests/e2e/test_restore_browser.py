"""Restoring a backup as a new domain from the browser, against a live server, a real
django-q2 worker and a real TCG domain: open the backup, fill the restore form, watch the
restore page finish by itself, then find the new domain running in libvirtd."""

import re
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

import pytest
from playwright.sync_api import expect

from backups import jobs, qemu_img, requests
from backups.models import RunStatus
from tests.domains import BASE, PREFIX, DiskSpec, make_dir, remove_domain
from tests.e2e.browser import CHROMIUM, log_in, record_problems, watch_the_restore_without_reloading

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (make test installs it)"
    ),
]


class Target(NamedTuple):
    root: Path
    name: str


@pytest.fixture
def target(settings, monkeypatch, domains):
    """A configured restore root and a fresh name; the domain restored under that name and
    the root are removed at teardown, pass or fail.

    The live server runs in this process and reads ``settings``; the worker is a separate
    process and reads its environment.
    """
    token = uuid.uuid4().hex[:8]
    root = make_dir(BASE / f"{PREFIX}restore-{token}")
    settings.VMBACKUP_RESTORE_ROOTS = [str(root)]
    monkeypatch.setenv("VMBACKUP_RESTORE_ROOTS", str(root))
    try:
        yield Target(root, f"{PREFIX}e2e-{token}")
    finally:
        for dom in domains.conn.listAllDomains():
            if dom.name() == f"{PREFIX}e2e-{token}":
                remove_domain(domains.conn, dom.UUIDString())
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], timeout=60)


@pytest.fixture
def qcluster(target, qcluster):
    """The shared worker, started only once the restore root is in the environment (and
    so stopped before ``target`` removes what it restored)."""
    return qcluster


class Original(NamedTuple):
    backup_id: int
    vm_name: str
    uuid: str
    image: Path  # the backup's vda.qcow2


@pytest.fixture
def original(domains, synced, backup_root):
    """A small running TCG domain and one push backup of it, taken in this process: the
    browser test already covers "Back up now"."""
    dom = domains.create([DiskSpec("vda", "qcow2", 64, [(0, 8, 0xA1), (40, 4, 0xA2)])], start=True)
    run = requests.request_backup(synced(dom), method="push", enqueue=False)
    jobs.run_backup(run.pk)
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, run.error
    return Original(run.backup.pk, dom.name, dom.uuid, Path(run.backup.path) / "vda.qcow2")


def request_the_restore(page, original, target, live_server, screenshot) -> None:
    page.goto(f"/backups/{original.backup_id}/")
    expect(page.get_by_role("heading", level=1)).to_contain_text(f"Backup of {original.vm_name}")
    page.get_by_role("link", name="Restore as a new domain").click()
    expect(page).to_have_url(f"{live_server.url}/backups/{original.backup_id}/restore/")
    page.get_by_label("New domain name").fill(target.name)
    page.get_by_label("Restore into").select_option(str(target.root))
    page.get_by_label("Start the new domain when restored").check()
    screenshot(page, "restore-01-form")
    page.get_by_role("button", name="Restore as a new domain").click()
    expect(page).to_have_url(re.compile(re.escape(live_server.url) + r"/restores/\d+/$"))
    expect(page.get_by_text(f"as {target.name} queued.")).to_be_visible()


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_it_restores_a_backup_as_a_new_running_domain_from_the_browser(
    original, target, domains, admin_user, qcluster, live_server, browser_page, screenshot
):
    page = browser_page
    problems = record_problems(page)
    log_in(page, live_server)
    request_the_restore(page, original, target, live_server, screenshot)

    seen = watch_the_restore_without_reloading(page, qcluster)
    print("\nrestore states:", *seen, sep="\n  ")
    final = target.root / target.name
    box = page.locator("#restore-progress")
    facts = box.locator("dl.facts")
    expect(facts).to_contain_text(target.name)
    expect(facts).to_contain_text(str(final))
    bar = box.locator("progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") != "1"
    shown_uuid = facts.locator("code").first.text_content().strip()
    screenshot(page, "restore-02-done")

    new = domains.conn.lookupByName(target.name)
    assert new.isActive()
    assert new.UUIDString() == shown_uuid != original.uuid
    sources = [
        Path(s.get("file"))
        for s in ET.fromstring(new.XMLDesc(0)).findall("devices/disk[@device='disk']/source")
    ]
    assert sources == [final / "vda.qcow2"]
    assert qemu_img.compare(str(original.image), "qcow2", str(sources[0]), "qcow2")
    # the original runs on, untouched
    assert domains.conn.lookupByUUIDString(original.uuid).isActive()
    assert problems == []
