"""Node- and custodian-controlled text against a real `escrow serve` and the real `escrow` CLI.

The attacks: an enrolled node (or anyone, for refusals that are audited) puts rich markup or
terminal escapes in its hostname or boot id, so that `escrow requests`, `escrow approve` and
`escrow audit show` fail for every custodian, or show them something else than the request
they approve; a custodian puts escapes in a deny reason; a webhook receiver redirects the
notice (and the node's details) elsewhere. Each test fails without the controls of
escrow/core/plaintext.py, the request models' validators and escrow/notifications/.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import TypeAdapter

from escrow.audit import AuditEvent
from escrow.core import protocol
from escrow.core.errors import EscrowError
from escrow.core.states import NodeStatus
from escrow.core.tls import client_context
from escrow.store import NodeRecord
from escrow.store.sqlite import SqliteStore
from lab.api import client, enrolled, run
from lab.receiver import receiving
from lab.server import EscrowProcess, Node, make_escrow, swarm_id

pytestmark = pytest.mark.slow
ESC = "\x1b"
RLO = "\u202e"
# What a hostile node or custodian writes: markup that breaks rich, a line erase that rewrites
# what the custodian reads, a title-setting OSC, and a right-to-left override.
HOSTILE = f"[/] [bold red]approved[/] {ESC}[2K\rmanager-2 {ESC}]0;pwned\x07 {RLO}1-rgm"
BOOT = "0b6f5a3e-8f43-4c1e-9a55-1f3c1f9d2a10"


def no_raw_controls(text: str) -> bool:
    return ESC not in text and RLO not in text and "\r" not in text and "\x07" not in text


@pytest.fixture(scope="module")
def escrow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EscrowProcess]:
    server = make_escrow(tmp_path_factory.mktemp("untrusted"))
    for name in ("alice", "bob"):
        server.custodian(name)
    server.start()
    yield server
    assert server.stop() == 0


def _session(escrow: EscrowProcess) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(escrow.ca)))


async def _nonce(session: aiohttp.ClientSession, escrow: EscrowProcess) -> bytes:
    async with session.post(escrow.url + "/v1/nonce") as answer:
        return protocol.b64d((await answer.json())["nonce"])


def _cert_der(node: Node) -> bytes:
    return x509.load_pem_x509_certificate(node.cert.pem).public_bytes(serialization.Encoding.DER)


async def _raw_unseal(escrow: EscrowProcess, node: Node, hostname: str,
                      boot_id: str) -> tuple[int, dict[str, Any]]:
    """An unseal request built by hand, as a hostile agent would, correctly signed."""
    async with _session(escrow) as session:
        nonce = await _nonce(session, escrow)
        ephemeral = X25519PrivateKey.generate().public_key().public_bytes_raw()
        payload = protocol.unseal_payload(node.cluster_id, node.node_id, _cert_der(node),
                                          ephemeral, hostname, boot_id, "", nonce)
        body = {"cluster_id": node.cluster_id, "node_id": node.node_id,
                "node_cert": node.cert_pem, "ephemeral_public_key": protocol.b64e(ephemeral),
                "hostname": hostname, "boot_id": boot_id, "kek_version": "",
                "nonce": protocol.b64e(nonce), "signature": protocol.sign(node.agent_key, payload)}
        async with session.post(escrow.url + "/v1/unseal", json=body) as answer:
            return answer.status, await answer.json()


async def _raw_enroll(escrow: EscrowProcess, node: Node, hostname: str
                      ) -> tuple[int, dict[str, Any]]:
    async with _session(escrow) as session:
        nonce = await _nonce(session, escrow)
        agent_der = protocol.public_der(node.agent_key.public_key())
        payload = protocol.enroll_payload(node.cluster_id, node.node_id, _cert_der(node),
                                          agent_der, hostname, nonce)
        body = {"cluster_id": node.cluster_id, "node_id": node.node_id,
                "node_cert": node.cert_pem,
                "agent_public_key": protocol.public_pem(node.agent_key.public_key()),
                "hostname": hostname, "nonce": protocol.b64e(nonce),
                "swarm_signature": protocol.sign(node.cert.key, payload),
                "agent_signature": protocol.sign(node.agent_key, payload)}
        async with session.post(escrow.url + "/v1/enroll", json=body) as answer:
            return answer.status, await answer.json()


def _pending(escrow: EscrowProcess, node: Node, hostname: str = "manager-1") -> str:
    """A pending request of `node` (it needs a custodian), made by the agent's own client."""
    async def scenario() -> str:
        async with client(escrow) as c:
            status, _ = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                       node.agent_key, hostname, BOOT)
            assert status.state == "pending"
            return status.request_id
    return run(scenario())


