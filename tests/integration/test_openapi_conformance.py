"""The OpenAPI document and a real `escrow serve` agree on which statuses each operation
answers, in both directions:

- whatever the server answered is documented for its operation, with the documented media
  type, headers and body: schemathesis' conformance checks on the requests it generates, and
  the same for every request of the flow below;
- whatever is documented for an operation, the server answered in this run: a flow of real
  nodes, custodians and a viewer, and requests made wrong on purpose, witness every status of
  every operation but those that only a condition of the escrow brings about (CONDITIONS),
  which tests of their own provoke.

Nothing here reads a table of statuses the document was made from: the witnesses are answers.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import ssl
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from escrow.core import protocol
from escrow.core.protocol import PROBLEM_JSON, PendingRequest
from escrow.core.timestamps import timestamp
from escrow.core.unlockkey import UnlockKey
from escrow.server.openapi import openapi_document
from lab.server import BOOT_ID, Cluster, EscrowProcess, Node, make_escrow, swarm_id
from tests.conftest import ok

pytestmark = pytest.mark.slow

# Statuses no request makes a healthy lab escrow answer: each needs a condition of the escrow
# itself, which the test named provokes (the per-source limit is off in the lab, so that the
# tests can play many agents from one address; this test witnesses the node limits' 429).
CONDITIONS = {
    429: "the per-source limit: tests/integration/test_hostile_clients.py",
    500: "a bug in a handler: what the middleware answers then is its own unit's",
    503: "the HSM or the database away, or the escrow shutting down: tests/integration/"
         "test_hsm.py, test_failover.py, test_status.py",
    507: "a full disk: tests/integration/test_disk_full.py",
}
BODY_TIMEOUT = 0.5  # server.body_timeout_seconds here, so that 408 is witnessed quickly
Key = tuple[str, str, int]  # (method, documented path, status)


def _templates() -> list[tuple[re.Pattern[str], str]]:
    return [(re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$"), path)
            for path in openapi_document()["paths"]]


def documented_path(method: str, path: str) -> str | None:
    """The document's path of the operation ``method path`` answers, if it has one."""
    operations = openapi_document()["paths"]
    return next((template for pattern, template in _templates()
                 if pattern.match(path) and method.lower() in operations[template]), None)


