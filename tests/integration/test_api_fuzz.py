"""Schema-driven fuzzing of the served OpenAPI document: no 5xx, and nothing released."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.client import EscrowClient
from escrow.core.unlockkey import UnlockKey
from lab.server import make_escrow

pytestmark = pytest.mark.slow
WATCHED = ("unseal.release", "share.export", "node.enroll", "key.deposit", "custodian.approve",
           "custodian.deny", "unseal.request")


def test_fuzzing_the_api_finds_no_server_error_and_releases_nothing(tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path)
    escrow.custodian("alice")
    escrow.start()
    try:
        cluster = escrow.cluster(1, "auto,alice")
        node = cluster.node()

        async def setup() -> None:
            async with EscrowClient(escrow.url, escrow.ca) as client:
                await client.enroll(node.cluster_id, node.node_id, node.cert_pem, node.cert.key,
                                    node.agent_key, node.hostname)
                await client.deposit(node.cluster_id, node.node_id, node.agent_key,
                                     UnlockKey(os.urandom(32)),
                                     await client.deposit_key_sha256())

        asyncio.run(setup())

        def watched() -> list[str]:
            shown = escrow.cli("audit", "show", "--json", "--limit", "100000")
            return [e["event"] for e in json.loads(shown.stdout) if e["event"] in WATCHED]

        before = watched()
        fuzz = subprocess.run(
            [str(Path(sys.executable).with_name("schemathesis")), "run",
             f"{escrow.url}/v1/openapi.json", "--tls-verify", str(escrow.ca),
             "--checks", "not_a_server_error", "--max-examples", "40"],
            cwd=escrow.base,  # its run cache goes with the test's files, not the checkout
            capture_output=True, text=True, timeout=600, check=False)
        assert fuzz.returncode == 0, fuzz.stdout[-4000:]
        assert "passed" in fuzz.stdout
        assert watched() == before
        assert "unexpected error in" not in escrow.log()  # our handlers never crashed
    finally:
        escrow.stop()
