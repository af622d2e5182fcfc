"""Plain helpers shared by the browser tests (fixtures are in ``conftest.py``); the e2e
modules import from here, never from each other."""

import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

CHROMIUM = Path("/usr/bin/chromium")
FINISHED = {"succeeded", "failed", "interrupted", "cancelled", "skipped"}


def record_problems(page) -> list[str]:
    """HTTP errors and uncaught JavaScript errors, for a final check that there were none."""
    problems: list[str] = []
    page.on(
        "response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None
    )
    page.on("pageerror", lambda exc: problems.append(f"JavaScript: {exc}"))
    return problems


def log_in(page, live_server) -> None:
    page.goto("/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-1")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{live_server.url}/")
    expect(page.get_by_text("1 worker cluster online")).to_be_visible()


def watch_the_restore_without_reloading(page, worker, timeout: float = 45) -> list[str]:
    """Each distinct "status · step" the fragment shows, until the restore ends; the page
    must neither navigate nor reload, and stop polling once it has ended (HTTP 286)."""
    url = page.url
    page.evaluate("window.__marker = 1")
    navigations: list[str] = []
    page.on("framenavigated", lambda f: navigations.append(f.url) if f == page.main_frame else None)
    polls: list[str] = []
    page.on("request", lambda r: polls.append(r.url) if "/progress/" in r.url else None)
    box = page.locator("#restore-progress")
    seen: list[str] = []
    status = ""
    start = time.monotonic()
    while status not in FINISHED:
        if time.monotonic() - start > timeout:
            pytest.fail(
                f"the restore did not finish in {timeout:.0f}s; seen {seen}\n{worker.log()}"
            )
        state = " ".join(box.locator("p").first.text_content().split())
        status = state.split(" ")[0]
        if not seen or seen[-1] != state:
            seen.append(state)
        page.wait_for_timeout(100)
    error = box.locator(".error").all_text_contents()
    assert status == "succeeded", f"{seen}\n{error}\n{worker.log()}"
    assert seen[0].split(" ")[0] not in FINISHED, f"finished before the page showed it: {seen}"
    polled = len(polls)
    page.wait_for_timeout(2500)
    assert len(polls) == polled, f"still polling after the end: {polls}"
    assert page.url == url and navigations == []
    assert page.evaluate("window.__marker") == 1
    return seen
