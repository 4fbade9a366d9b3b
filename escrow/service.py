"""The escrow's request handling: enrollment, deposits, unseal requests, custodian decisions.

Synchronous and free of HTTP: the server runs every call on the one thread that owns the token
and the database, and maps the exceptions raised here to statuses. Each request is handled in
two stages (:class:`Escrow`): refusals before the caller is identified are counted, never
written; refusals after it are audited (docs/threat-model.md, "Anyone who can reach the
escrow").
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from escrow import custodian_keys, identity
from escrow.audit import AuditEvent
from escrow.config import ServerSettings
from escrow.core import protocol, unlockkey
from escrow.core.encoding import encode
from escrow.core.errors import (
    DiskFull,
    EscrowError,
    IdentityError,
    InputError,
    RequestError,
    reason_of,
)
from escrow.core.protocol import (
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
from escrow.core.states import Decision, NodeStatus, Outcome, RequestState
from escrow.core.timestamps import parse_timestamp, timestamp
from escrow.nonces import NONCE_SIZE, NonceMinter, SeenOnce
from escrow.store import (
    ApprovalRecord,
    KeyVersionRecord,
    NodeRecord,
    RequestRecord,
    ShareRecord,
)
from escrow.stored_secrets import DEPOSIT_KEY, NONCE_KEY, wrapped_secret
from escrow.vault import DepositResult, Vault

CUSTODIAN_SKEW = timedelta(minutes=5)
# Used nonces and custodian requests remembered at once: far above what rate-limited
# identified callers can use within a nonce's lifetime, and a few MiB at most.
SEEN_CAPACITY = 100_000
# Requests whose released shares are kept encrypted, so polling never unwraps twice.
RELEASE_CACHE = 10_000
log = logging.getLogger("escrow.service")

T = TypeVar("T")
Unidentified = Callable[[str, str, str], None]  # (action, reason, source)


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


def _stale() -> IdentityError:
    return IdentityError("stale_nonce", "the nonce is unknown, used or expired",
                         "fetch a fresh one from POST /v1/nonce", 401)


@dataclass(frozen=True)
class Release:
    version: KeyVersionRecord
    shares: list[ShareRecord]


class Escrow:
    """Every request kind in two stages. *Identification* (the caller proves who it is: a
    signature by an enrolled key over a fresh nonce, or a custodian's signed request) refuses
    without writing anything: it counts through ``on_unidentified``. Everything after it is
    done by an identified party, and its refusals are audited."""

    def __init__(self, vault: Vault, settings: ServerSettings,
                 on_release: Callable[[int], None] = lambda count: None,
                 room: Callable[[], None] = lambda: None,
                 on_unidentified: Unidentified = lambda action, reason, source: None,
                 on_alert: Callable[[AuditEvent], None] = lambda event: None,
                 for_release: Callable[[], None] = lambda: None) -> None:
        self.vault = vault
        self.on_release = on_release  # gets the count of shares released for the first time
        self.room = room  # raises DiskFull when new data must be refused (escrow.diskspace)
        self.on_unidentified = on_unidentified
        self.on_alert = on_alert  # an audited event on-call should hear about (webhook)
        # Called before an identified party's write on the way to a release (the request, the
        # release, an approval, the result): the disk reserve is for these alone.
        self.for_release = for_release
        self.store = vault.store
        self.settings = settings
        self.clock = vault.clock
        self._used_nonces = SeenOnce(SEEN_CAPACITY)
        self._custodian_requests = SeenOnce(SEEN_CAPACITY)
        self._released: OrderedDict[str, dict[tuple[int, int], ReleasedShare]] = OrderedDict()
        self._deposit_key = X25519PrivateKey.from_private_bytes(
            wrapped_secret(self.store, vault.wrapper, DEPOSIT_KEY,
                           lambda: X25519PrivateKey.generate().private_bytes_raw()))
        # The used nonces live in this process's memory, so a nonce must not outlive it: the
        # stored secret is mixed with one of this process's start, and a restart voids every
        # nonce issued before (agents just fetch new ones). Replicas sharing nonces will need
        # the used set in the store first.
        stored = wrapped_secret(self.store, vault.wrapper, NONCE_KEY,
                                lambda: secrets.token_bytes(32))
        self.nonces = NonceMinter(hmac.new(stored, secrets.token_bytes(32), "sha256").digest(),
                                  vault.clock)

    # -- set-up -----------------------------------------------------------------------------

    @property
    def deposit_public_key(self) -> bytes:
        return self._deposit_key.public_key().public_bytes_raw()

    def check_health(self) -> None:
        """Raise unless the database answers and the token opens a share-sized test value."""
        self.store.get_meta(DEPOSIT_KEY)
        self.vault.wrapper.unwrap(self.vault.wrapper.wrap(b"health", b"health"), b"health")

    # -- the two stages ---------------------------------------------------------------------

    def _identify(self, action: str, source: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except EscrowError as error:
            self.on_unidentified(action, reason_of(error), source)
            raise

    def _audited(self, action: str, cluster_id: str, call: Callable[[], T],
                 **details: object) -> T:
        try:
            return call()
        except EscrowError as error:
            self._refuse(action, error, cluster_id, **details)
            raise

    def _refuse(self, action: str, error: EscrowError, cluster_id: str, **details: object) -> None:
        """Audit an identified party's refusal, unless the disk is too full for new data:
        then the refusal goes to the log only, and the space stays for releases."""
        event = AuditEvent(f"{action}.refused", "escrow", cluster_id,
                           {"reason": reason_of(error), "message": error.message, **details})
        try:
            self.room()
            self.store.append_audit(event)
        except DiskFull:
            log.warning("not audited for lack of disk space: %s refused (%s) in %s",
                        action, reason_of(error), cluster_id or "-")

    def _fresh(self, nonce_b64: str) -> tuple[bytes, datetime]:
        """An authentic, unexpired server nonce (not yet checked for reuse)."""
        nonce = _b64(nonce_b64, "nonce", NONCE_SIZE)
        expires = self.nonces.expiry(nonce)
        if expires is None:
            raise _stale()
        return nonce, expires

    def _use_once(self, guard: SeenOnce, key: bytes, expires: datetime) -> None:
        now = self.clock()
        if guard.first_time(key, expires, now):
            return
        if guard.full(now):
            raise RequestError("busy", "the escrow is tracking too many signed requests at once",
                               "retry in a minute", 503, retry_after=60)
        raise _stale()

    def _node(self, cluster_id: str, node_id: str) -> NodeRecord:
        self.store.get_cluster(cluster_id)
        node = self.store.get_node(cluster_id, node_id)
        if node is None:
            raise IdentityError("unknown_node", f"node {node_id} is not enrolled in {cluster_id}",
                                "enroll it with `unseal-agent enroll` while it is unlocked")
        return node

    @staticmethod
    def _not_revoked(node: NodeRecord) -> None:
        if node.status != NodeStatus.ACTIVE:
            raise IdentityError("revoked", f"node {node.node_id} is revoked",
                                "an admin can re-admit it with `escrow node allow`")

    @staticmethod
    def _signed_by(node: NodeRecord, signature: str, payload: bytes, what: str) -> None:
        agent_key = _load_ec_public(node.agent_public_key_pem, "agent public key")
        if not protocol.verify(agent_key, signature, payload):
            raise IdentityError("bad_signature", f"the {what}'s signature is invalid",
                                "sign with the agent key registered at enrollment", 401)

    # -- enrollment and deposit -------------------------------------------------------------

    def enroll(self, body: EnrollRequest, source: str) -> EnrollResponse:
        cert, agent_key = self._identify("enroll", source, lambda: self._identify_enroll(body))
        return self._audited("enroll", body.cluster_id,
                             lambda: self._enroll(body, cert, agent_key),
                             node_id=body.node_id, hostname=body.hostname, source=source)

    def _identify_enroll(self, body: EnrollRequest
                         ) -> tuple[x509.Certificate, ec.EllipticCurvePublicKey]:
        """The swarm's own CA vouches for the certificate, its key and the new agent key both
        signed this enrollment, over a fresh nonce."""
        cluster = self.store.get_cluster(body.cluster_id)
        nonce, expires = self._fresh(body.nonce)
        cert = identity.parse_node_cert(body.node_cert.encode("ascii"))
        identity.check_issuer(cert, cluster.root_ca_pem.encode("ascii"), body.cluster_id)
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
        self._use_once(self._used_nonces, nonce, expires)
        return cert, agent_key

    def _enroll(self, body: EnrollRequest, cert: x509.Certificate,
                agent_key: ec.EllipticCurvePublicKey) -> EnrollResponse:
        identity.check_claims(cert, body.cluster_id, body.node_id, self.clock())
        existing = self.store.get_node(body.cluster_id, body.node_id)
        if existing is not None:
            self._not_revoked(existing)
        self.room()
        now = timestamp(self.clock())
        self.store.enroll_node(
            NodeRecord(body.cluster_id, body.node_id, protocol.public_pem(agent_key),
                       body.hostname, now, NodeStatus.ACTIVE),
            AuditEvent("node.enroll", f"node:{body.node_id}", body.cluster_id,
                       {"node_id": body.node_id, "hostname": body.hostname,
                        "agent_key_sha256": protocol.sha256_hex(protocol.public_der(agent_key)),
                        "reenrolled": existing is not None}))
        versions = self.store.list_key_versions(body.cluster_id)
        return EnrollResponse(cluster_id=body.cluster_id, node_id=body.node_id, enrolled_at=now,
                              keys=[protocol.EscrowedKey(version=v.version,
                                                         fingerprint=v.fingerprint)
                                    for v in versions])

    def deposit(self, body: DepositRequest, source: str) -> DepositResult:
        node, nonce, sealed = self._identify("deposit", source,
                                             lambda: self._identify_deposit(body))
        return self._audited("deposit", body.cluster_id,
                             lambda: self._deposit(body, node, nonce, sealed),
                             node_id=body.node_id, source=source)

    def _identify_deposit(self, body: DepositRequest) -> tuple[NodeRecord, bytes, bytes]:
        node = self._node(body.cluster_id, body.node_id)
        nonce, expires = self._fresh(body.nonce)
        sealed = _b64(body.sealed_key, "sealed_key")
        self._signed_by(node, body.signature, protocol.deposit_payload(
            body.cluster_id, body.node_id, nonce, sealed), "deposit")
        self._use_once(self._used_nonces, nonce, expires)
        return node, nonce, sealed

    def _deposit(self, body: DepositRequest, node: NodeRecord, nonce: bytes,
                 sealed: bytes) -> DepositResult:
        self._not_revoked(node)
        self.room()
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
        versions = self.store.list_key_versions(body.cluster_id)
        actor = f"node:{body.node_id}"
        if key.fingerprint(body.cluster_id) not in {v.fingerprint for v in versions}:
            self._may_add_version(body.cluster_id, actor, len(versions))
        return Vault(self.store, self.vault.wrapper, self.clock, actor).deposit(body.cluster_id,
                                                                               key)

    def _may_add_version(self, cluster_id: str, actor: str, retained: int) -> None:
        """A node may add only so many new versions, so junk deposits can neither push the
        real key out of reach nor make every unseal try hundreds of keys."""
        limit = self.settings.max_versions
        if retained >= limit:
            self.on_alert(AuditEvent("key.versions_full", actor, cluster_id,
                                     {"retained": retained, "limit": limit}))
            raise RequestError("too_many_versions",
                               f"cluster {cluster_id} already retains {retained} key versions, "
                               f"the most this escrow keeps (keys.max_versions = {limit})",
                               "an admin checks `escrow key list` (junk deposits from a node "
                               "are a sign of compromise) and prunes with `escrow key prune`",
                               409)
        window = self.settings.node_deposit_window_seconds
        since = timestamp(self.clock() - timedelta(seconds=window))
        if self.store.count_audit_since("key.deposit", actor,
                                        since) >= self.settings.node_deposit_limit:
            raise RequestError("rate_limited",
                               f"{actor} deposited {self.settings.node_deposit_limit} new key "
                               f"versions in the last {window:g} s",
                               "rotate less often; the agent deposits again by itself later",
                               429, retry_after=window)

    # -- unseal requests --------------------------------------------------------------------

    def unseal(self, body: UnsealRequest, source: str) -> RequestStatus:
        node, cert, ephemeral = self._identify("unseal", source,
                                               lambda: self._identify_unseal(body))
        return self._audited("unseal", body.cluster_id,
                             lambda: self._unseal(body, node, cert, ephemeral, source),
                             node_id=body.node_id, hostname=body.hostname, source=source)

    def _identify_unseal(self, body: UnsealRequest
                         ) -> tuple[NodeRecord, x509.Certificate, bytes]:
        node = self._node(body.cluster_id, body.node_id)
        nonce, expires = self._fresh(body.nonce)
        ephemeral = _ephemeral(body.ephemeral_public_key)
        cert = identity.parse_node_cert(body.node_cert.encode("ascii"))
        self._signed_by(node, body.signature, protocol.unseal_payload(
            body.cluster_id, body.node_id, cert.public_bytes(serialization.Encoding.DER),
            ephemeral, body.hostname, body.boot_id, body.kek_version, nonce), "request")
        self._use_once(self._used_nonces, nonce, expires)
        return node, cert, ephemeral

    def _unseal(self, body: UnsealRequest, node: NodeRecord, cert: x509.Certificate,
                ephemeral: bytes, source: str) -> RequestStatus:
        self._not_revoked(node)
        cluster = self.store.get_cluster(body.cluster_id)
        now = self.clock()
        identity.check_issuer(cert, cluster.root_ca_pem.encode("ascii"), body.cluster_id)
        identity.check_claims(cert, body.cluster_id, body.node_id, now)
        since = timestamp(now - timedelta(seconds=self.settings.rate_window_seconds))
        if self.store.count_requests_since(body.cluster_id, body.node_id,
                                           since) >= self.settings.rate_limit:
            raise RequestError("rate_limited",
                               f"node {body.node_id} made {self.settings.rate_limit} requests "
                               f"in {self.settings.rate_window_seconds:g} s",
                               "wait and retry; an agent backs off by itself", 429,
                               retry_after=self.settings.rate_window_seconds)
        request_id = "r-" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                                    for _ in range(20))
        self.for_release()
        record = RequestRecord(
            request_id, body.cluster_id, body.node_id, body.hostname, body.boot_id, source,
            body.node_cert, ephemeral, body.kek_version, timestamp(now),
            timestamp(now + timedelta(seconds=self.settings.request_ttl_seconds)),
            RequestState.PENDING)
        self.store.create_request(record, AuditEvent(
            "unseal.request", f"node:{body.node_id}", body.cluster_id,
            {"request_id": request_id, "node_id": body.node_id, "hostname": body.hostname,
             "boot_id": body.boot_id, "source": source, "kek_version": body.kek_version,
             "cert_serial": str(cert.serial_number)}))
        return self.status(request_id)

    def _state(self, request: RequestRecord) -> RequestState:
        if (request.state == RequestState.PENDING
                and self.clock() > parse_timestamp(request.expires_at)):
            return RequestState.EXPIRED
        return request.state

    def _approvers(self, request_id: str) -> list[str]:
        return [a.custodian for a in self.store.list_approvals(request_id)
                if a.decision == Decision.APPROVE]

    def _plan(self, request: RequestRecord) -> list[Release]:
        """Shares each retained version would release now: auto slots, then approvers'. Only
        the newest ``keys.max_versions`` versions are offered."""
        approvers = set(self._approvers(request.request_id))
        plan = []
        versions = self.store.list_key_versions(request.cluster_id)
        for version in versions[: self.settings.max_versions]:
            rows = self.store.get_shares(request.cluster_id, version.version)
            chosen = ([r for r in rows if r.holder == "auto"]
                      + [r for r in rows if r.holder in approvers])
            plan.append(Release(version, chosen[: version.policy.threshold]))
        return plan

    def _encrypt_to(self, request: RequestRecord, plan: list[Release]
                    ) -> tuple[list[ReleasedShare], list[ReleasedShare]]:
        """The planned shares encrypted to the request's key, and which of them are new. Each
        share is unwrapped once per request: a poll returns the same ciphertexts without
        touching the token or writing anything."""
        done = self._released.setdefault(request.request_id, {})
        self._released.move_to_end(request.request_id)
        while len(self._released) > RELEASE_CACHE:
            self._released.popitem(last=False)
        peer = X25519PublicKey.from_public_bytes(request.ephemeral_key)
        fresh = []
        for release in plan:
            for share in release.shares:
                if (share.version, share.slot) in done:
                    continue
                mnemonic = self.vault.unwrap_share(share).encode("ascii")
                info = protocol.share_info(request.request_id, request.cluster_id,
                                           share.version, share.slot)
                done[(share.version, share.slot)] = ReleasedShare(
                    version=share.version, fingerprint=release.version.fingerprint,
                    slot=share.slot, holder=share.holder,
                    sealed_share=protocol.b64e(HPKE.encrypt(mnemonic, peer, info=info)))
                del mnemonic
                fresh.append(done[(share.version, share.slot)])
        return [done[(s.version, s.slot)] for r in plan for s in r.shares], fresh

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
        if state == RequestState.PENDING:
            releases, fresh = self._encrypt_to(request, plan)
            if fresh:
                self.for_release()
                self.on_release(self.store.record_releases(
                    request_id, [(r.version, r.slot, r.holder) for r in fresh],
                    AuditEvent("unseal.release", "escrow", request.cluster_id,
                               {"request_id": request_id, "node_id": request.node_id})))
            if needed == 0:
                state = RequestState.READY
        else:
            self._released.pop(request_id, None)
        return RequestStatus(
            request_id=request_id, cluster_id=request.cluster_id, node_id=request.node_id,
            state=state.value,
            created_at=request.created_at, expires_at=request.expires_at, threshold=threshold,
            needed=max(0, needed), approvals=self._approvers(request_id),
            denial_reason=request.reason if state == RequestState.DENIED else "",
            releases=releases)

    def report(self, request_id: str, body: ResultReport, source: str) -> None:
        request, node = self._identify("unseal.result", source,
                                       lambda: self._identify_report(request_id, body))
        self._audited("unseal.result", request.cluster_id,
                      lambda: self._report(request, node, body),
                      request_id=request_id, node_id=body.node_id, outcome=body.outcome,
                      version=body.version)

    def _identify_report(self, request_id: str, body: ResultReport
                         ) -> tuple[RequestRecord, NodeRecord]:
        request = self.store.get_request(request_id)
        if request is None or not hmac.compare_digest(request.node_id, body.node_id):
            raise RequestError("unknown_request", f"no request {request_id} for this node",
                               status=404)
        node = self._node(request.cluster_id, request.node_id)
        self._signed_by(node, body.signature, protocol.result_payload(
            request_id, body.node_id, body.outcome, body.version), "result")
        return request, node

    def _report(self, request: RequestRecord, node: NodeRecord, body: ResultReport) -> None:
        """One outcome per version, and only about shares this request was given: a replayed
        report changes nothing, and no report turns a denied request into a completed one."""
        self._not_revoked(node)
        outcome = Outcome(body.outcome)
        reported = self.store.list_results(request.request_id).get(body.version)
        # After the unlock, stragglers (the versions tried before it) and retries still count.
        late = request.state == RequestState.COMPLETED and (outcome != Outcome.UNLOCKED
                                                            or reported == Outcome.UNLOCKED)
        if request.state != RequestState.PENDING and not late:
            raise RequestError("not_pending", f"request {request.request_id} is "
                               f"{request.state}: no result is taken for it",
                               "results are reported only for requests that released shares",
                               409)
        if body.version not in {v for v, _, _ in self.store.list_releases(request.request_id)}:
            raise RequestError("not_released", f"request {request.request_id} was given no "
                               f"share of version {body.version}",
                               "report only versions the request released", 409)
        self.for_release()
        earlier = self.store.record_result(
            request.request_id, body.version, outcome,
            AuditEvent("unseal.result", f"node:{body.node_id}", request.cluster_id,
                       {"request_id": request.request_id, "outcome": body.outcome,
                        "version": body.version}))
        if earlier is not None and earlier != outcome:
            raise RequestError("already_reported", f"version {body.version} of request "
                               f"{request.request_id} was reported {earlier} already",
                               "each version's outcome is reported once", 409)
        if earlier is None and outcome == Outcome.UNLOCKED:
            self._unconfirmed(request, body.version)

    def _unconfirmed(self, request: RequestRecord, version: int) -> None:
        """Newer versions that this node was given and that did not unlock it: expected once
        for a node that was down during a rotation, otherwise a deposit that was never the
        swarm's key (a junk deposit from a compromised node)."""
        refused = sorted(v for v, outcome in self.store.list_results(request.request_id).items()
                         if outcome == Outcome.INVALID_KEY and v > version)
        if refused:
            event = AuditEvent("key.unconfirmed", "escrow", request.cluster_id,
                               {"request_id": request.request_id, "node_id": request.node_id,
                                "unlocked_with": version, "refused_versions": refused})
            self.store.append_audit(event)
            self.on_alert(event)

    # -- custodians -------------------------------------------------------------------------

    def authenticate_custodian(self, key_id: str, date: str, nonce: str, signature: str,
                               method: str, path: str, body: bytes, source: str = "") -> str:
        """Check a custodian's signed HTTP request; return their name. ``key_id`` is the
        SHA-256 of the custodian's public key (DER), so the CLI needs no name setting."""
        return self._identify("custodian", source, lambda: self._custodian(
            key_id, date, nonce, signature, method, path, body))

    def _custodian(self, key_id: str, date: str, nonce: str, signature: str, method: str,
                   path: str, body: bytes) -> str:
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
            self._use_once(self._custodian_requests, seen, now + 2 * CUSTODIAN_SKEW)
        except IdentityError:
            raise IdentityError("replayed", "this signed request was already used",
                                "sign a new request (the CLI does so for every call)",
                                401) from None
        return record.name

    def _holds_slot(self, custodian: str, cluster_id: str) -> bool:
        """Whether ``custodian`` holds a slot of the cluster's policy or of a retained
        version (a request can release shares of either)."""
        cluster = self.store.get_cluster(cluster_id)
        policies = [cluster.policy] + [v.policy for v in self.store.list_key_versions(
            cluster_id)[: self.settings.max_versions]]
        return any(custodian in policy.slots for policy in policies)

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

    def _live(self) -> list[RequestRecord]:
        return [r for r in self.store.list_requests(RequestState.PENDING)
                if self._state(r) == RequestState.PENDING]

    def pending(self, custodian: str) -> list[PendingRequest]:
        """Live requests of the clusters where ``custodian`` holds a slot: what a node sent
        (hostname, source address, boot id) is shown to those who decide on it, no one else."""
        mine: dict[str, bool] = {}
        views = []
        for request in self._live():
            if request.cluster_id not in mine:
                mine[request.cluster_id] = self._holds_slot(custodian, request.cluster_id)
            if mine[request.cluster_id]:
                views.append(self._pending_view(request, custodian))
        return views

    def awaiting_approval(self) -> int:
        """Live requests still short of shares (for the metrics)."""
        count = 0
        for request in self._live():
            plan = self._plan(request)
            if plan and len(plan[0].shares) < plan[0].version.policy.threshold:
                count += 1
        return count

    def decide(self, custodian: str, request_id: str, decision: Decision, signature: str,
               reason: str = "") -> RequestStatus:
        request = self.store.get_request(request_id)
        if request is None:
            raise RequestError("unknown_request", f"no request {request_id}", status=404)

        def check() -> None:
            # Eligibility first: the request's state is none of a non-holder's business.
            view = self._pending_view(request, custodian)
            if not view.eligible:
                raise IdentityError("not_a_custodian", f"{custodian} holds no share of "
                                    f"{request.cluster_id}", "only slot holders decide")
            state = self._state(request)
            if state != RequestState.PENDING:
                raise RequestError("not_pending", f"request {request_id} is {state}",
                                   "only pending requests can be decided", 409)
            key = custodian_keys.load_public(
                self.store.get_custodian(custodian).public_key_pem.encode("ascii"))
            if not protocol.verify(key, signature,
                                   protocol.approval_payload(decision, view, reason)):
                raise IdentityError("bad_signature", "the approval signature does not cover "
                                    "this request", "fetch the request again and re-sign", 401)

        self._audited(f"custodian.{decision}", request.cluster_id, check,
                      request_id=request_id, custodian=custodian)
        self.for_release()
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
        sealed = HPKE.encrypt(self.vault.unwrap_share(share).encode("ascii"),
                              X25519PublicKey.from_public_bytes(ephemeral), info=info)
        self.store.append_audit(AuditEvent("share.export", f"custodian:{custodian}", cluster_id,
                                           {"version": share.version, "slot": share.slot}))
        return ReleasedShare(version=share.version, fingerprint=newest.fingerprint,
                             slot=share.slot, holder=share.holder,
                             sealed_share=protocol.b64e(sealed))
