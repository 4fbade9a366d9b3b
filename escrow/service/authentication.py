"""Where a caller's identity is checked: every signature, nonce, certificate and revocation
check of every request kind, one verifying call per kind.

A ``verify_*`` call is the *identification* stage: the caller proves it holds an enrolled key
(or, to enroll, the swarm's node key) by signing a fresh nonce. Its refusals are counted, never
audited, so strangers cannot write to the escrow. An ``admit_*`` call is the identified
party's standing (revoked? is the certificate still the swarm's and this node's?): its refusals
are audited by the caller.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from escrow import custodian_keys, identity
from escrow.core import protocol
from escrow.core.encoding import encode
from escrow.core.errors import IdentityError, RequestError
from escrow.core.protocol import (
    DepositRequest,
    EnrollRequest,
    HeartbeatRequest,
    PendingRequest,
    ResultReport,
    UnsealRequest,
)
from escrow.core.states import Decision, NodeStatus
from escrow.nonces import NONCE_SIZE, NonceMinter, millis
from escrow.service import fields
from escrow.store import NodeRecord, RequestRecord, Store

CUSTODIAN_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class VerifiedEnrollment:
    cert: x509.Certificate
    agent_key: ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class VerifiedDeposit:
    node: NodeRecord
    nonce: bytes
    encrypted_key: bytes  # HPKE, to the escrow's deposit key


@dataclass(frozen=True)
class VerifiedUnseal:
    node: NodeRecord
    cert: x509.Certificate
    ephemeral: bytes  # the X25519 key the request's shares are encrypted to


@dataclass(frozen=True)
class VerifiedHeartbeat:
    node: NodeRecord


@dataclass(frozen=True)
class VerifiedReport:
    request: RequestRecord
    node: NodeRecord


def _stale() -> IdentityError:
    return IdentityError("stale_nonce", "the nonce is unknown, used or expired",
                         "fetch a fresh one from POST /v1/nonce", 401)


class Authenticator:
    def __init__(self, store: Store, nonces: NonceMinter, clock: Callable[[], datetime],
                 for_release: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self.nonces = nonces
        self.clock = clock
        # Marking a nonce used is a write of a few bytes, made only for identified callers: on
        # a full disk it may use the space held back for releases (escrow.diskspace), so an
        # unseal is not refused for it, and a deposit or enrollment is refused by its own
        # room check afterwards, audited as such.
        self._for_release = for_release

    # -- nodes: identification --------------------------------------------------------------

    def verify_enroll(self, body: EnrollRequest) -> VerifiedEnrollment:
        """The swarm's own CA vouches for the certificate, its key and the new agent key both
        signed this enrollment, over a fresh nonce."""
        cluster = self.store.get_cluster(body.cluster_id)
        nonce, expires = self._fresh(body.nonce)
        cert = identity.parse_node_cert(body.node_cert.encode("ascii"))
        identity.check_issuer(cert, cluster.root_ca_pem.encode("ascii"), body.cluster_id)
        agent_key = fields.p256_public(body.agent_public_key, "agent public key")
        payload = protocol.enroll_payload(
            body.cluster_id, body.node_id, cert.public_bytes(serialization.Encoding.DER),
            protocol.public_der(agent_key), body.hostname, nonce)
        swarm_key = cert.public_key()
        if not isinstance(swarm_key, ec.EllipticCurvePublicKey) or not protocol.verify(
                swarm_key, body.swarm_signature, payload):
            raise IdentityError("bad_signature", "the swarm node key's signature is invalid",
                                "the agent must sign with the key of this node certificate", 401)
        if not protocol.verify(agent_key, body.agent_signature, payload):
            raise IdentityError("bad_signature", "the agent key's signature is invalid",
                                "the agent must sign with the key it registers", 401)
        self._use_once(nonce, expires)
        return VerifiedEnrollment(cert, agent_key)

    def verify_deposit(self, body: DepositRequest) -> VerifiedDeposit:
        node = self._node(body.cluster_id, body.node_id)
        nonce, expires = self._fresh(body.nonce)
        encrypted = fields.b64(body.sealed_key, "sealed_key")
        self._signed_by(node, body.signature, protocol.deposit_payload(
            body.cluster_id, body.node_id, nonce, encrypted), "deposit")
        self._use_once(nonce, expires)
        return VerifiedDeposit(node, nonce, encrypted)

    def verify_unseal(self, body: UnsealRequest) -> VerifiedUnseal:
        node = self._node(body.cluster_id, body.node_id)
        nonce, expires = self._fresh(body.nonce)
        ephemeral = fields.ephemeral(body.ephemeral_public_key)
        cert = identity.parse_node_cert(body.node_cert.encode("ascii"))
        self._signed_by(node, body.signature, protocol.unseal_payload(
            body.cluster_id, body.node_id, cert.public_bytes(serialization.Encoding.DER),
            ephemeral, body.hostname, body.boot_id, body.kek_version, nonce), "request")
        self._use_once(nonce, expires)
        return VerifiedUnseal(node, cert, ephemeral)

    def verify_heartbeat(self, body: HeartbeatRequest) -> VerifiedHeartbeat:
        node = self._node(body.cluster_id, body.node_id)
        nonce, expires = self._fresh(body.nonce)
        self._signed_by(node, body.signature, protocol.heartbeat_payload(body, nonce),
                        "heartbeat")
        self._use_once(nonce, expires)
        return VerifiedHeartbeat(node)

    def verify_report(self, request_id: str, body: ResultReport) -> VerifiedReport:
        request = self.store.get_request(request_id)
        if request is None or not hmac.compare_digest(request.node_id, body.node_id):
            raise RequestError("unknown_request", f"no request {request_id} for this node",
                               status=404)
        node = self._node(request.cluster_id, request.node_id)
        self._signed_by(node, body.signature, protocol.result_payload(
            request_id, body.node_id, body.outcome, body.version), "result")
        return VerifiedReport(request, node)

    # -- nodes: standing (audited by the caller) --------------------------------------------

    @staticmethod
    def admit(node: NodeRecord) -> None:
        if node.status == NodeStatus.QUARANTINED:
            raise IdentityError("clone_suspected", f"node {node.node_id} is quarantined: two "
                                "machines with its identity were alive at once",
                                "find the copy (`escrow audit show` names both boot ids and "
                                "addresses), shut it down, then re-admit the node with "
                                "`escrow node allow`", 409)
        if node.status != NodeStatus.ACTIVE:
            raise IdentityError("revoked", f"node {node.node_id} is revoked",
                                "an admin can re-admit it with `escrow node allow`")

    def admit_enrollment(self, verified: VerifiedEnrollment, body: EnrollRequest
                         ) -> NodeRecord | None:
        """The certificate names this node as a manager of this swarm, and the node, if it
        was enrolled before, is not revoked. Returns the earlier enrollment."""
        identity.check_claims(verified.cert, body.cluster_id, body.node_id, self.clock())
        existing = self.store.get_node(body.cluster_id, body.node_id)
        if existing is not None:
            self.admit(existing)
        return existing

    def admit_unseal(self, verified: VerifiedUnseal, body: UnsealRequest) -> None:
        """Not revoked, and the certificate sent is still the swarm's, for this node."""
        self.admit(verified.node)
        cluster = self.store.get_cluster(body.cluster_id)
        identity.check_issuer(verified.cert, cluster.root_ca_pem.encode("ascii"),
                              body.cluster_id)
        identity.check_claims(verified.cert, body.cluster_id, body.node_id, self.clock())

    # -- custodians -------------------------------------------------------------------------

    def verify_custodian(self, key_id: str, date: str, nonce: str, signature: str, method: str,
                         path: str, body: bytes) -> str:
        """Check a custodian's signed HTTP request; return their name. ``key_id`` is the
        SHA-256 of the custodian's public key (DER), so the CLI needs no name setting."""
        if not 16 <= len(nonce) <= 64 or not nonce.isascii() or not nonce.isalnum():
            raise IdentityError("bad_nonce", "X-Escrow-Nonce must be 16 to 64 letters or digits",
                                "the escrow CLI sends a random one with every request", 401)
        matches = [c for c in self.store.list_custodians() if hmac.compare_digest(
            protocol.sha256_hex(protocol.public_der(custodian_keys.load_public(
                c.public_key_pem.encode("ascii")))), key_id)]
        if not matches:
            raise IdentityError("unknown_custodian", "no custodian is registered with this key",
                                "ask the admin to run `escrow custodian add NAME --public-key "
                                "FILE.pub` with your public key", 401)
        record = matches[0]
        try:
            sent = datetime.fromtimestamp(int(date), tz=self.clock().tzinfo)
        except (ValueError, OverflowError, OSError):
            raise IdentityError("bad_date", "X-Escrow-Date is not a Unix time", "", 401) from None
        payload = protocol.custodian_http_payload(method, path, date, nonce, body)
        key = custodian_keys.load_public(record.public_key_pem.encode("ascii"))
        if not protocol.verify(key, signature, payload):
            raise IdentityError("bad_signature", "the request signature does not match your "
                                "registered key", "use the key registered for you", 401)
        now = self.clock()
        skew = abs(now - sent)
        if skew > CUSTODIAN_SKEW:
            raise IdentityError("clock_skew", f"your clock is {skew.total_seconds():.0f} s off "
                                "the escrow's", "synchronise it (NTP) and retry", 401)
        # Keyed on what was signed, not on the signature's spelling: another encoding or the
        # other ECDSA twin of the same signature is the same request.
        seen = hashlib.sha256(encode("swarm-unseal/v1/custodian-seen", key_id, payload)).digest()
        try:
            self._use_once(seen, now + 2 * CUSTODIAN_SKEW)
        except IdentityError:
            raise IdentityError("replayed", "this signed request was already used",
                                "sign a new request (the CLI does so for every call)",
                                401) from None
        return record.name

    def verify_decision(self, custodian: str, decision: Decision, view: PendingRequest,
                        reason: str, signature: str) -> None:
        """The custodian signed this decision about the request as they were shown it."""
        key = custodian_keys.load_public(
            self.store.get_custodian(custodian).public_key_pem.encode("ascii"))
        if not protocol.verify(key, signature, protocol.approval_payload(decision, view, reason)):
            raise IdentityError("bad_signature", "the approval signature does not cover "
                                "this request", "fetch the request again and re-sign", 401)

    def use_nonce(self, nonce_b64: str) -> bytes:
        """A fresh server nonce, used up now: an identified custodian's proof over it (the
        share drill) is then good once, at any replica."""
        nonce, expires = self._fresh(nonce_b64)
        self._use_once(nonce, expires)
        return nonce

    # -- the parts --------------------------------------------------------------------------

    def _fresh(self, nonce_b64: str) -> tuple[bytes, datetime]:
        """An authentic, unexpired server nonce (not yet checked for reuse)."""
        nonce = fields.b64(nonce_b64, "nonce", NONCE_SIZE)
        expires = self.nonces.expiry(nonce)
        if expires is None:
            raise _stale()
        return nonce, expires

    def _use_once(self, key: bytes, expires: datetime) -> None:
        # A nonce is 32 bytes and a custodian request's mark a SHA-256: they cannot collide.
        self._for_release()
        if not self.store.use_once(key, millis(expires), millis(self.clock())):
            raise _stale()

    def _node(self, cluster_id: str, node_id: str) -> NodeRecord:
        self.store.get_cluster(cluster_id)
        node = self.store.get_node(cluster_id, node_id)
        if node is None:
            raise IdentityError("unknown_node", f"node {node_id} is not enrolled in {cluster_id}",
                                "enroll it with `unseal-agent enroll` while it is unlocked")
        return node

    @staticmethod
    def _signed_by(node: NodeRecord, signature: str, payload: bytes, what: str) -> None:
        agent_key = fields.p256_public(node.agent_public_key_pem, "agent public key")
        if not protocol.verify(agent_key, signature, payload):
            raise IdentityError("bad_signature", f"the {what}'s signature is invalid",
                                "sign with the agent key registered at enrollment", 401)
