"""The custodian and viewer CLI's client of the escrow API (escrow/api_client.py, on the HTTP
client the agent uses too, escrow/https.py): a real `escrow serve` reached through a TLS
reverse proxy that serves it under a path of its own, and stand-ins (lab/stand_ins.py) that
answer 503 or 429, or present a certificate of another CA, each reported as what it is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from escrow import custodian_keys
from escrow.core.tls import client_context, make_quickstart_tls, server_context
from lab.api import client, enroll, enrolled, run
from lab.commands import run_escrow
from lab.net import free_port
from lab.server import BOOT_ID, PASSPHRASE, EscrowProcess
from lab.stand_ins import UNAVAILABLE, Server, always, serving
from tests.conftest import ok

pytestmark = pytest.mark.slow

PREFIX = "/escrow"
# What a proxy passes on of a request and of its answer (the rest is per hop).
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass
class PathProxy:
    """A TLS reverse proxy on loopback serving the escrow at ``upstream`` under PREFIX, as a
    site's nginx would (`location /escrow/ { proxy_pass https://escrow:8443/; }`): the prefix
    is taken off before the escrow sees the request. Keeps the request lines it got."""

    upstream: str
    context: ssl.SSLContext
    seen: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(f"{request.method} {request.raw_path}")
        if not request.raw_path.startswith(PREFIX + "/"):
            return web.Response(status=404, text="not under the prefix")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with aiohttp.ClientSession() as session, session.request(
                request.method, URL(self.upstream + request.raw_path[len(PREFIX):],
                                    encoded=True),
                headers=headers, data=await request.read(), ssl=self.context) as answer:
            body = await answer.read()
            return web.Response(status=answer.status, body=body, headers={
                k: v for k, v in answer.headers.items() if k.lower() not in _HOP})


@contextlib.asynccontextmanager
async def path_proxy(escrow: EscrowProcess) -> AsyncIterator[tuple[PathProxy, str]]:
    """The proxy, with the escrow's own certificate, and the URL it serves the escrow at."""
    proxy = PathProxy(escrow.url, client_context(escrow.ca))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    tls = escrow.data_dir / "tls"
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port,
                       ssl_context=server_context(tls / "server.pem", tls / "server.key"))
    await site.start()
    try:
        yield proxy, f"https://localhost:{port}{PREFIX}"
    finally:
        await runner.cleanup()


def test_a_custodian_and_a_viewer_reach_an_escrow_a_proxy_serves_under_a_path(
        escrow: EscrowProcess, tmp_path: Path) -> None:
    cluster, _, _ = enrolled(escrow, 2, "auto,alice")
    locked = cluster.node()
    run(enroll(escrow, locked))

    async def asked() -> str:
        async with client(escrow) as c:
            status, _ = await c.unseal(locked.cluster_id, locked.node_id, locked.cert_pem,
                                       locked.agent_key, locked.hostname, BOOT_ID)
            return status.request_id
    request_id = run(asked())
    token = tmp_path / "viewer.token"
    token.write_text(escrow.viewer("oncall") + "\n")
    token.chmod(0o600)

    def alice(url: str, *args: str) -> str:
        return ok(run_escrow(*args, "--ca", str(escrow.ca), "--key", str(escrow.base / "alice"),
                             "--passphrase-file", str(escrow.base / "pass"),
                             env={"ESCROW_URL": url, "ESCROW_DATA_DIR": os.devnull}))

    async def scenario() -> tuple[PathProxy, str, str, str]:
        async with path_proxy(escrow) as (proxy, url):
            # Signed GETs (one with a query) and a signed POST with a body.
            approved = await asyncio.to_thread(alice, url + "/", "approve", request_id, "--yes")
            drills = await asyncio.to_thread(alice, url, "share", "drills", "--cluster",
                                             cluster.cluster_id, "--json")
            viewed = await asyncio.to_thread(lambda: ok(run_escrow(
                "status", "--url", url, "--ca", str(escrow.ca), "--token-file", str(token),
                "--json")))
        return proxy, approved, drills, viewed

    proxy, approved, drills, viewed = asyncio.run(scenario())
    assert f"approved {request_id}: state ready, approvals alice" in approved
    assert [row["custodian"] for row in json.loads(drills) if row["yours"]] == ["alice"]
    assert json.loads(viewed)["clusters"][0]["cluster_id"] == cluster.cluster_id
    # Every request went under the URL's path, and the escrow took the custodian's signature
    # over the API's path, which is what it sees once the proxy took the prefix off.
    assert proxy.seen == [
        f"GET {PREFIX}/v1/requests", f"POST {PREFIX}/v1/requests/{request_id}/approve",
        f"GET {PREFIX}/v1/shares/drills?cluster_id={cluster.cluster_id}",
        f"GET {PREFIX}/v1/status"]
    assert [d["request_id"] for e, d in escrow.audit("custodian.approve")
            if e == "custodian.approve"] == [request_id]


