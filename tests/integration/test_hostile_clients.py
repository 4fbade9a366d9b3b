"""Attacks by anyone who can reach the escrow, or by an enrolled node gone bad, against a real
`escrow serve` over TLS with a SoftHSM token: each test is named after the attack it stops."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from agent.errors import EscrowRejected
from agent.release import candidate_keys
from escrow.core import protocol
from escrow.core.unlockkey import UnlockKey
from lab.api import client, deposit, enroll, enrolled, run
from lab.receiver import collector, receiving
from lab.server import EscrowProcess, Node, make_escrow

pytestmark = pytest.mark.slow
BOOT_ID = "6a1f3c2e-4b5d-4e6f-8a7b-9c0d1e2f3a4b"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.fixture(scope="module")
def escrow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EscrowProcess]:
    server = make_escrow(tmp_path_factory.mktemp("hostile"), ESCROW_KEYS_MAX_VERSIONS="4",
                         ESCROW_KEYS_NODE_DEPOSIT_LIMIT="2")
    for name in ("alice", "bob"):
        server.custodian(name)
    server.start()
    yield server
    assert server.stop() == 0


def audit_rows(escrow: EscrowProcess) -> int:
    return len(escrow.audit())


async def post(escrow: EscrowProcess, path: str, body: object,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    context = ssl.create_default_context(cafile=str(escrow.ca))
    async with aiohttp.ClientSession() as session, session.request(
            "POST" if body is not None else "GET", escrow.url + path,
            data=json.dumps(body) if body is not None else None, ssl=context,
            headers={"Content-Type": "application/json", **(headers or {})}) as answer:
        return answer.status, dict(answer.headers), await answer.text()


def test_a_flood_of_unauthenticated_requests_writes_no_audit_rows(
        escrow: EscrowProcess) -> None:
    cluster, node, _ = enrolled(escrow)
    stranger = cluster.node()
    impostor = Node(node.cluster_id, node.node_id, node.cert)  # the node's id, another key
    before = audit_rows(escrow)
    bodies_before = escrow.metric("escrow_unauthenticated_refusals_total", action="unseal",
                                  reason="invalid_body")

    async def flood() -> list[int]:
        async with client(escrow) as c:
            async def one(i: int) -> int:
                who = stranger if i % 2 else impostor
                try:
                    await c.unseal(who.cluster_id, who.node_id, who.cert_pem, who.agent_key,
                                   who.hostname, BOOT_ID)
                except EscrowRejected as refused:
                    return refused.status
                return 201
            return list(await asyncio.gather(*(one(i) for i in range(150))))

    statuses = run(flood())
    garbage = [run(post(escrow, "/v1/unseal", {"cluster_id": "x"}))[0] for _ in range(20)]
    unsigned = [run(post(escrow, "/v1/requests", None))[0] for _ in range(20)]
    assert set(statuses) == {401, 403}
    assert set(garbage) == {400}
    assert set(unsigned) == {401}
    assert audit_rows(escrow) == before
    counted = (escrow.metric("escrow_unauthenticated_refusals_total", action="unseal",
                             reason="unknown_node")
               + escrow.metric("escrow_unauthenticated_refusals_total", action="unseal",
                               reason="bad_signature"))
    assert counted >= 150
    assert escrow.metric("escrow_unauthenticated_refusals_total", action="unseal",
                         reason="invalid_body") == bodies_before + 20
    summaries = [line for line in escrow.log().splitlines()
                 if "unauthenticated request(s) from 127.0.0.1" in line]
    assert 1 <= len(summaries) <= 3  # one line a minute per source, not one per refusal


def test_a_source_over_its_rate_is_told_to_retry_after(tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path, ESCROW_REQUESTS_SOURCE_RATE="1",
                         ESCROW_REQUESTS_SOURCE_BURST="5")
    escrow.start()
    try:
        answers = [run(post(escrow, "/v1/nonce", {})) for _ in range(8)]
        statuses = [status for status, _, _ in answers]
        assert statuses[:5] == [200] * 5
        assert 429 in statuses[5:]
        limited = next(a for a in answers if a[0] == 429)
        assert int(limited[1]["Retry-After"]) >= 1
        assert json.loads(limited[2])["error"] == "source_rate_limited"
        assert escrow.health()[0] == 200  # /healthz stays reachable for monitoring
        assert escrow.metric("escrow_source_limited_total", endpoint="/v1/nonce") >= 1
    finally:
        assert escrow.stop() == 0


def custodian_headers(escrow: EscrowProcess, name: str, method: str, path: str,
                      body: bytes = b"") -> tuple[dict[str, str], ec.EllipticCurvePrivateKey]:
    key = escrow.custodian_key(name)
    date, nonce = str(int(time.time())), secrets.token_hex(16)
    payload = protocol.custodian_http_payload(method, path, date, nonce, body)
    # A signature whose DER length leaves base64 padding, so a second spelling exists.
    while len(signature := key.sign(payload, ec.ECDSA(hashes.SHA256()))) % 3 == 0:
        pass
    return {"X-Escrow-Key-Id": protocol.sha256_hex(protocol.public_der(key.public_key())),
            "X-Escrow-Date": date, "X-Escrow-Nonce": nonce,
            "X-Escrow-Signature": base64.b64encode(signature).decode()}, key


def respelled(signature_b64: str) -> str:
    """The same bytes in other base64: set the unused low bits of the last character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    data = signature_b64.rstrip("=")
    pad = len(signature_b64) - len(data)
    unused_bits = {1: 0b11, 2: 0b1111}[pad]  # low bits of the last character that carry nothing
    other = data[:-1] + alphabet[alphabet.index(data[-1]) | unused_bits] + "=" * pad
    assert other != signature_b64
    assert base64.b64decode(other) == base64.b64decode(signature_b64)
    return other


