"""The status page in a real browser (headless chromium, lab/browser.py) against a real escrow
with a locked manager waiting for custodians: a viewer signs in, sees it, sees it change by
itself when a custodian approves, and markup that nodes control shows as text and runs nothing.

STATUS_SCREENSHOT=FILE also saves the page as FILE (docs/images/status-page.png is made so).
"""

from __future__ import annotations

import os
import re
import sqlite3
import ssl
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver import Chrome
from selenium.webdriver.common.by import By
from selenium.webdriver.support.expected_conditions import staleness_of
from selenium.webdriver.support.wait import WebDriverWait

from lab.api import waiting_manager
from lab.browser import chromium, console_log
from lab.server import EscrowProcess
from tests.conftest import ok

# What a node (or whoever writes its database rows) puts where the page shows it. A hostname
# is refused at the API unless it is a DNS name, so this one is written into the store; a KEK
# version is any plain text of up to 32 characters, so it comes in a real heartbeat.
HOSTILE_HOSTNAME = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
HOSTILE_KEK = "<b onclick=alert(1)>x</b>"


def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def sign_in(driver: Chrome, escrow: EscrowProcess, token: str) -> None:
    """Submit ``token`` on the sign-in form; return once the answer is the page shown."""
    driver.get(escrow.url + "/status")
    form = driver.find_element(By.ID, "token")
    form.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    # Mid-navigation chromium may answer for the old form "Node with given id does not belong
    # to the document" rather than "stale element": not yet gone, look again.
    WebDriverWait(driver, 10, ignored_exceptions=(WebDriverException,)).until(
        staleness_of(form))


@pytest.fixture
def waiting(escrow: EscrowProcess) -> tuple[str, str]:
    return waiting_manager(escrow, kek_version=HOSTILE_KEK)


def test_a_viewer_sees_the_locked_manager_and_the_page_follows_an_approval_by_itself(
        escrow: EscrowProcess, waiting: tuple[str, str]) -> None:
    request_id, _ = waiting
    token = escrow.viewer("oncall")
    with chromium(escrow.data_dir / "tls" / "server.pem") as driver:
        sign_in(driver, escrow, "esv_not-a-token")
        assert "no viewer holds this token" in driver.find_element(By.CSS_SELECTOR,
                                                                   ".problem").text
        sign_in(driver, escrow, token)
        console_log(driver)  # what is logged from here on must be clean
        summary = driver.find_element(By.ID, "summary").text
        assert "1 manager locked, 1 waiting for custodians" in summary
        row = driver.find_element(By.CSS_SELECTOR, ".requests tbody tr").text
        for shown in (request_id, "manager-2", "1 more of 3", "alice", "bob"):
            assert shown in row
        states = {tr.find_element(By.CSS_SELECTOR, ".hostname").text:
                  tr.find_element(By.CSS_SELECTOR, ".state").text
                  for tr in driver.find_elements(By.CSS_SELECTOR, ".nodes tbody tr")}
        assert states == {"manager-1": "unlocked",
                          "manager-2": "locked, waiting for custodians"}
        if os.environ.get("STATUS_SCREENSHOT"):
            driver.save_screenshot(os.environ["STATUS_SCREENSHOT"])

        ok(escrow.as_custodian("bob", "approve", request_id, "--yes"))
        # No reload: the page's own script redraws it within its refresh (5 s).
        wait_until(lambda: not driver.find_elements(By.CSS_SELECTOR, ".requests"), 15,
                   "the page never redrew the approved request away")
        assert "waiting" not in driver.find_element(By.ID, "summary").text
        errors = [e for e in console_log(driver) if e["level"] == "SEVERE"]
        assert errors == []  # no script refused by the policy, no failed fetch


def test_markup_from_nodes_shows_as_text_and_runs_nothing(
        escrow: EscrowProcess, waiting: tuple[str, str]) -> None:
    _, node_id = waiting
    token = escrow.viewer("oncall")
    # Whoever can write the database can put anything there: the page must still be safe.
    with sqlite3.connect(escrow.data_dir / "escrow.db") as db:
        db.execute("UPDATE nodes SET hostname = ? WHERE node_id = ?", (HOSTILE_HOSTNAME, node_id))
    with chromium(escrow.data_dir / "tls" / "server.pem") as driver:
        sign_in(driver, escrow, token)
        hostnames = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".nodes .hostname")]
        assert HOSTILE_HOSTNAME in hostnames
        assert HOSTILE_KEK in driver.find_element(By.CSS_SELECTOR, ".nodes").text
        assert driver.find_elements(By.CSS_SELECTOR, "#fleet img, #fleet script, #fleet b") == []
        assert driver.execute_script("return window.pwned === undefined")
        time.sleep(6)  # one redraw through /status/panel, which must escape it as well
        assert driver.find_elements(By.CSS_SELECTOR, "#fleet img, #fleet script, #fleet b") == []
        assert driver.execute_script("return window.pwned === undefined")


def test_the_page_forbids_inline_script_frames_and_foreign_sources(
        escrow: EscrowProcess) -> None:
    context = ssl.create_default_context(cafile=str(escrow.ca))
    with urllib.request.urlopen(escrow.url + "/status", context=context,  # noqa: S310
                                timeout=10) as answer:
        headers = answer.headers
        page = answer.read().decode()
    policy = headers["Content-Security-Policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "frame-ancestors 'none'"):
        assert directive in policy
    assert "unsafe-inline" not in policy
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Cache-Control"] == "no-store"
    # No inline script and no event-handler attribute: the policy would refuse them anyway.
    assert re.search(r"<script(?![^>]*\bsrc=)", page) is None
    assert re.search(r"\son[a-z]+\s*=", page) is None
    assert 'name="token"' in page  # the sign-in form: nothing of the fleet without a token


def test_a_signed_in_viewer_keeps_a_strict_cookie_and_signing_out_ends_it(
        escrow: EscrowProcess, tmp_path: Path) -> None:
    token = escrow.viewer("oncall")
    with chromium(escrow.data_dir / "tls" / "server.pem") as driver:
        sign_in(driver, escrow, token)
        (cookie,) = driver.get_cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["secure"], cookie["sameSite"],
                cookie["path"]) == ("escrow_viewer", True, True, "Strict", "/status")
        button = driver.find_element(By.CSS_SELECTOR, ".who button")
        button.click()
        WebDriverWait(driver, 10).until(staleness_of(button))
        assert driver.get_cookies() == []
        assert driver.find_elements(By.ID, "token")
