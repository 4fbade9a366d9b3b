"""The escrow API over real TLS on loopback, with a real `escrow serve` and SoftHSM token."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from agent.errors import EscrowRejected
from agent.release import candidate_keys
from escrow.core import protocol
from escrow.core.unlockkey import UnlockKey
from lab.api import client, deposit, enroll, enrolled, run, unseal
from lab.receiver import collector, receiving
from lab.server import BOOT_ID, Cluster, EscrowProcess, Node, make_escrow

pytestmark = pytest.mark.slow


def boot(n: int) -> str:
    """The n-th boot id of a node, as the kernel writes it."""
    return BOOT_ID[:-1] + str(n)


BOOT = boot(0)


@pytest.fixture(scope="module")
def escrow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EscrowProcess]:
    server = make_escrow(tmp_path_factory.mktemp("server"), ESCROW_REQUESTS_RATE_LIMIT="4")
    for name in ("alice", "bob", "carol"):
        server.custodian(name)
    server.start()
    yield server
    assert server.stop() == 0


def assert_refused(escrow: EscrowProcess, event: str, reason: str) -> None:
    """The newest audit record is the refusal of `event` for `reason`."""
    [(newest, details)] = escrow.audit(last=1)
    assert (newest, details["reason"]) == (event, reason)


def test_enrolled_node_gets_auto_shares_at_once_and_rebuilds_the_key(
        escrow: EscrowProcess) -> None:
    _, node, key = enrolled(escrow)

    async def scenario() -> None:
        async with client(escrow) as c:
            status, ephemeral = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                               node.agent_key, node.hostname, boot(1), "10")
            assert (status.state, status.needed, len(status.releases)) == ("ready", 0, 2)
            assert all(r.holder == "auto" for r in status.releases)
            (version, rebuilt), = candidate_keys(status, ephemeral)
            assert (version, rebuilt) == (1, key)
            await c.report(status.request_id, node.node_id, node.agent_key, "unlocked", 1)
            assert (await c.poll(status.request_id)).state == "completed"

    run(scenario())
    events = [(event, details.get("request_id")) for event, details in escrow.audit(last=3)]
    assert [e for e, _ in events] == ["unseal.request", "unseal.release", "unseal.result"]
    assert len({r for _, r in events}) == 1


def test_deposit_over_the_api_is_idempotent_and_adds_versions(escrow: EscrowProcess) -> None:
    _, node, key = enrolled(escrow)
    assert run(deposit(escrow, node, key)) == 1
    newer = UnlockKey(os.urandom(32))
    assert run(deposit(escrow, node, newer)) == 2

    async def scenario() -> None:
        async with client(escrow) as c:
            status, ephemeral = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                               node.agent_key, node.hostname, boot(1))
            assert [v for v, _ in candidate_keys(status, ephemeral)] == [2, 1]
            assert list(candidate_keys(status, ephemeral))[1][1] == key
            assert [r.version for r in status.releases] == [2, 2, 1, 1]

    run(scenario())


def test_approval_is_needed_shown_to_custodians_and_releases_their_share(
        escrow: EscrowProcess) -> None:
    _, node, key = enrolled(escrow, 2, "auto,alice,bob")

    async def scenario() -> None:
        async with client(escrow) as c:
            status, ephemeral = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                               node.agent_key, "mgr-approval", boot(2))
            assert (status.state, status.needed) == ("pending", 1)
            assert list(candidate_keys(status, ephemeral)) == []
            listed = await asyncio.to_thread(escrow.as_custodian, "bob", "requests", "--json")
            assert listed.returncode == 0, listed.stderr
            mine = [r for r in json.loads(listed.stdout) if r["request_id"] == status.request_id]
            assert mine[0]["hostname"] == "mgr-approval"
            assert mine[0]["needed"] == 1
            table = await asyncio.to_thread(escrow.as_custodian, "bob", "requests")
            assert status.request_id in table.stdout
            poll = asyncio.create_task(c.poll(status.request_id, wait=30))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            approved = await asyncio.to_thread(escrow.as_custodian, "bob", "approve",
                                               status.request_id, "--yes")
            assert approved.returncode == 0, approved.stderr
            assert "approved" in approved.stdout
            assert "mgr-approval" in approved.stdout
            ready = await poll
            assert time.monotonic() - started < 10  # the long poll woke, it did not time out
            assert (ready.state, ready.approvals) == ("ready", ["bob"])
            assert list(candidate_keys(ready, ephemeral)) == [(1, key)]

    run(scenario())
    approval = next(d for e, d in escrow.audit(last=3) if e == "custodian.approve")
    assert approval["signature"]


def test_a_denied_request_releases_nothing_more(escrow: EscrowProcess) -> None:
    _, node, _ = enrolled(escrow, 2, "auto,alice,bob")

    async def scenario() -> None:
        async with client(escrow) as c:
            status, _ = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                       node.agent_key, node.hostname, boot(3))
            denied = await asyncio.to_thread(escrow.as_custodian, "alice", "deny",
                                             status.request_id, "--reason", "not planned",
                                             "--yes")
            assert denied.returncode == 0, denied.stderr
            after = await c.poll(status.request_id)
            assert (after.state, after.releases) == ("denied", [])
            assert "not planned" in after.denial_reason
            again = await asyncio.to_thread(escrow.as_custodian, "bob", "approve",
                                            status.request_id, "--yes")
            assert again.returncode == 1
            assert "is not among the pending requests" in again.stderr

    run(scenario())


def test_a_custodian_without_a_slot_cannot_see_approve_or_export(escrow: EscrowProcess) -> None:
    cluster, node, _ = enrolled(escrow, 2, "auto,alice,bob")

    async def scenario() -> None:
        async with client(escrow) as c:
            status, _ = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                       node.agent_key, node.hostname, boot(4))
            # What the node sent (hostname, source address, boot id) is not carol's to see.
            listed = await asyncio.to_thread(escrow.as_custodian, "carol", "requests", "--json")
            assert listed.returncode == 0, listed.stderr
            assert json.loads(listed.stdout) == []
            refused = await asyncio.to_thread(escrow.as_custodian, "carol", "approve",
                                              status.request_id, "--yes")
            assert refused.returncode == 1
            assert "where you hold a share" in refused.stderr
            assert (await c.poll(status.request_id)).approvals == []

    run(scenario())
    exported = escrow.as_custodian("carol", "share", "export", "--cluster", cluster.cluster_id)
    assert exported.returncode == 1
    assert "holds no share" in exported.stderr


def test_a_custodian_exports_their_own_share_for_paper(escrow: EscrowProcess,
                                                       tmp_path: Path) -> None:
    cluster, _, key = enrolled(escrow, 2, "auto,alice,bob")
    alice = escrow.as_custodian("alice", "share", "export", "--cluster", cluster.cluster_id)
    bob = escrow.as_custodian("bob", "share", "export", "--cluster", cluster.cluster_id)
    assert alice.returncode == 0, alice.stderr
    assert bob.returncode == 0, bob.stderr
    recovered = escrow.cli("recover", stdin=alice.stdout + bob.stdout)
    assert recovered.stdout.strip() == key.swmkey()


@pytest.mark.parametrize("case", ["wrong_root_ca", "worker", "expired", "other_node",
                                  "other_cluster", "unknown_node", "revoked", "bad_signature",
                                  "replayed_nonce"])
def test_unseal_rejections_have_a_reason_an_audit_record_and_release_nothing(
        escrow: EscrowProcess, case: str) -> None:
    cluster, node, _ = enrolled(escrow)
    other = escrow.cluster(1, "alice")
    expected = {"wrong_root_ca": (403, "wrong_root_ca"), "worker": (403, "not_a_manager"),
                "expired": (403, "cert_expired"), "other_node": (403, "wrong_node"),
                "other_cluster": (403, "wrong_root_ca"), "unknown_node": (403, "unknown_node"),
                "revoked": (403, "revoked"), "bad_signature": (401, "bad_signature"),
                "replayed_nonce": (401, "stale_nonce")}[case]
    cert_pem, agent_key, node_id = node.cert_pem, node.agent_key, node.node_id
    if case == "wrong_root_ca":
        cert_pem = Cluster(cluster.cluster_id, other.ca).node().cert_pem
    elif case == "worker":
        cert_pem = Cluster(cluster.cluster_id, cluster.ca).node("swarm-worker").cert_pem
    elif case == "expired":
        from lab.certs import make_node_cert  # noqa: PLC0415
        cert_pem = make_node_cert(cluster.ca, node.node_id, cluster.cluster_id,
                                  not_before=datetime.now(UTC) - timedelta(days=100),
                                  days=90).pem.decode()
    elif case == "other_node":
        cert_pem = cluster.node().cert_pem
    elif case == "other_cluster":
        cert_pem = other.node().cert_pem
    elif case == "unknown_node":
        node_id = cluster.node().node_id
    elif case == "revoked":
        result = escrow.cli("node", "revoke", "--cluster", cluster.cluster_id, node.node_id)
        assert result.returncode == 0, result.stderr
    elif case == "bad_signature":
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
        agent_key = ec.generate_private_key(ec.SECP256R1())

    async def attempt() -> None:
        async with client(escrow) as c:
            if case == "replayed_nonce":
                used = await c.nonce()

                async def same_nonce(_: object) -> bytes:
                    return used

                with pytest.MonkeyPatch.context() as patch:
                    # Where every signed call takes its nonce, at the URL it is made at.
                    patch.setattr(c, "_nonce_at", same_nonce)
                    await c.unseal(cluster.cluster_id, node_id, cert_pem, agent_key, "h", BOOT)
                    await c.unseal(cluster.cluster_id, node_id, cert_pem, agent_key, "h", BOOT)
                return
            await c.unseal(cluster.cluster_id, node_id, cert_pem, agent_key, "h", BOOT)

    counted_before = refusals_counted(escrow, "unseal", expected[1])
    with pytest.raises(EscrowRejected) as caught:
        run(attempt())
    assert (caught.value.status, caught.value.reason) == expected
    if case in UNIDENTIFIED:
        # Anyone can send these: counted, never written (the disk is not theirs to fill).
        assert escrow.audit(last=1)[0][0] != "unseal.refused"
        assert refusals_counted(escrow, "unseal", expected[1]) == counted_before + 1
    else:
        assert_refused(escrow, "unseal.refused", expected[1])


# Refusals before the caller proved who it is (a signature by an enrolled key over a fresh
# nonce): the rest come from an identified node and are audited.
UNIDENTIFIED = {"unknown_node", "bad_signature", "replayed_nonce"}


def refusals_counted(escrow: EscrowProcess, action: str, reason: str) -> float:
    return escrow.metric("escrow_unauthenticated_refusals_total", action=action, reason=reason)


def test_requests_are_rate_limited_per_node_and_one_stays_live(escrow: EscrowProcess) -> None:
    _, node, _ = enrolled(escrow, 2, "auto,alice,bob")

    async def scenario() -> None:
        async with client(escrow) as c:
            ids = []
            for _ in range(4):
                status, _ = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                           node.agent_key, node.hostname, BOOT)
                ids.append(status.request_id)
            states = [(await c.poll(i)).state for i in ids]
            assert states == ["superseded", "superseded", "superseded", "pending"]
            with pytest.raises(EscrowRejected) as caught:
                await c.unseal(node.cluster_id, node.node_id, node.cert_pem, node.agent_key,
                               node.hostname, BOOT)
            assert (caught.value.status, caught.value.reason) == (429, "rate_limited")

    run(scenario())


async def raw_post(escrow: EscrowProcess, path: str, data: bytes) -> tuple[int, dict[str, str]]:
    context = ssl.create_default_context(cafile=str(escrow.ca))
    async with aiohttp.ClientSession() as session, session.post(
            escrow.url + path, data=data, ssl=context) as response:
        return response.status, await response.json()


@pytest.mark.parametrize(("data", "status", "code"), [
    (b"{not json", 400, "malformed_json"),
    (b"[]", 400, "invalid_body"),
    (json.dumps({"cluster_id": "a" * 25, "unexpected": 1}).encode(), 400, "invalid_body"),
    (b"{" + b'"x": "' + b"A" * 70000 + b'"}', 413, "request_entity_too_large"),
])
def test_malformed_unknown_and_oversize_bodies_are_refused(escrow: EscrowProcess, data: bytes,
                                                           status: int, code: str) -> None:
    answer = run(raw_post(escrow, "/v1/unseal", data))
    assert (answer[0], answer[1]["error"]) == (status, code)
    if code == "invalid_body" and b"unexpected" in data:
        assert "unexpected: Extra inputs are not permitted" in answer[1]["message"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_only_tls_12_or_newer_is_served(escrow: EscrowProcess) -> None:
    import socket  # noqa: PLC0415

    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(str(escrow.ca))
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", escrow.port), timeout=5) as raw, \
            pytest.raises(ssl.SSLError):
        old.wrap_socket(raw, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", escrow.port), timeout=5) as plain:
        plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b'"status"' not in plain.recv(4096)


def test_health_metrics_and_openapi_are_served(escrow: EscrowProcess) -> None:
    _, node, _ = enrolled(escrow)  # one unseal of its own, whatever ran before
    assert run(unseal(escrow, node))

    async def fetch() -> tuple[str, dict[str, object]]:
        context = ssl.create_default_context(cafile=str(escrow.ca))
        async with aiohttp.ClientSession() as session:
            async with session.get(escrow.url + "/metrics", ssl=context) as metrics:
                text = await metrics.text()
            async with session.get(escrow.url + "/v1/openapi.json", ssl=context) as spec:
                return text, await spec.json()

    metrics, spec = run(fetch())
    assert 'escrow_requests_total{endpoint="/v1/unseal",outcome="201"}' in metrics
    assert "escrow_shares_released_total" in metrics
    assert "escrow_pending_approvals" in metrics
    assert "escrow_hsm_seconds_bucket" in metrics
    assert spec["openapi"] == "3.1.0"
    assert "/v1/unseal/{request_id}" in spec["paths"]  # type: ignore[operator]


def test_expired_requests_release_nothing(tmp_path: Path) -> None:
    server = make_escrow(tmp_path, ESCROW_REQUESTS_TTL_SECONDS="1")
    server.custodian("alice")
    server.start()
    try:
        _, node, _ = enrolled(server, 1, "auto,alice")

        async def scenario() -> None:
            async with client(server) as c:
                status, _ = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                           node.agent_key, node.hostname, BOOT)
                assert status.state == "ready"
                await asyncio.sleep(1.5)
                expired = await c.poll(status.request_id)
                assert (expired.state, expired.releases) == ("expired", [])

        run(scenario())
    finally:
        assert server.stop() == 0


def test_webhook_gets_the_pending_request_and_its_failure_never_blocks(tmp_path: Path) -> None:
    received: list[dict[str, object]] = []

    async def scenario() -> None:
        async with receiving("/hook", collector(received)) as url:
            servers = [make_escrow(tmp_path / "ok"), make_escrow(tmp_path / "broken")]
            servers[0].webhook("ok", url, ["requested"])
            servers[1].webhook("broken", "http://127.0.0.1:9/nothing-listens", ["requested"])
            try:
                for server in servers:
                    await asyncio.to_thread(server.custodian, "alice")
                    await asyncio.to_thread(server.start)
                    _, node, _ = await asyncio.to_thread(enrolled, server, 2, "auto,alice")
                    async with client(server) as c:
                        status, _ = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                                   node.agent_key, "hooked-host", BOOT)
                        assert status.state == "pending"
                for _ in range(50):
                    if received:
                        break
                    await asyncio.sleep(0.1)
            finally:
                for server in servers:
                    await asyncio.to_thread(server.stop)

    run(scenario())
    assert len(received) == 1
    assert received[0]["hostname"] == "hooked-host"
    assert received[0]["needed"] == 1
    assert "escrow approve r-" in str(received[0]["text"])


def test_sigterm_answers_long_polls_and_exits_cleanly(tmp_path: Path) -> None:
    server = make_escrow(tmp_path)
    server.custodian("alice")
    server.start()
    try:
        _, node, _ = enrolled(server, 2, "auto,alice")

        async def scenario() -> None:
            async with client(server) as c:
                status, _ = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                           node.agent_key, node.hostname, BOOT)
                poll = asyncio.create_task(c.poll(status.request_id, wait=50))
                await asyncio.sleep(0.5)
                started = time.monotonic()
                code = await asyncio.to_thread(server.stop)
                answered = await poll
                assert code == 0
                assert answered.state == "pending"
                assert time.monotonic() - started < 15

        run(scenario())
    finally:
        server.stop()


@pytest.mark.parametrize("case", ["wrong_root_ca", "bad_swarm_signature", "bad_agent_signature",
                                  "garbage_nonce", "revoked", "unknown_cluster"])
def test_enrollment_rejections_are_specific_and_audited_once_identified(escrow: EscrowProcess,
                                                                       case: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    cluster = escrow.cluster(1, "alice")
    node = cluster.node()
    cluster_id, cert_pem, swarm_key, agent_key = (node.cluster_id, node.cert_pem, node.cert.key,
                                                  node.agent_key)
    expected = {"wrong_root_ca": (403, "wrong_root_ca"),
                "bad_swarm_signature": (401, "bad_signature"),
                "bad_agent_signature": (401, "bad_signature"),
                "garbage_nonce": (401, "stale_nonce"), "revoked": (403, "revoked"),
                "unknown_cluster": (404, "NotFound")}[case]
    if case == "wrong_root_ca":
        cert_pem = escrow.cluster(1, "alice").node().cert_pem
    elif case == "bad_swarm_signature":
        swarm_key = ec.generate_private_key(ec.SECP256R1())
    elif case == "revoked":
        run(enroll(escrow, node))
        assert escrow.cli("node", "revoke", "--cluster", cluster_id, node.node_id,
                          "--reason", "test").returncode == 0
    elif case == "unknown_cluster":
        cluster_id = "unknown000000000000000000"

    async def attempt() -> None:
        async with client(escrow) as c:
            if case == "garbage_nonce":
                async def garbage(_: object) -> bytes:
                    return os.urandom(32)
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(c, "_nonce_at", garbage)
                    await c.enroll(cluster_id, node.node_id, cert_pem, swarm_key, agent_key, "h")
                return
            if case == "bad_agent_signature":
                real_sign = protocol.sign

                def wrong_agent(key: ec.EllipticCurvePrivateKey, payload: bytes) -> str:
                    return real_sign(ec.generate_private_key(ec.SECP256R1())
                                     if key is agent_key else key, payload)
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(protocol, "sign", wrong_agent)
                    await c.enroll(cluster_id, node.node_id, cert_pem, swarm_key, agent_key, "h")
                return
            await c.enroll(cluster_id, node.node_id, cert_pem, swarm_key, agent_key, "h")

    counted_before = refusals_counted(escrow, "enroll", expected[1])
    with pytest.raises(EscrowRejected) as caught:
        run(attempt())
    assert (caught.value.status, caught.value.reason) == expected
    if case == "revoked":  # the swarm's CA and both keys vouch for who asks: audited
        assert_refused(escrow, "enroll.refused", expected[1])
    else:  # nothing proves who sent these: counted, never written
        assert escrow.audit(last=1)[0][0] != "enroll.refused"
        assert refusals_counted(escrow, "enroll", expected[1]) == counted_before + 1


def test_deposits_from_unknown_or_forged_agents_store_nothing_not_even_a_row(
        escrow: EscrowProcess) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    cluster, node, _ = enrolled(escrow)
    stranger = cluster.node()
    forged = Node(node.cluster_id, node.node_id, node.cert,
                  ec.generate_private_key(ec.SECP256R1()))
    for sender, reason in ((stranger, "unknown_node"), (forged, "bad_signature")):
        with pytest.raises(EscrowRejected) as caught:
            run(deposit(escrow, sender, UnlockKey(os.urandom(32))))
        assert caught.value.reason == reason
        assert escrow.audit(last=1)[0][0] != "deposit.refused"
        assert refusals_counted(escrow, "deposit", reason) >= 1
    listed = escrow.cli("key", "list", "--cluster", cluster.cluster_id, "--json")
    assert [v["version"] for v in json.loads(listed.stdout)] == [1]


def test_revoking_a_node_ends_its_pending_request_and_releases_nothing_more(
        escrow: EscrowProcess) -> None:
    cluster, node, _ = enrolled(escrow, 2, "auto,alice,bob")

    async def scenario() -> None:
        async with client(escrow) as c:
            status, _ = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                       node.agent_key, node.hostname, boot(5))
            assert (status.state, status.needed) == ("pending", 1)
            revoked = await asyncio.to_thread(escrow.cli, "node", "revoke", "--cluster",
                                              cluster.cluster_id, node.node_id, "--reason",
                                              "disk missing")
            assert revoked.returncode == 0, revoked.stderr
            ended = await c.poll(status.request_id)
            assert (ended.state, ended.releases) == ("revoked", [])
            approved = await asyncio.to_thread(escrow.as_custodian, "alice", "approve",
                                               status.request_id, "--yes")
            assert approved.returncode == 1

    run(scenario())
    assert escrow.audit("node.revoke")