def high_s_twin(signature_b64: str) -> str:
    r, s = decode_dss_signature(base64.b64decode(signature_b64))
    return base64.b64encode(encode_dss_signature(r, P256_ORDER - s)).decode()


def test_a_custodian_request_replayed_in_another_spelling_is_refused(
        escrow: EscrowProcess) -> None:
    headers, _ = custodian_headers(escrow, "alice", "GET", "/v1/requests")
    assert run(post(escrow, "/v1/requests", None, headers))[0] == 200
    for twin in (headers["X-Escrow-Signature"], respelled(headers["X-Escrow-Signature"]),
                 high_s_twin(headers["X-Escrow-Signature"])):
        status, _, text = run(post(escrow, "/v1/requests", None,
                                   {**headers, "X-Escrow-Signature": twin}))
        assert (status, json.loads(text)["error"]) == (401, "replayed")
    # The same custodian asking twice in one second is two requests (each has its nonce).
    again, _ = custodian_headers(escrow, "alice", "GET", "/v1/requests")
    assert run(post(escrow, "/v1/requests", None, again))[0] == 200


def test_a_replayed_unlock_report_cannot_complete_a_denied_request(
        escrow: EscrowProcess) -> None:
    _, node, _ = enrolled(escrow, 2, "auto,alice,bob")

    async def scenario() -> None:
        async with client(escrow) as c:
            status, _ = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                       node.agent_key, node.hostname, BOOT_ID)
            assert status.needed == 1
            denied = await asyncio.to_thread(escrow.as_custodian, "alice", "deny",
                                             status.request_id, "--reason", "not planned",
                                             "--yes")
            assert denied.returncode == 0, denied.stderr
            for _ in range(3):
                with pytest.raises(EscrowRejected) as caught:
                    await c.report(status.request_id, node.node_id, node.agent_key,
                                   "unlocked", 1)
                assert (caught.value.status, caught.value.reason) == (409, "not_pending")
            assert (await c.poll(status.request_id)).state == "denied"

    run(scenario())


def test_a_result_is_taken_once_per_version_and_only_for_what_was_released(
        escrow: EscrowProcess) -> None:
    _, node, _ = enrolled(escrow)

    async def scenario() -> None:
        async with client(escrow) as c:
            status, _ = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                       node.agent_key, node.hostname, BOOT_ID)
            with pytest.raises(EscrowRejected) as caught:
                await c.report(status.request_id, node.node_id, node.agent_key, "unlocked", 7)
            assert caught.value.reason == "not_released"
            before = await asyncio.to_thread(audit_rows, escrow)
            for _ in range(5):  # a retry or a replay records nothing more
                await c.report(status.request_id, node.node_id, node.agent_key, "unlocked", 1)
            assert await asyncio.to_thread(audit_rows, escrow) == before + 1
            with pytest.raises(EscrowRejected) as caught:
                await c.report(status.request_id, node.node_id, node.agent_key,
                               "invalid_key", 1)
            assert (caught.value.status, caught.value.reason) == (409, "already_reported")
            assert (await c.poll(status.request_id)).state == "completed"

    run(scenario())


def test_polling_never_makes_the_token_unwrap_a_share_twice(escrow: EscrowProcess) -> None:
    _, node, key = enrolled(escrow)

    async def scenario() -> None:
        async with client(escrow) as c:
            status, ephemeral = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                               node.agent_key, node.hostname, BOOT_ID)
            unwraps = await asyncio.to_thread(escrow.metric, "escrow_hsm_seconds_count")
            polled = [await c.poll(status.request_id) for _ in range(20)]
            assert await asyncio.to_thread(escrow.metric, "escrow_hsm_seconds_count") == unwraps
            assert all(p.releases == status.releases for p in polled)
            assert list(candidate_keys(polled[-1], ephemeral)) == [(1, key)]
            with pytest.raises(EscrowRejected) as caught:
                await c.poll("r-" + "x" * 20)
            assert caught.value.status == 404

    run(scenario())


