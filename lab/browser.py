"""Debian's chromium, headless, driven by selenium through chromium-driver (scripts/setup
installs both), for the status page's tests: a profile of its own in a temporary directory,
trusting exactly one server key, quit (chromium and its driver gone) when the block ends."""

from __future__ import annotations

import base64
import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"


def spki_sha256(cert_pem: bytes) -> str:
    """What chromium's --ignore-certificate-errors-spki-list takes: the base64 SHA-256 of the
    certificate's public key, so the browser trusts this server's key and no other."""
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def console_log(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """What the page logged (scripts refused by its policy, failed loads) since last asked."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return entries


@contextmanager
def chromium(server_cert: Path, *, width: int = 1280, height: int = 900
             ) -> Iterator[webdriver.Chrome]:
    with tempfile.TemporaryDirectory(prefix="escrow-browser-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--no-first-run",
                         f"--user-data-dir={profile}", f"--window-size={width},{height}",
                         "--ignore-certificate-errors-spki-list="
                         + spki_sha256(server_cert.read_bytes())):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(DRIVER))
        try:
            yield driver
        finally:
            driver.quit()