@pytest.mark.parametrize(("field", "value"), [
    ("hostname", "[/]"), ("hostname", "[bold red]approved[/]"),
    ("hostname", f"manager-1{ESC}[2K\rmanager-2"), ("hostname", f"mgr{RLO}1"),
    ("hostname", "<!channel>"), ("hostname", "manager_1"), ("boot_id", "[/x]"),
    ("boot_id", f"{ESC}[2K")])
def test_markup_in_hostname_is_refused_at_the_door(escrow: EscrowProcess, field: str,
                                                   value: str) -> None:
    _, node, _ = enrolled(escrow, 2, "auto,alice,bob")
    fields = {"hostname": "manager-1", "boot_id": BOOT, field: value}
    status, answer = run(_raw_unseal(escrow, node, fields["hostname"], fields["boot_id"]))
    assert (status, answer["error"]) == (400, "invalid_body")
    assert f"{field}:" in answer["message"]
    if field == "hostname":
        status, answer = run(_raw_enroll(escrow, escrow.cluster(1, "alice").node(), value))
        assert (status, answer["error"]) == (400, "invalid_body")
        assert "hostname:" in answer["message"]
    listed = escrow.as_custodian("alice", "requests")
    assert listed.returncode == 0, listed.stderr
    assert node.node_id not in listed.stdout  # nothing was recorded for the custodians
    assert all(value not in json.dumps(details) for _, details in escrow.audit(last=5))


def test_a_dns_hostname_and_the_kernels_boot_id_are_accepted(escrow: EscrowProcess) -> None:
    _, node, _ = enrolled(escrow, 2, "auto,alice,bob")
    status, answer = run(_raw_unseal(escrow, node, "Manager-1.swarm.example", BOOT))
    assert status == 201, answer
    listed = escrow.as_custodian("alice", "requests", "--json")
    mine = [r for r in json.loads(listed.stdout) if r["request_id"] == answer["request_id"]]
    assert (mine[0]["hostname"], mine[0]["boot_id"]) == ("Manager-1.swarm.example", BOOT)


def test_markup_in_a_stored_hostname_is_shown_literally_by_requests_and_approve(
        escrow: EscrowProcess) -> None:
    """A request stored before hostnames were checked (or by an escrow that did not check)
    must not break, or rewrite, what custodians read."""
    _, node, _ = enrolled(escrow, 2, "auto,alice,bob")
    request_id = _pending(escrow, node)
    with sqlite3.connect(escrow.data_dir / "escrow.db") as db:
        db.execute("UPDATE requests SET hostname = ?, boot_id = ? WHERE request_id = ?",
                   (HOSTILE, "[/x]" + ESC + "[1A", request_id))
    db.close()
    listed = escrow.as_custodian("alice", "requests")
    assert listed.returncode == 0, listed.stderr
    assert request_id in listed.stdout
    assert "[/]" in listed.stdout
    assert "[bold red]approved[/]" in listed.stdout
    assert "\\x1b[2K\\x0dmanager-2" in listed.stdout
    assert "\\u202e" in listed.stdout
    assert no_raw_controls(listed.stdout)
    approved = escrow.as_custodian("alice", "approve", request_id, "--yes")
    assert approved.returncode == 0, approved.stderr
    assert "[bold red]approved[/]" in approved.stdout
    assert "[/x]\\x1b[1A" in approved.stdout  # the boot id, as stored
    assert no_raw_controls(approved.stdout)
    assert f"approved {request_id}" in approved.stdout


def test_terminal_escapes_in_a_deny_reason_do_not_reach_the_terminal(
        escrow: EscrowProcess) -> None:
    _, node, _ = enrolled(escrow, 2, "auto,alice,bob")
    request_id = _pending(escrow, node)
    reason = f"not planned{ESC}[2K\r{ESC}[1Aapproved by everyone"
    denied = escrow.as_custodian("bob", "deny", request_id, "--reason", reason, "--yes")
    assert denied.returncode == 1
    assert "--reason must be plain text" in denied.stderr
    assert no_raw_controls(denied.stderr)

    # A custodian's own client that skips the CLI's check meets the escrow's.
    custodian = escrow.api_as("bob")
    pending = custodian.call("GET", "/v1/requests", TypeAdapter(list[protocol.PendingRequest]))
    view = next(p for p in pending if p.request_id == request_id)
    body = protocol.DenyRequest.model_construct(
        reason=reason, signature=protocol.sign(
            custodian.key, protocol.approval_payload("deny", view, reason)))
    with pytest.raises(EscrowError) as caught:
        custodian.call("POST", f"/v1/requests/{request_id}/deny", protocol.DecisionResponse,
                       body)
    assert getattr(caught.value, "status", None) == 400
    assert "reason:" in caught.value.message
    assert no_raw_controls(caught.value.diagnostics())

    async def still_pending() -> protocol.RequestStatus:
        async with client(escrow) as c:
            return await c.poll(request_id)
    after = run(still_pending())
    assert (after.state, after.denial_reason) == ("pending", "")
    assert not [d for e, d in escrow.audit(last=5) if e == "custodian.deny"]


