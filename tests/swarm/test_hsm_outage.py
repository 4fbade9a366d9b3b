"""Drill: the token goes away under a serving escrow, or its module is missing at start.

The escrow answers 503 naming the token, agents back off, and everything comes back with no
restart once the token does.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from escrow.softhsm import default_module
from lab.agent import enrolled_manager
from lab.dockerd import Dockerd
from lab.server import EscrowProcess, make_escrow

pytestmark = pytest.mark.slow


def wait_health(escrow: EscrowProcess, wanted: int, timeout: float = 20.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if escrow.health()[0] == wanted:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"/healthz never answered {wanted}: {escrow.health()}")


def test_a_token_gone_while_serving_gives_503_naming_it_agents_back_off_and_all_recovers(
        dockerd: Dockerd, escrow: EscrowProcess, tmp_path: Path) -> None:
    node = enrolled_manager(dockerd, escrow, tmp_path / "node", "auto,auto,alice,bob",
                            retry_max_seconds=4)
    notify = node.start()
    try:
        notify.wait_for(lambda line: line.startswith("STATUS=unlocked"))
        tokens = escrow.data_dir / "softhsm" / "tokens"
        away = tokens.with_name("tokens.away")
        tokens.rename(away)  # the token's storage goes away under the running escrow
        try:
            status, body = escrow.health()
            assert status == 503
            assert "the token 'escrow' stopped answering" in body["message"]
            assert body["hint"].startswith("bring the token back")

            dockerd.restart()  # the manager comes back locked while the token is away
            notify.wait_for(lambda line: "escrow unreachable" in line and "retrying in" in line)
            time.sleep(6)
            assert dockerd.state() == "locked"
            delays = [float(m) for line in notify.statuses()
                      for m in re.findall(r"escrow unreachable.*retrying in (\d+) s", line)]
            assert len(delays) >= 2, notify.statuses()
            assert max(delays) <= 4, delays  # the configured cap
            assert f"the escrow at {escrow.url} cannot serve now (503): TokenUnavailable: " \
                   "the token 'escrow' stopped answering" in node.log()
        finally:
            away.rename(tokens)
        recovered = node.wait_state("active", timeout=30)
        assert escrow.health()[0] == 200
    finally:
        assert node.stop() == 0
    assert escrow.cli("audit", "verify").returncode == 0
    # No unseal request was recorded while the token was known to be away, so the outage did
    # not eat the node's rate limit.
    requests = [d for event, d in escrow.audit("unseal.request")]
    assert len(requests) <= 2, requests
    print(f"\nunlocked {recovered:.2f} s after the token came back")


def test_an_escrow_started_with_its_module_missing_serves_503_and_recovers_when_it_appears(
        tmp_path: Path) -> None:
    module = tmp_path / "hsm" / "libsofthsm2.so"
    escrow = make_escrow(tmp_path / "escrow", ESCROW_HSM_MODULE=str(module))
    escrow.start(healthy=False)
    try:
        status, body = escrow.health()
        assert status == 503
        assert f"the PKCS#11 module {module} could not be loaded" in body["message"]
        module.parent.mkdir()
        module.symlink_to(default_module())  # the module is installed, or its mount comes back
        took = wait_health(escrow, 200)
    finally:
        assert escrow.stop() == 0
    assert "the token 'escrow' answers again" in escrow.log()
    assert took < 10
