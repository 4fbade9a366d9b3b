"""The escrow's request handling: enrollment, deposits, unseal requests, custodian decisions.

Synchronous and free of HTTP: the server runs every call on the one thread that owns the token
and the database, and maps the exceptions raised here to statuses. Every refusal that concerns
keys is audited before it is raised.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from escrow import custodian_keys, identity, protocol, unlockkey
from escrow.audit import AuditEvent
from escrow.config import ServerSettings
from escrow.encoding import encode
from escrow.errors import EscrowError, IdentityError, InputError, RequestError
from escrow.protocol import (
    HPKE,
    DepositRequest,
    EnrollRequest,
    EnrollResponse,
    PendingRequest,
    ReleasedShare,
    RequestStatus,
    ResultReport,
    UnsealRequest,
)
from escrow.store import (
    ApprovalRecord,
    KeyVersionRecord,
    NodeRecord,
    RequestRecord,
    ShareRecord,
)
from escrow.vault import Vault, parse_timestamp, timestamp

NONCE_TTL = timedelta(minutes=2)
CUSTODIAN_SKEW = timedelta(minutes=5)
DEPOSIT_KEY = "deposit-key"
DEPOSIT_KEY_AAD = encode("swarm-unseal/v1/deposit-key")


class NonceBook:
    """Single-use server nonces that expire (thread-safe, in memory: a restart voids them,
    which only makes agents ask again)."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._issued: dict[bytes, datetime] = {}

    def issue(self) -> tuple[bytes, datetime]:
        nonce = secrets.token_bytes(32)
        now = self._clock()
        with self._lock:
            self._issued = {n: t for n, t in self._issued.items() if t > now}
            self._issued[nonce] = now + NONCE_TTL
        return nonce, now + NONCE_TTL

    def consume(self, nonce: bytes) -> bool:
        with self._lock:
            expires = self._issued.pop(nonce, None)
        return expires is not None and expires > self._clock()


@dataclass
class ReplayGuard:
    """Custodian request signatures seen within the allowed clock skew."""

    seen: dict[str, datetime] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def first_time(self, signature: str, now: datetime) -> bool:
        with self.lock:
            self.seen = {s: t for s, t in self.seen.items() if t > now - 2 * CUSTODIAN_SKEW}
            if signature in self.seen:
                return False
            self.seen[signature] = now
            return True