# -- stand-ins -------------------------------------------------------------------------------

LIMITED = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
           b"Retry-After: 17\r\nContent-Length: %d\r\n\r\n")
LIMITED_BODY = json.dumps({"error": "source_rate_limited",
                           "message": "too many requests from 127.0.0.1",
                           "hint": "slow down; agents back off by themselves"}).encode()


@pytest.fixture
def custodian(tmp_path: Path) -> tuple[Path, Path]:
    """A custodian's key file and its passphrase file (no escrow knows them: stand-ins)."""
    private, _ = custodian_keys.generate(PASSPHRASE.encode(), kdf_rounds=1)
    key, passphrase = tmp_path / "alice", tmp_path / "pass"
    key.write_bytes(private)
    key.chmod(0o600)
    passphrase.write_text(PASSPHRASE + "\n")
    return key, passphrase


def requests_at(url: str, ca: Path, custodian: tuple[Path, Path]) -> tuple[int, str]:
    """`escrow requests` at ``url``: its exit code and standard error."""
    key, passphrase = custodian
    result = run_escrow("requests", "--url", url, "--ca", str(ca), "--key", str(key),
                        "--passphrase-file", str(passphrase))
    return result.returncode, result.stderr


def at_stand_in(answer: bytes, tls: Path, ca: Path,
                custodian: tuple[Path, Path]) -> tuple[Server, str, int, str]:
    async def scenario() -> tuple[Server, str, int, str]:
        async with serving(always(answer), tls) as (server, url):
            code, err = await asyncio.to_thread(requests_at, url, ca, custodian)
        return server, url, code, err
    return asyncio.run(scenario())


def test_a_503_says_the_escrow_cannot_serve_now_and_to_retry(
        tmp_path: Path, custodian: tuple[Path, Path]) -> None:
    ca = make_quickstart_tls(tmp_path / "tls", ["127.0.0.1"])
    server, url, code, err = at_stand_in(UNAVAILABLE, tmp_path / "tls", ca, custodian)
    assert (code, server.requests) == (1, 1)
    assert err == (f"error: the escrow at {url} cannot serve now (503): unhealthy: the "
                   "database is away\nhint: retry in a moment\n")
    assert "refused" not in err


def test_a_429_says_it_was_rate_limited_and_how_long_to_wait(
        tmp_path: Path, custodian: tuple[Path, Path]) -> None:
    ca = make_quickstart_tls(tmp_path / "tls", ["127.0.0.1"])
    answer = LIMITED % len(LIMITED_BODY) + LIMITED_BODY
    server, url, code, err = at_stand_in(answer, tmp_path / "tls", ca, custodian)
    assert (code, server.requests) == (1, 1)  # a rate limit is the escrow's word: no retry
    assert err == (f"error: the escrow at {url} rate-limited this request (429 "
                   "source_rate_limited): too many requests from 127.0.0.1\n"
                   "hint: wait 17 s (its Retry-After), then retry\n")


def test_a_certificate_of_another_ca_names_the_cli_s_ca_setting(
        tmp_path: Path, custodian: tuple[Path, Path]) -> None:
    make_quickstart_tls(tmp_path / "stranger", ["127.0.0.1"])
    ours = make_quickstart_tls(tmp_path / "ours", ["127.0.0.1"])
    server, url, code, err = at_stand_in(UNAVAILABLE, tmp_path / "stranger", ours, custodian)
    assert (code, server.requests) == (1, 0)
    assert err.startswith(f"error: the escrow at {url} presented a certificate this command "
                          "does not trust: ")
    assert err.endswith("\nhint: check --ca / ESCROW_CA: the escrow's tls/ca.pem, or the CA "
                        "of its server.tls_cert\n")