@dataclass
class Api:
    """HTTPS to the escrow; every answer's (method, documented path, status) is kept, and
    every error answer is checked to be a problem of the escrow's (RFC 9457)."""

    escrow: EscrowProcess
    seen: set[Key] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.context = ssl.create_default_context(cafile=str(self.escrow.ca))

    def send(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, *,
             withheld: bool = False) -> tuple[int, Any]:
        """The status and JSON of the answer; ``withheld``: announce a body, never send it."""
        connection = http.client.HTTPSConnection("localhost", self.escrow.port,
                                                 context=self.context, timeout=30)
        try:
            connection.putrequest(method, path, skip_accept_encoding=True)
            for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                connection.putheader(name, value)
            if body is not None or withheld:
                connection.putheader("Content-Length", str(100 if withheld else len(body or b"")))
            connection.endheaders(None if withheld else body)
            answer = connection.getresponse()
            status, kind, raw = answer.status, answer.headers["Content-Type"], answer.read()
            retry_after = answer.headers["Retry-After"]
        finally:
            connection.close()
        template = documented_path(method, urlsplit(path).path)
        assert template is not None, (method, path)
        self.seen.add((method.lower(), template, status))
        if status >= 400:
            assert kind == PROBLEM_JSON, (method, path, status, kind)
            problem = json.loads(raw)
            assert problem["status"] == status
            assert problem["type"] == protocol.problem_type(problem["error"])
            assert problem["detail"] == problem["message"]
            assert (retry_after is not None) == (status == 429), (method, path, retry_after)
            return status, problem
        return status, json.loads(raw) if kind.startswith("application/json") else raw

    def post(self, path: str, body: object, headers: dict[str, str] | None = None
             ) -> tuple[int, Any]:
        return self.send("POST", path, json.dumps(body).encode(), headers)

    def unsigned(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        return self.send(method, path, None if body is None else json.dumps(body).encode())

    # -- a node -----------------------------------------------------------------------------

    def nonce(self) -> bytes:
        status, answer = self.send("POST", "/v1/nonce")
        assert status == 200
        return protocol.b64d(answer["nonce"])

    def enroll(self, node: Node, cluster_id: str = "", nonce: bytes = b"") -> tuple[int, Any]:
        cluster_id = cluster_id or node.cluster_id
        nonce = nonce or self.nonce()
        payload = protocol.enroll_payload(
            cluster_id, node.node_id, node.cert.cert.public_bytes(serialization.Encoding.DER),
            protocol.public_der(node.agent_key.public_key()), node.hostname, nonce)
        return self.post("/v1/enroll", protocol.EnrollRequest(
            cluster_id=cluster_id, node_id=node.node_id, node_cert=node.cert_pem,
            agent_public_key=protocol.public_pem(node.agent_key.public_key()),
            hostname=node.hostname, nonce=protocol.b64e(nonce),
            swarm_signature=protocol.sign(node.cert.key, payload),
            agent_signature=protocol.sign(node.agent_key, payload)).model_dump(mode="json"))

    def deposit(self, node: Node, key: UnlockKey, nonce: bytes = b"") -> tuple[int, Any]:
        _, info = self.send("GET", "/v1/info")
        nonce = nonce or self.nonce()
        sealed = protocol.HPKE.encrypt(
            key.swmkey().encode("ascii"),
            X25519PublicKey.from_public_bytes(protocol.b64d(info["deposit_public_key"])),
            info=protocol.deposit_info(node.cluster_id, node.node_id, nonce))
        return self.post("/v1/deposit", protocol.DepositRequest(
            cluster_id=node.cluster_id, node_id=node.node_id, nonce=protocol.b64e(nonce),
            sealed_key=protocol.b64e(sealed), signature=protocol.sign(
                node.agent_key, protocol.deposit_payload(node.cluster_id, node.node_id, nonce,
                                                         sealed))).model_dump(mode="json"))

    def unseal(self, node: Node, nonce: bytes = b"") -> tuple[int, Any]:
        nonce, boot_id = nonce or self.nonce(), BOOT_ID
        ephemeral = X25519PrivateKey.generate().public_key().public_bytes_raw()
        cert = node.cert.cert.public_bytes(serialization.Encoding.DER)
        return self.post("/v1/unseal", protocol.UnsealRequest(
            cluster_id=node.cluster_id, node_id=node.node_id, node_cert=node.cert_pem,
            ephemeral_public_key=protocol.b64e(ephemeral), hostname=node.hostname,
            boot_id=boot_id, nonce=protocol.b64e(nonce), signature=protocol.sign(
                node.agent_key, protocol.unseal_payload(
                    node.cluster_id, node.node_id, cert, ephemeral, node.hostname, boot_id,
                    "", nonce))).model_dump(mode="json"))

    def heartbeat(self, node: Node, boot_id: str = BOOT_ID, nonce: bytes = b""
                  ) -> tuple[int, Any]:
        nonce = nonce or self.nonce()
        beat = protocol.HeartbeatRequest(
            cluster_id=node.cluster_id, node_id=node.node_id, boot_id=boot_id,
            lock_state="unlocked", agent_version="test", uptime_seconds=1,
            interval_seconds=60, nonce=protocol.b64e(nonce), signature="")
        return self.post("/v1/heartbeat", beat.model_copy(update={"signature": protocol.sign(
            node.agent_key, protocol.heartbeat_payload(beat, nonce))}).model_dump(mode="json"))

    def report(self, request_id: str, node: Node, version: int,
               signer: ec.EllipticCurvePrivateKey | None = None) -> tuple[int, Any]:
        return self.post(f"/v1/unseal/{request_id}/result", protocol.ResultReport(
            node_id=node.node_id, outcome="unlocked", version=version,
            signature=protocol.sign(signer or node.agent_key, protocol.result_payload(
                request_id, node.node_id, "unlocked", version))).model_dump(mode="json"))

    # -- a custodian ------------------------------------------------------------------------

    def signed(self, key: ec.EllipticCurvePrivateKey, method: str, path: str,
               body: object = None) -> tuple[int, Any]:
        """As the custodian of ``key`` (and, unsigned, as anyone: refused for that)."""
        refused = self.unsigned(method, path, body)
        assert refused[0] == 401, refused
        raw = b"" if body is None else json.dumps(body).encode()
        date, nonce = str(int(time.time())), secrets.token_hex(16)
        return self.send(method, path, raw if body is not None else None, {
            "X-Escrow-Key-Id": protocol.sha256_hex(protocol.public_der(key.public_key())),
            "X-Escrow-Date": date, "X-Escrow-Nonce": nonce,
            "X-Escrow-Signature": protocol.sign(key, protocol.custodian_http_payload(
                method, path, date, nonce, raw))})


def _window(key: ec.EllipticCurvePrivateKey, cluster_id: str, nodes: list[str],
            window_id: str = "") -> dict[str, Any]:
    window_id = window_id or "w-" + "".join(secrets.choice("abcdefghij0123456789")
                                           for _ in range(20))
    expires = timestamp(datetime.now(UTC) + timedelta(hours=1))
    return {"window_id": window_id, "cluster_id": cluster_id, "nodes": nodes, "restarts": 1,
            "expires_at": expires, "reason": "patch night", "signature": protocol.sign(
                key, protocol.window_payload(window_id, cluster_id, nodes, 1, expires,
                                             "patch night"))}


def expect(status: int, answer: tuple[int, Any]) -> Any:
    assert answer[0] == status, answer
    return answer[1]


UNKNOWN_REQUEST, UNKNOWN_WINDOW = "r-" + "0" * 20, "w-" + "0" * 20


@dataclass
class Flow:
    """Real requests of nodes, custodians and a viewer, each expecting the status it must get.
    alice and bob hold slots of the first cluster, alice alone of the second. Nodes: one and
    two (of each cluster), clone (quarantined: two machines beat as it), revoked (revoked),
    stranger (never enrolled), and asking (whose requests the custodians decide on)."""

    api: Api
    escrow: EscrowProcess
    viewer: str
    clusters: tuple[Cluster, Cluster]
    key: UnlockKey = field(default_factory=lambda: UnlockKey(os.urandom(32)))
    unknown_cluster: str = field(default_factory=swarm_id)

    def __post_init__(self) -> None:
        self.alice = self.escrow.custodian_key("alice")
        self.bob = self.escrow.custodian_key("bob")
        first, second = self.clusters
        self.one, self.two = first.node(), second.node()
        self.clone, self.revoked, self.stranger = first.node(), first.node(), first.node()
        self.asking = [first.node() for _ in range(3)]

    def wrong(self, node: Node) -> Node:
        """The same node, of a cluster the escrow does not know."""
        return Node(self.unknown_cluster, node.node_id, node.cert, node.agent_key)

    def run(self) -> None:
        for path in ("/healthz", "/metrics", "/v1/openapi.json", "/v1/info"):
            expect(200, self.api.send("GET", path))
        expect(200, self.api.send("GET", "/v1/status",
                                  headers={"Authorization": f"Bearer {self.viewer}"}))
        self.nodes()
        mine, theirs = self.requests()
        revoked = self.decisions(theirs)
        self.shares()
        self.windows()
        # A revoked node's report is refused for who it is.
        ok(self.escrow.cli("node", "revoke", "--cluster", self.revoked.cluster_id,
                           self.revoked.node_id))
        expect(403, self.api.report(revoked, self.revoked, 1))
        self.anyone(mine)

    def nodes(self) -> None:
        api, one, two, clone, key = self.api, self.one, self.two, self.clone, self.key
        for node in (one, two, clone, self.revoked, *self.asking):
            expect(200, api.enroll(node))
        expect(403, api.enroll(one, two.cluster_id))  # its certificate is not of that swarm
        expect(404, api.enroll(self.wrong(one)))
        assert expect(201, api.deposit(one, key))["created"]
        assert not expect(200, api.deposit(one, key))["created"]
        expect(429, api.deposit(one, UnlockKey(os.urandom(32))))  # node_deposit_limit = 1
        expect(201, api.deposit(two, UnlockKey(os.urandom(32))))
        for node, status in ((self.stranger, 403), (self.wrong(one), 404)):
            expect(status, api.deposit(node, key))
            expect(status, api.unseal(node))
            expect(status, api.heartbeat(node))
        expect(200, api.heartbeat(one))
        # Two boots of one node beating in turn: a copy of its disk is alive; quarantined.
        other = str(uuid.uuid4())
        for boot in (BOOT_ID, other, BOOT_ID):
            expect(200, api.heartbeat(clone, boot))
        expect(409, api.enroll(clone))
        expect(409, api.unseal(clone))
        expect(409, api.deposit(clone, key))

    def requests(self) -> tuple[str, str]:
        api, one = self.api, self.one
        mine = expect(201, api.unseal(one))["request_id"]
        expect(200, api.send("GET", f"/v1/unseal/{mine}"))
        expect(400, api.send("GET", f"/v1/unseal/{mine}?wait=soon"))
        expect(404, api.send("GET", f"/v1/unseal/{UNKNOWN_REQUEST}"))
        expect(409, api.report(mine, one, 99))  # no share of version 99 was released to it
        expect(200, api.report(mine, one, 1))
        expect(404, api.report(UNKNOWN_REQUEST, one, 1))
        expect(401, api.report(mine, one, 1, self.two.agent_key))  # not the node's key
        theirs = expect(201, api.unseal(self.two))["request_id"]
        for _ in range(10):  # requests.rate_limit (10) that did not unlock the node
            expect(201, api.unseal(self.revoked))
        expect(429, api.unseal(self.revoked))
        for node in self.asking:
            expect(201, api.unseal(node))
        return mine, theirs

    def decisions(self, theirs: str) -> str:
        """Approvals and denials of pending requests, and of the other cluster's by one who
        holds no slot of it; the id of the revoked node's request (not revoked yet)."""
        api, alice, bob = self.api, self.alice, self.bob
        pending = [PendingRequest.model_validate(r)
                   for r in expect(200, api.signed(alice, "GET", "/v1/requests"))]
        first, second, third = (next(r for r in pending if r.node_id == node.node_id)
                                for node in self.asking)
        approve = f"/v1/requests/{first.request_id}/approve"
        body = {"signature": protocol.sign(alice, protocol.approval_payload("approve", first))}
        expect(200, api.signed(alice, "POST", approve, body))
        expect(409, api.signed(alice, "POST", approve, body))
        deny = f"/v1/requests/{second.request_id}/deny"
        body = {"reason": "not now", "signature": protocol.sign(
            alice, protocol.approval_payload("deny", second, "not now"))}
        expect(200, api.signed(alice, "POST", deny, body))
        expect(409, api.signed(alice, "POST", deny, body))
        for decision, body in (("approve", {"signature": protocol.b64e(bytes(8))}),
                               ("deny", {"reason": "r", "signature": protocol.b64e(bytes(8))})):
            expect(404, api.signed(alice, "POST", f"/v1/requests/{UNKNOWN_REQUEST}/{decision}",
                                   body))
            expect(403, api.signed(bob, "POST", f"/v1/requests/{theirs}/{decision}", body))
        expect(200, api.signed(alice, "POST", "/v1/requests/approve", {
            "cluster_id": self.one.cluster_id, "approvals": [{
                "request_id": third.request_id, "signature": protocol.sign(
                    alice, protocol.approval_payload("approve", third))}]}))
        return next(r.request_id for r in pending if r.node_id == self.revoked.node_id)

    def shares(self) -> None:
        api, alice = self.api, self.alice
        ephemeral = protocol.b64e(X25519PrivateKey.generate().public_key().public_bytes_raw())
        cases = ((alice, self.one.cluster_id, 200), (self.bob, self.two.cluster_id, 403),
                 (alice, self.unknown_cluster, 404))
        for who, cluster_id, status in cases:
            expect(status, api.signed(who, "POST", "/v1/shares/export", {
                "cluster_id": cluster_id, "ephemeral_public_key": ephemeral}))
            expect(status, api.signed(who, "GET", f"/v1/shares/drills?cluster_id={cluster_id}"))
        expect(400, api.signed(alice, "GET", "/v1/shares/drills?cluster_id=nope"))
        drills = expect(200, api.signed(alice, "GET", "/v1/shares/drills?cluster_id="
                                                      + self.one.cluster_id))
        slot = next(s["slot"] for s in drills["slots"] if s["custodian"] == "alice")
        for who, cluster_id, status in cases:  # a proof that does not match: still a 200
            expect(status, api.signed(who, "POST", "/v1/shares/verify", {
                "cluster_id": cluster_id, "nonce": protocol.b64e(api.nonce()),
                "proofs": [{"version": 1, "slot": slot, "proof": protocol.b64e(bytes(32))}]}))

    def windows(self) -> None:
        api, alice, bob, one, two = self.api, self.alice, self.bob, self.one, self.two
        ours = _window(alice, one.cluster_id, [one.node_id])
        expect(201, api.signed(alice, "POST", "/v1/windows", ours))
        expect(409, api.signed(alice, "POST", "/v1/windows", ours))  # the same id again
        expect(403, api.signed(bob, "POST", "/v1/windows",
                               _window(bob, two.cluster_id, [two.node_id])))
        expect(404, api.signed(alice, "POST", "/v1/windows",
                               _window(alice, one.cluster_id, [swarm_id()])))
        alices = _window(alice, two.cluster_id, [two.node_id])
        expect(201, api.signed(alice, "POST", "/v1/windows", alices))
        expect(200, api.signed(alice, "GET", "/v1/windows"))
        expect(400, api.signed(alice, "GET", "/v1/windows?cluster_id=nope"))
        expect(404, api.signed(alice, "GET", f"/v1/windows?cluster_id={self.unknown_cluster}"))
        sign = {"signature": protocol.sign(bob, protocol.window_payload(
            ours["window_id"], one.cluster_id, [one.node_id], 1, ours["expires_at"],
            ours["reason"]))}
        at = f"/v1/windows/{ours['window_id']}"
        expect(200, api.signed(bob, "POST", f"{at}/sign", sign))
        expect(409, api.signed(bob, "POST", f"{at}/sign", sign))
        expect(403, api.signed(bob, "POST", f"/v1/windows/{alices['window_id']}/sign", sign))
        expect(404, api.signed(bob, "POST", f"/v1/windows/{UNKNOWN_WINDOW}/sign", sign))
        expect(403, api.signed(bob, "POST", f"/v1/windows/{alices['window_id']}/close", {}))
        expect(200, api.signed(alice, "POST", f"{at}/close", {}))
        expect(409, api.signed(alice, "POST", f"{at}/close", {}))
        expect(404, api.signed(alice, "POST", f"/v1/windows/{UNKNOWN_WINDOW}/close", {}))

    def anyone(self, request_id: str) -> None:
        """What is wrong whoever sends it: a body that is not JSON, too large, too slow; a
        node's request over a nonce the escrow never issued, a token no viewer holds. (Every
        custodian request was sent unsigned too: 401.)"""
        api, one = self.api, self.one
        with_body = [(method.upper(), path.replace("{request_id}", request_id)
                      .replace("{window_id}", UNKNOWN_WINDOW))
                     for path, ops in openapi_document()["paths"].items()
                     for method, op in ops.items() if "requestBody" in op]
        for method, path in with_body:
            expect(400, api.send(method, path, b"{"))
            expect(413, api.send(method, path, b" " * (65536 + 1)))
        with ThreadPoolExecutor(len(with_body)) as pool:
            for answer in pool.map(lambda call: api.send(*call, withheld=True), with_body):
                expect(408, answer)
        never = bytes(32)  # a nonce of the right size that no escrow issued
        expect(401, api.enroll(one, nonce=never))
        expect(401, api.deposit(one, self.key, nonce=never))
        expect(401, api.unseal(one, nonce=never))
        expect(401, api.heartbeat(one, nonce=never))
        expect(401, api.send("GET", "/v1/status",
                             headers={"Authorization": "Bearer esv_nobody"}))


def _fuzzed(escrow: EscrowProcess, har: Path) -> set[Key]:
    """Run schemathesis' conformance checks against the escrow; what it was answered."""
    run = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run",
         f"{escrow.url}/v1/openapi.json", "--tls-verify", str(escrow.ca),
         "--checks", "status_code_conformance,content_type_conformance,"
                     "response_headers_conformance,response_schema_conformance",
         "--max-examples", "10", "--report", "har", "--report-har-path", str(har)],
        cwd=escrow.base, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-6000:]
    seen = set()
    for entry in json.loads(har.read_text())["log"]["entries"]:
        method = entry["request"]["method"].lower()
        template = documented_path(method, urlsplit(entry["request"]["url"]).path)
        if template is not None:  # not a method the path is documented with
            seen.add((method, template, entry["response"]["status"]))
    return seen


def test_the_server_answers_what_its_document_says_and_all_of_it(tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path, ESCROW_KEYS_NODE_DEPOSIT_LIMIT="1",
                         ESCROW_SERVER_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT))
    escrow.custodian("alice")
    escrow.custodian("bob")
    viewer = escrow.viewer("on-call")
    one, two = (escrow.cluster(2, "auto,alice,bob"),
                escrow.cluster(2, "auto,alice", "--allow-no-paper-recovery"))
    escrow.start()
    try:
        api = Api(escrow)
        Flow(api, escrow, viewer, (one, two)).run()
        fuzzed = _fuzzed(escrow, tmp_path / "fuzz.har")
    finally:
        assert escrow.stop() == 0
    documented = {(method, path, int(status))
                  for path, operations in openapi_document()["paths"].items()
                  for method, operation in operations.items()
                  for status in operation["responses"]}
    assert api.seen - documented == set()  # what the flow was answered is documented
    missing = {key for key in documented - api.seen - fuzzed if key[2] not in CONDITIONS}
    assert missing == set()