def _load_ec_public(pem: str, what: str) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm):
        raise RequestError("bad_key", f"the {what} is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise RequestError("bad_key", f"the {what} is not an ECDSA P-256 key")
    return key


def _b64(value: str, what: str, size: int | None = None) -> bytes:
    try:
        raw = protocol.b64d(value)
    except ValueError:
        raise RequestError("bad_encoding", f"{what} is not base64") from None
    if size is not None and len(raw) != size:
        raise RequestError("bad_encoding", f"{what} must be {size} bytes, not {len(raw)}")
    return raw


def _ephemeral(value: str) -> bytes:
    """A requester's X25519 key, refused if shares could not be encrypted to it (a low-order
    point makes every HPKE encryption fail)."""
    raw = _b64(value, "ephemeral_public_key", 32)
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise RequestError("bad_key", "ephemeral_public_key is not a usable X25519 public key",
                           "send the public half of a freshly generated X25519 key") from None
    return raw


@dataclass(frozen=True)
class Release:
    version: KeyVersionRecord
    shares: list[ShareRecord]


class Escrow:
    def __init__(self, vault: Vault, settings: ServerSettings,
                 on_release: Callable[[int], None] = lambda count: None,
                 room: Callable[[], None] = lambda: None) -> None:
        self.vault = vault
        self.on_release = on_release  # gets the count of shares released for the first time
        self.room = room  # raises DiskFull when new data must be refused (escrow.diskspace)
        self.store = vault.store
        self.settings = settings
        self.clock = vault.clock
        self.nonces = NonceBook(vault.clock)
        self.replays = ReplayGuard()
        self._deposit_key = self._load_deposit_key()

    # -- set-up -----------------------------------------------------------------------------

    def _load_deposit_key(self) -> X25519PrivateKey:
        sealed = self.store.get_meta(DEPOSIT_KEY)
        if sealed is None:
            key = X25519PrivateKey.generate()
            raw = key.private_bytes_raw()
            self.store.put_meta(DEPOSIT_KEY, self.vault.sealer.seal(raw, DEPOSIT_KEY_AAD),
                                AuditEvent("escrow.deposit_key", "escrow", "",
                                           {"action": "created"}))
            return key
        return X25519PrivateKey.from_private_bytes(self.vault.sealer.open(sealed,
                                                                          DEPOSIT_KEY_AAD))

    @property
    def deposit_public_key(self) -> bytes:
        return self._deposit_key.public_key().public_bytes_raw()

    def check_health(self) -> None:
        """Raise unless the database answers and the token opens a share-sized test value."""
        self.store.get_meta(DEPOSIT_KEY)
        self.vault.sealer.open(self.vault.sealer.seal(b"health", b"health"), b"health")

    # -- audit helpers ----------------------------------------------------------------------

    def _refuse(self, action: str, error: EscrowError, cluster_id: str, **details: object) -> None:
        reason = getattr(error, "reason", type(error).__name__)
        self.store.append_audit(AuditEvent(f"{action}.refused", "escrow", cluster_id,
                                           {"reason": reason, "message": error.message,
                                            **details}))

    def _audited(self, action: str, cluster_id: str, call: Callable[[], object],
                 **details: object) -> None:
        try:
            call()
        except EscrowError as error:
            self._refuse(action, error, cluster_id, **details)
            raise

    def _check_nonce(self, nonce_b64: str) -> bytes:
        nonce = _b64(nonce_b64, "nonce", 32)
        if not self.nonces.consume(nonce):
            raise IdentityError("stale_nonce", "the nonce is unknown, used or expired",
                                "fetch a fresh one from POST /v1/nonce", 401)
        return nonce

    def _active_node(self, cluster_id: str, node_id: str) -> NodeRecord:
        self.store.get_cluster(cluster_id)
        node = self.store.get_node(cluster_id, node_id)
        if node is None:
            raise IdentityError("unknown_node", f"node {node_id} is not enrolled in {cluster_id}",
                                "enroll it with `unseal-agent enroll` while it is unlocked")
        if node.status != "active":
            raise IdentityError("revoked", f"node {node_id} is revoked",
                                "an admin can re-admit it with `escrow node allow`")
        return node

    # -- enrollment and deposit -------------------------------------------------------------

    def enroll(self, body: EnrollRequest, source: str) -> EnrollResponse:
        result: list[EnrollResponse] = []
        self._audited("enroll", body.cluster_id, lambda: result.append(self._enroll(body)),
                      node_id=body.node_id, hostname=body.hostname, source=source)
        return result[0]

    def _enroll(self, body: EnrollRequest) -> EnrollResponse:
        self.room()
        cluster = self.store.get_cluster(body.cluster_id)
        nonce = self._check_nonce(body.nonce)
        cert = identity.check_node_cert(body.node_cert.encode("ascii"),
                                        cluster.root_ca_pem.encode("ascii"), body.cluster_id,
                                        body.node_id, self.clock())
        agent_key = _load_ec_public(body.agent_public_key, "agent public key")
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
        existing = self.store.get_node(body.cluster_id, body.node_id)
        if existing is not None and existing.status != "active":
            raise IdentityError("revoked", f"node {body.node_id} is revoked",
                                "an admin can re-admit it with `escrow node allow`")
        now = timestamp(self.clock())
        self.store.enroll_node(
            NodeRecord(body.cluster_id, body.node_id, protocol.public_pem(agent_key),
                       body.hostname, now, "active"),
            AuditEvent("node.enroll", f"node:{body.node_id}", body.cluster_id,
                       {"node_id": body.node_id, "hostname": body.hostname,
                        "agent_key_sha256": protocol.sha256_hex(protocol.public_der(agent_key)),
                        "reenrolled": existing is not None}))
        versions = self.store.list_key_versions(body.cluster_id)
        return EnrollResponse(cluster_id=body.cluster_id, node_id=body.node_id, enrolled_at=now,
                              keys=[protocol.EscrowedKey(version=v.version,
                                                         fingerprint=v.fingerprint)
                                    for v in versions])

    def deposit(self, body: DepositRequest, source: str) -> tuple[int, bool, str]:
        result: list[tuple[int, bool, str]] = []
        self._audited("deposit", body.cluster_id, lambda: result.append(self._deposit(body)),
                      node_id=body.node_id, source=source)
        return result[0]

    def _deposit(self, body: DepositRequest) -> tuple[int, bool, str]:
        self.room()
        node = self._active_node(body.cluster_id, body.node_id)
        nonce = self._check_nonce(body.nonce)
        sealed = _b64(body.sealed_key, "sealed_key")
        agent_key = _load_ec_public(node.agent_public_key_pem, "agent public key")
        if not protocol.verify(agent_key, body.signature,
                               protocol.deposit_payload(body.cluster_id, body.node_id, nonce,
                                                        sealed)):
            raise IdentityError("bad_signature", "the deposit's signature is invalid",
                                "sign with the agent key registered at enrollment", 401)
        try:
            plain = HPKE.decrypt(sealed, self._deposit_key,
                                 info=protocol.deposit_info(body.cluster_id, body.node_id, nonce))
        except (InvalidTag, ValueError):
            raise RequestError("bad_deposit", "the sealed key does not decrypt",
                               "encrypt to the deposit key from GET /v1/info") from None
        try:
            key = unlockkey.parse(plain.decode("ascii", errors="replace"))
        except InputError as exc:
            raise RequestError("bad_deposit", exc.message, exc.hint) from None
        vault = Vault(self.store, self.vault.sealer, self.clock, f"node:{body.node_id}")
        deposited = vault.deposit(body.cluster_id, key)
        return deposited.version, deposited.created, deposited.fingerprint

    # -- unseal requests --------------------------------------------------------------------

    def unseal(self, body: UnsealRequest, source: str) -> RequestStatus:
        result: list[RequestStatus] = []
        self._audited("unseal", body.cluster_id, lambda: result.append(self._unseal(body, source)),
                      node_id=body.node_id, hostname=body.hostname, source=source)
        return result[0]

    def _unseal(self, body: UnsealRequest, source: str) -> RequestStatus:
        node = self._active_node(body.cluster_id, body.node_id)
        nonce = self._check_nonce(body.nonce)
        ephemeral = _ephemeral(body.ephemeral_public_key)
        cluster = self.store.get_cluster(body.cluster_id)
        now = self.clock()
        cert = identity.check_node_cert(body.node_cert.encode("ascii"),
                                        cluster.root_ca_pem.encode("ascii"), body.cluster_id,
                                        body.node_id, now)
        payload = protocol.unseal_payload(body.cluster_id, body.node_id,
                                          cert.public_bytes(serialization.Encoding.DER),
                                          ephemeral, body.hostname, body.boot_id,
                                          body.kek_version, nonce)
        agent_key = _load_ec_public(node.agent_public_key_pem, "agent public key")
        if not protocol.verify(agent_key, body.signature, payload):
            raise IdentityError("bad_signature", "the request's signature is invalid",
                                "sign with the agent key registered at enrollment", 401)
        since = timestamp(now - timedelta(seconds=self.settings.rate_window_seconds))
        if self.store.count_requests_since(body.cluster_id, body.node_id,
                                           since) >= self.settings.rate_limit:
            raise RequestError("rate_limited",
                               f"node {body.node_id} made {self.settings.rate_limit} requests "
                               f"in {self.settings.rate_window_seconds:g} s",
                               "wait and retry; an agent backs off by itself", 429)
        request_id = "r-" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                                    for _ in range(20))
        record = RequestRecord(
            request_id, body.cluster_id, body.node_id, body.hostname, body.boot_id, source,
            body.node_cert, ephemeral, body.kek_version, timestamp(now),
            timestamp(now + timedelta(seconds=self.settings.request_ttl_seconds)), "pending")
        self.store.create_request(record, AuditEvent(
            "unseal.request", f"node:{body.node_id}", body.cluster_id,
            {"request_id": request_id, "node_id": body.node_id, "hostname": body.hostname,
             "boot_id": body.boot_id, "source": source, "kek_version": body.kek_version,
             "cert_serial": str(cert.serial_number)}))
        return self.status(request_id)

    def _state(self, request: RequestRecord) -> str:
        if request.state == "pending" and self.clock() > parse_timestamp(request.expires_at):
            return "expired"
        return request.state

    def _approvers(self, request_id: str) -> list[str]:
        return [a.custodian for a in self.store.list_approvals(request_id)
                if a.decision == "approve"]

    def _plan(self, request: RequestRecord) -> list[Release]:
        """Shares each retained version would release now: auto slots, then approvers'."""
        approvers = set(self._approvers(request.request_id))
        plan = []
        for version in self.store.list_key_versions(request.cluster_id):
            rows = self.store.get_shares(request.cluster_id, version.version)
            chosen = ([r for r in rows if r.holder == "auto"]
                      + [r for r in rows if r.holder in approvers])
            plan.append(Release(version, chosen[: version.policy.threshold]))
        return plan

    def status(self, request_id: str) -> RequestStatus:
        request = self.store.get_request(request_id)
        if request is None:
            raise RequestError("unknown_request", f"no request {request_id}",
                               "send a new unseal request", 404)
        state = self._state(request)
        plan = self._plan(request)
        newest = plan[0] if plan else None
        threshold = newest.version.policy.threshold if newest else 0
        needed = threshold - len(newest.shares) if newest else 0
        releases: list[ReleasedShare] = []
        if state == "pending":
            peer = X25519PublicKey.from_public_bytes(request.ephemeral_key)
            for release in plan:
                for share in release.shares:
                    mnemonic = self.vault.open_share(share).encode("ascii")
                    info = protocol.share_info(request_id, request.cluster_id, share.version,
                                               share.slot)
                    releases.append(ReleasedShare(
                        version=share.version, fingerprint=release.version.fingerprint,
                        slot=share.slot, holder=share.holder,
                        sealed_share=protocol.b64e(HPKE.encrypt(mnemonic, peer, info=info))))
                    del mnemonic
            if releases:
                self.on_release(self.store.record_releases(
                    request_id, [(r.version, r.slot, r.holder) for r in releases],
                    AuditEvent("unseal.release", "escrow", request.cluster_id,
                               {"request_id": request_id, "node_id": request.node_id})))
            if needed == 0:
                state = "ready"
        return RequestStatus(
            request_id=request_id, cluster_id=request.cluster_id, node_id=request.node_id,
            state=state,  # type: ignore[arg-type]
            created_at=request.created_at, expires_at=request.expires_at, threshold=threshold,
            needed=max(0, needed), approvals=self._approvers(request_id),
            denial_reason=request.reason if state == "denied" else "", releases=releases)

    def report(self, request_id: str, body: ResultReport) -> None:
        request = self.store.get_request(request_id)
        if request is None or request.node_id != body.node_id:
            raise RequestError("unknown_request", f"no request {request_id} for this node",
                               status=404)
        node = self._active_node(request.cluster_id, request.node_id)
        agent_key = _load_ec_public(node.agent_public_key_pem, "agent public key")
        if not protocol.verify(agent_key, body.signature, protocol.result_payload(
                request_id, body.node_id, body.outcome, body.version)):
            error = IdentityError("bad_signature", "the result's signature is invalid", "", 401)
            self._refuse("unseal.result", error, request.cluster_id, request_id=request_id)
            raise error
        event = AuditEvent("unseal.result", f"node:{body.node_id}", request.cluster_id,
                           {"request_id": request_id, "outcome": body.outcome,
                            "version": body.version})
        if body.outcome == "unlocked":
            self.store.set_request_state(request_id, "completed", "", event)
        else:
            self.store.append_audit(event)

    # -- custodians -------------------------------------------------------------------------

    def authenticate_custodian(self, key_id: str, date: str, signature: str, method: str,
                               path: str, body: bytes) -> str:
        """Check a custodian's signed HTTP request; return their name. ``key_id`` is the
        SHA-256 of the custodian's public key (DER), so the CLI needs no name setting."""
        matches = [c for c in self.store.list_custodians() if hmac.compare_digest(
            protocol.sha256_hex(protocol.public_der(custodian_keys.load_public(
                c.public_key_pem.encode("ascii")))), key_id)]
        if not matches:
            raise IdentityError("unknown_custodian", "no custodian is registered with this key",
                                "ask the admin to run `escrow custodian add NAME --public-key "
                                "FILE.pub` with your public key", 401)
        record = matches[0]
        name = record.name
        try:
            sent = datetime.fromtimestamp(int(date), tz=self.clock().tzinfo)
        except (ValueError, OverflowError, OSError):
            raise IdentityError("bad_date", "X-Escrow-Date is not a Unix time", "", 401) from None
        skew = abs(self.clock() - sent)
        if skew > CUSTODIAN_SKEW:
            raise IdentityError("clock_skew", f"your clock is {skew.total_seconds():.0f} s off "
                                "the escrow's", "synchronise it (NTP) and retry", 401)
        key = custodian_keys.load_public(record.public_key_pem.encode("ascii"))
        if not protocol.verify(key, signature,
                               protocol.custodian_http_payload(method, path, date, body)):
            raise IdentityError("bad_signature", "the request signature does not match your "
                                "registered key", "use the key registered for you", 401)
        if not self.replays.first_time(signature, self.clock()):
            raise IdentityError("replayed", "this signed request was already used", "", 401)
        return name

    def _pending_view(self, request: RequestRecord, custodian: str) -> PendingRequest:
        cert = x509.load_pem_x509_certificate(request.cert_pem.encode("ascii"))
        plan = self._plan(request)
        threshold = plan[0].version.policy.threshold if plan else 0
        needed = max(0, threshold - len(plan[0].shares)) if plan else 0
        eligible = any(custodian in r.version.policy.slots for r in plan)
        return PendingRequest(
            request_id=request.request_id, cluster_id=request.cluster_id,
            node_id=request.node_id, hostname=request.hostname, boot_id=request.boot_id,
            source=request.source, created_at=request.created_at, expires_at=request.expires_at,
            approvals=self._approvers(request.request_id), threshold=threshold, needed=needed,
            cert_not_after=cert.not_valid_after_utc.isoformat(),
            cert_sha256=protocol.sha256_hex(cert.public_bytes(serialization.Encoding.DER)),
            ephemeral_public_key=protocol.b64e(request.ephemeral_key), eligible=eligible)

    def pending(self, custodian: str) -> list[PendingRequest]:
        return [self._pending_view(r, custodian) for r in self.store.list_requests("pending")
                if self._state(r) == "pending"]

    def decide(self, custodian: str, request_id: str, decision: str, signature: str,
               reason: str = "") -> RequestStatus:
        request = self.store.get_request(request_id)
        if request is None:
            raise RequestError("unknown_request", f"no request {request_id}", status=404)

        def check() -> None:
            state = self._state(request)
            if state != "pending":
                raise RequestError("not_pending", f"request {request_id} is {state}",
                                   "only pending requests can be decided", 409)
            view = self._pending_view(request, custodian)
            if not view.eligible:
                raise IdentityError("not_a_custodian", f"{custodian} holds no share of "
                                    f"{request.cluster_id}", "only slot holders decide")
            key = custodian_keys.load_public(
                self.store.get_custodian(custodian).public_key_pem.encode("ascii"))
            if not protocol.verify(key, signature,
                                   protocol.approval_payload(decision, view, reason)):
                raise IdentityError("bad_signature", "the approval signature does not cover "
                                    "this request", "fetch the request again and re-sign", 401)

        self._audited(f"custodian.{decision}", request.cluster_id, check,
                      request_id=request_id, custodian=custodian)
        self.store.add_approval(
            ApprovalRecord(request_id, custodian, decision, signature, reason,
                           timestamp(self.clock())),
            AuditEvent(f"custodian.{decision}", f"custodian:{custodian}", request.cluster_id,
                       {"request_id": request_id, "node_id": request.node_id,
                        "signature": signature, "reason": reason}))
        return self.status(request_id)

    def export_share(self, custodian: str, cluster_id: str,
                     ephemeral_b64: str) -> ReleasedShare:
        ephemeral = _ephemeral(ephemeral_b64)
        versions = self.store.list_key_versions(cluster_id)
        if not versions:
            raise RequestError("no_key", f"{cluster_id} has no key deposited yet", status=404)
        newest = versions[0]
        mine = [s for s in self.store.get_shares(cluster_id, newest.version)
                if hmac.compare_digest(s.holder, custodian)]
        if not mine:
            error = IdentityError("not_a_custodian", f"{custodian} holds no share of version "
                                  f"{newest.version} of {cluster_id}",
                                  "only the holder of a slot can export it")
            self._refuse("share.export", error, cluster_id, custodian=custodian)
            raise error
        share = mine[0]
        info = protocol.share_info("export", cluster_id, share.version, share.slot)
        sealed = HPKE.encrypt(self.vault.open_share(share).encode("ascii"),
                              X25519PublicKey.from_public_bytes(ephemeral), info=info)
        self.store.append_audit(AuditEvent("share.export", f"custodian:{custodian}", cluster_id,
                                           {"version": share.version, "slot": share.slot}))
        return ReleasedShare(version=share.version, fingerprint=newest.fingerprint,
                             slot=share.slot, holder=share.holder,
                             sealed_share=protocol.b64e(sealed))
