"""Browser end-to-end fixtures: Debian's Chromium driven by Playwright, a real django-q2 worker.

Browsers cannot be downloaded here, so Chromium is always launched from its Debian path
rather than through pytest-playwright's fixtures.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command

from tests.e2e.browser import CHROMIUM
from tests.helpers import wait_until

ROOT_DIR = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT_DIR / "test-artifacts" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000
STOP_BOUND = 30  # seconds an idle cluster may take to stop after SIGTERM


class Worker:
    """One `manage.py qcluster` process group; its log is kept for failure messages."""

    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc = proc
        self.log_path = log

    def log(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_running(self, timeout: float = 30) -> None:
        def running() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"qcluster exited with {self.proc.returncode}:\n{self.log()}")
            return " running." in self.log()

        wait_until(running, timeout, lambda: f"qcluster did not start:\n{self.log()}")

    def stop(self, bound: float = STOP_BOUND) -> None:
        """SIGTERM to the cluster's whole process group, as systemd's stop does; it must end
        within ``bound`` seconds (our ``qcluster`` stops its workers itself, ``backups.cluster``).
        Past the bound the group is killed and the test errors: a hang is a regression."""
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            pytest.fail(f"qcluster still running {bound:g} s after SIGTERM:\n{self.log()}")


@pytest.fixture
def qcluster(transactional_db, backup_root, tmp_path):
    """A real django-q2 cluster on the test database file (the ORM broker polls it).

    The shared cache table is created first: the cluster writes its stats there, and the
    overview reads them to say whether a worker is online.
    """
    call_command("createcachetable", verbosity=0)
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="vmbackup_site.settings",
        VMBACKUP_SQLITE_PATH=str(django_settings.DATABASES["default"]["NAME"]),
        VMBACKUP_ROOT=str(backup_root),
        Q_WORKERS="1",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "qcluster.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"],
            cwd=ROOT_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = Worker(proc, log)
    try:
        worker.wait_running()
        yield worker
    finally:
        worker.stop()


@pytest.fixture
def browser_page(live_server):
    """A Chromium page whose relative URLs go to the live server.

    Request it last: while Playwright's sync API runs, its event loop is current in this
    thread and Django refuses ORM calls from the test, so data is created before it.
    """
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (make test installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        context = browser.new_context(
            base_url=live_server.url,
            accept_downloads=True,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(TIMEOUT_MS)
        context.set_default_navigation_timeout(TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


@pytest.fixture
def screenshot():
    """Save a full-page screenshot under test-artifacts/screenshots/ (gitignored)."""

    def shoot(page, name: str) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return shoot