def test_markup_in_an_audit_record_is_shown_literally(tmp_path: Path) -> None:
    home = make_escrow(tmp_path)
    store = SqliteStore.open(home.data_dir / "escrow.db", lambda: "2026-11-01T12:00:00Z")
    try:
        # What an unauthenticated request's refusal recorded before requests were checked.
        store.append_audit(AuditEvent("unseal.refused", f"node:{HOSTILE}", "", {
            "reason": "unknown_node", "hostname": HOSTILE, "message": "[/x]"}))
        store.append_audit(AuditEvent("custodian.deny", "custodian:bob", "", {
            "reason": f"not planned{ESC}[2K\rapproved"}))
    finally:
        store.close()
    shown = home.cli("audit", "show")
    assert shown.returncode == 0, shown.stderr
    assert "[/x]" in shown.stdout
    assert "[bold red]approved[/]" in shown.stdout
    assert "node:[/] " in shown.stdout
    assert no_raw_controls(shown.stdout)
    assert home.cli("audit", "verify").returncode == 0


def test_markup_in_a_stored_node_hostname_is_shown_literally_by_node_list(
        tmp_path: Path) -> None:
    home = make_escrow(tmp_path)
    home.custodian("alice")
    cluster = home.cluster(1, "alice")
    store = SqliteStore.open(home.data_dir / "escrow.db", lambda: "2026-11-01T12:00:00Z")
    try:
        node_id = swarm_id()
        store.enroll_node(NodeRecord(cluster.cluster_id, node_id, "pem", HOSTILE,
                                     "2026-11-01T12:00:00Z", NodeStatus.ACTIVE),
                          AuditEvent("node.enroll", f"node:{node_id}", cluster.cluster_id,
                                     {"node_id": node_id, "hostname": HOSTILE}))
    finally:
        store.close()
    listed = home.cli("node", "list")
    assert listed.returncode == 0, listed.stderr
    assert "[bold red]approved[/]" in listed.stdout
    assert no_raw_controls(listed.stdout)
    revoked = home.cli("node", "revoke", "--cluster", cluster.cluster_id, node_id,
                       "--reason", f"gone{ESC}[2K")
    assert revoked.returncode == 1
    assert "--reason must be plain text" in revoked.stderr


def test_webhook_does_not_follow_redirects(tmp_path: Path) -> None:
    hooked: list[dict[str, Any]] = []
    elsewhere: list[bytes] = []
    log: list[str] = []

    async def scenario() -> None:
        async def collect(request: web.Request) -> web.Response:
            elsewhere.append(await request.read())
            return web.Response(text="ok")

        async with receiving("/collect", collect) as other:
            async def redirecting(request: web.Request) -> web.Response:
                hooked.append(await request.json())
                raise web.HTTPTemporaryRedirect(other)

            async with receiving("/hook", redirecting) as url:
                server = make_escrow(tmp_path)
                server.webhook("hook", url, ["requested"])
                try:
                    await asyncio.to_thread(server.custodian, "alice")
                    await asyncio.to_thread(server.start)
                    _, node, _ = await asyncio.to_thread(enrolled, server, 2, "auto,alice")
                    async with client(server) as c:
                        status, _ = await c.unseal(node.cluster_id, node.node_id,
                                                   node.cert_pem, node.agent_key,
                                                   "hooked-host", BOOT)
                        assert status.state == "pending"
                    deadline = time.monotonic() + 10
                    while not (hooked and "redirect" in server.log()) and (
                            time.monotonic() < deadline):
                        await asyncio.sleep(0.1)
                    # Time for a followed redirect to arrive, were it followed.
                    await asyncio.sleep(0.5)
                finally:
                    await asyncio.to_thread(server.stop)
                    log.append(server.log())

    run(scenario())
    assert elsewhere == []  # the redirect's target got nothing: not the body, not the node's name
    assert len(hooked) == 1
    assert "answered 307, a redirect, which is not followed" in log[0]
    assert hooked[0]["hostname"] == "hooked-host"
    assert hooked[0]["text"].startswith("Swarm manager `hooked-host` is locked")
    assert sorted(hooked[0]) == ["cluster_id", "event", "expires_at", "hostname", "id",
                                 "needed", "node_id", "request_id", "text", "time"]
