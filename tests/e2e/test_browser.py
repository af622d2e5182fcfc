"""The whole path an operator takes, in a real browser against a live server, a real
django-q2 worker and a real TCG domain: log in, back up now, watch the bar, download the
restore instructions."""

import re
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from playwright.sync_api import expect

from tests.domains import DiskSpec
from tests.e2e.browser import CHROMIUM, FINISHED, record_problems

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (make test installs it)"
    ),
]


@pytest.fixture
def vm(domains, synced):
    """A running TCG domain with 2.9 GiB of data: the push copy outlasts a few heartbeats."""
    dom = domains.create(
        [DiskSpec("vda", "qcow2", 3072, [(0, 1500, 0xA1), (1500, 1500, 0xA2)])], start=True
    )
    return synced(dom)


class Sample(NamedTuple):
    at: float  # seconds since watching began
    status: str
    value: int
    max: int

    @property
    def moving(self) -> bool:
        return self.status == "running" and 0 < self.value < self.max


# Status and bar read in one JavaScript turn, so an htmx swap cannot fall between them.
READ_PROGRESS = """box => {
    const bar = box.querySelector("progress");
    return [box.querySelector(".status").textContent.trim(),
            Number(bar.getAttribute("value")), Number(bar.getAttribute("max"))];
}"""


def watch_progress(page, worker, on_moving, timeout: float = 90) -> list[Sample]:
    """Every distinct state of the run page's bar, read every 100 ms until the run ends;
    ``on_moving`` is called once, at the first sample between empty and full."""
    seen: list[Sample] = []
    box = page.locator("#run-progress")
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        sample = Sample(round(time.monotonic() - start, 1), *box.evaluate(READ_PROGRESS))
        if not seen or seen[-1][1:] != sample[1:]:
            seen.append(sample)
            if sample.moving and on_moving:
                on_moving()
                on_moving = None
        if sample.status in FINISHED:
            return seen
        page.wait_for_timeout(100)
    pytest.fail(f"the run did not finish in {timeout:.0f}s; seen {seen}\n{worker.log()}")


def log_in(page, live_server, screenshot) -> None:
    page.goto("/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-1")
    screenshot(page, "01-login")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{live_server.url}/")
    expect(page.get_by_text("1 worker cluster online")).to_be_visible()
    screenshot(page, "02-overview")


def back_up_now(page, vm, live_server, screenshot) -> None:
    page.get_by_role("link", name=vm.name, exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(vm.name)
    expect(page.get_by_text("No backups of this VM yet.")).to_be_visible()
    screenshot(page, "03-vm-before")
    page.get_by_label("Method").select_option("push")
    page.get_by_role("button", name="Back up now").click()
    expect(page).to_have_url(re.compile(re.escape(live_server.url) + r"/runs/\d+/$"))
    expect(page.get_by_text(f"Backup of {vm.name} queued.")).to_be_visible()


def watch_the_run_without_reloading(page, worker, screenshot) -> list[Sample]:
    """The bar must move and finish by htmx swaps alone: same URL, no navigation, and a
    marker set in the window before is still there after."""
    run_url = page.url
    page.evaluate("window.__marker = 1")
    navigations: list[str] = []
    page.on("framenavigated", lambda f: navigations.append(f.url) if f == page.main_frame else None)
    seen = watch_progress(page, worker, on_moving=lambda: screenshot(page, "04-run-progress"))
    error = page.locator("#run-progress .error").all_text_contents()
    assert seen[-1].status == "succeeded", f"{seen}\n{error}\n{worker.log()}"
    assert page.url == run_url
    assert navigations == []
    assert page.evaluate("window.__marker") == 1
    return seen


def download(page, link: str, vm, into: Path) -> str:
    """Click a download link; return the text the browser saved, checking its file name."""
    with page.expect_download() as info:
        page.get_by_role("link", name=link, exact=True).click()
    saved = into / info.value.suggested_filename
    info.value.save_as(saved)
    assert saved.name.startswith(f"{vm.name}-") and saved.name.endswith(f"-{link}")
    return saved.read_text()


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_it_backs_up_from_the_browser_and_hands_out_restore_instructions(
    vm, admin_user, qcluster, live_server, browser_page, screenshot, tmp_path
):
    page = browser_page
    problems = record_problems(page)
    log_in(page, live_server, screenshot)
    back_up_now(page, vm, live_server, screenshot)

    seen = watch_the_run_without_reloading(page, qcluster, screenshot)
    print("\nprogress samples:", *seen, sep="\n  ")
    before_done = {s.value for s in seen if s.status not in FINISHED}
    assert len(before_done) >= 2 and any(s.moving for s in seen), f"the bar stood still: {seen}"
    assert seen[-1].value == seen[-1].max > 1
    expect(page.get_by_text("Result: backup")).to_be_visible()
    screenshot(page, "05-run-done")

    page.get_by_role("heading", level=1).get_by_role("link", name=vm.name).click()
    expect(page.get_by_role("heading", name="Backups")).to_contain_text("1 ·")
    backup_links = page.locator("table.chain").get_by_role("link")
    expect(backup_links).to_have_count(1)
    screenshot(page, "06-vm-after")

    backup_links.click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(f"Backup of {vm.name}")
    expect(page.locator("table.files")).to_contain_text("vda.qcow2")
    screenshot(page, "07-backup")
    restore_md = download(page, "RESTORE.md", vm, tmp_path)
    assert f"# Restore instructions: backup of VM `{vm.name}`" in restore_md
    assert "`vda.qcow2`: disk `vda`" in restore_md
    restore_sh = download(page, "restore.sh", vm, tmp_path)
    assert restore_sh.startswith("#!/bin/sh\n")
    assert vm.name in restore_sh and "vda.qcow2" in restore_sh

    nav = page.get_by_role("navigation")
    nav.get_by_role("link", name="Runs", exact=True).click()
    expect(page.get_by_role("row").filter(has_text=vm.name)).to_contain_text("succeeded")
    screenshot(page, "08-runs")
    nav.get_by_role("link", name="Policies", exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Policies")
    screenshot(page, "09-policies")
    assert problems == []