def test_junk_deposits_from_a_node_cannot_push_the_real_key_out_of_reach(
        escrow: EscrowProcess) -> None:
    cluster, node, real = enrolled(escrow)
    second = cluster.node()
    run(enroll(escrow, second))
    # The node may add two new versions an hour (keys.node_deposit_limit = 2 here) ...
    assert run(deposit(escrow, node, UnlockKey(os.urandom(32)))) == 2  # junk
    with pytest.raises(EscrowRejected) as caught:
        run(deposit(escrow, node, UnlockKey(os.urandom(32))))
    assert (caught.value.status, caught.value.reason) == (429, "rate_limited")
    # ... an already escrowed key is no new version and always accepted ...
    assert run(deposit(escrow, node, real)) == 1
    # ... and the cluster keeps four versions at most (keys.max_versions = 4 here).
    assert run(deposit(escrow, second, UnlockKey(os.urandom(32)))) == 3
    assert run(deposit(escrow, second, UnlockKey(os.urandom(32)))) == 4
    with pytest.raises(EscrowRejected) as caught:
        run(deposit(escrow, second, UnlockKey(os.urandom(32))))
    assert (caught.value.status, caught.value.reason) == (409, "too_many_versions")
    events = [(e, d.get("reason")) for e, d in escrow.audit("deposit.refused")]
    assert events[-2:] == [("deposit.refused", "rate_limited"),
                           ("deposit.refused", "too_many_versions")]
    assert "alert: key.versions_full" in escrow.log()

    async def unlock_with_the_real_key() -> None:
        async with client(escrow) as c:
            status, ephemeral = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                               node.agent_key, node.hostname, BOOT_ID)
            keys = list(candidate_keys(status, ephemeral))
            assert [v for v, _ in keys] == [4, 3, 2, 1]
            for version, _ in keys[:-1]:
                await c.report(status.request_id, node.node_id, node.agent_key,
                               "invalid_key", version)
            await c.report(status.request_id, node.node_id, node.agent_key, "unlocked", 1)

    run(unlock_with_the_real_key())
    [(_, alert)] = escrow.audit("key.unconfirmed")[-1:]
    assert (alert["unlocked_with"], alert["refused_versions"]) == (1, [2, 3, 4])
    assert "alert: key.unconfirmed" in escrow.log()
    # Pruning with no retention at all keeps the version the node last unlocked with.
    pruned = escrow.cli("key", "prune", "--cluster", cluster.cluster_id, "--retention-days", "0")
    assert pruned.returncode == 0, pruned.stderr
    assert f"kept version 1 past retention: node(s) {node.node_id}" in pruned.stdout
    assert "destroyed version(s) 3, 2 of" in pruned.stdout
    listed = json.loads(escrow.cli("key", "list", "--cluster", cluster.cluster_id,
                                   "--json").stdout)
    assert [v["version"] for v in listed] == [4, 1]


def test_a_node_filling_the_retained_versions_pages_on_call_through_the_webhook(
        tmp_path: Path) -> None:
    received: list[dict[str, object]] = []

    async def scenario() -> None:
        async with receiving("/hook", collector(received)) as url:
            escrow = make_escrow(tmp_path, ESCROW_KEYS_MAX_VERSIONS="2")
            escrow.webhook("hook", url, ["alert"])
            try:
                await asyncio.to_thread(escrow.start)
                _, node, _ = await asyncio.to_thread(enrolled, escrow, 1, "auto")
                await deposit(escrow, node, UnlockKey(os.urandom(32)))
                with pytest.raises(EscrowRejected):
                    await deposit(escrow, node, UnlockKey(os.urandom(32)))
                for _ in range(50):
                    if received:
                        break
                    await asyncio.sleep(0.1)
            finally:
                await asyncio.to_thread(escrow.stop)

    run(scenario())
    [alert] = received
    assert (alert["event"], alert["alert"]) == ("alert", "key.versions_full")
    assert alert["details"] == {"retained": 2, "limit": 2}
    assert "`key.versions_full`" in str(alert["text"])


def test_a_nonce_used_before_a_restart_cannot_be_replayed_after_it(tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path)
    escrow.start()
    try:
        _, node, _ = enrolled(escrow, 1, "auto")
        status, _, text = run(post(escrow, "/v1/nonce", {}))
        assert status == 200

        async def with_that_nonce() -> None:
            async with client(escrow) as c:
                async def the_old_nonce(_: object) -> bytes:
                    return protocol.b64d(json.loads(text)["nonce"])
                with pytest.MonkeyPatch.context() as patch:
                    # Where every signed call takes its nonce, at the URL it is made at.
                    patch.setattr(c, "_nonce_at", the_old_nonce)
                    await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                   node.agent_key, node.hostname, BOOT_ID)

        run(with_that_nonce())  # used once: the used set is in the database, not in memory
        escrow.stop()
        escrow.start()
        with pytest.raises(EscrowRejected) as caught:
            run(with_that_nonce())
        assert (caught.value.status, caught.value.reason) == (401, "stale_nonce")
    finally:
        escrow.stop()
