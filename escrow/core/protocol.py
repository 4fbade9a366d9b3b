"""Wire messages of the /v1 API and the ONE canonical encoding every signature covers.

Messages are pydantic models that forbid unknown fields and coerce nothing, so a body is either
exactly what the schema says or a 400 (answers, :class:`Answer`, ignore fields they do not
know); the same models produce the OpenAPI document. What a signature covers is never "the
JSON": it is :func:`escrow.core.encoding.encode` of named fields under a domain tag, built only
by the ``*_payload`` functions below.

Two field names keep the API's first spelling for compatibility with deployed agents:
``sealed_key`` (a deposit's unlock key, HPKE-encrypted to the escrow's deposit key) and
``sealed_share`` (a released share, HPKE-encrypted to the request's ephemeral key). In the
code and the docs, HPKE *encrypts to*; only the token *wraps*.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Annotated, Literal, get_args
from urllib.parse import quote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from escrow.core import plaintext, states
from escrow.core.encoding import encode

API_VERSION = "v1"
MAX_PEM = 16 * 1024
HPKE_INFO_SHARE = "swarm-unseal/v1/share-release"
HPKE_INFO_DEPOSIT = "swarm-unseal/v1/deposit"
# RFC 9180 suite for released shares and deposits; `info` binds each ciphertext to its place.
HPKE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)

SwarmId = Annotated[str, Field(pattern=r"^[a-z0-9]{25}$")]
B64 = Annotated[str, Field(max_length=4096, pattern=r"^[A-Za-z0-9+/]*={0,2}$")]
# PEM is ASCII; the escrow encodes certificates as ASCII before parsing them.
Pem = Annotated[str, Field(max_length=MAX_PEM, pattern=r"^[\x00-\x7f]*$")]
# Integers that signatures and HPKE `info` cover travel as 8-byte fields (escrow.core.encoding).
Int63 = Annotated[int, Field(ge=0, le=2**63 - 1)]
# What a node or custodian writes for people to read (escrow.core.plaintext): refused with a 400
# naming the field unless it is plain text, a host name or a boot id. Bound plain text as
# Annotated[str, Field(max_length=N), PLAIN_TEXT], so the length is checked first.
PLAIN_TEXT = AfterValidator(plaintext.check_plain_text)
PlainText = Annotated[str, PLAIN_TEXT]
Hostname = Annotated[str, Field(min_length=1, max_length=plaintext.MAX_HOSTNAME,
                                description=f"the node's host name: {plaintext.HOSTNAME_RULE}"),
                     AfterValidator(plaintext.check_hostname)]
BootId = Annotated[str, Field(min_length=1, max_length=plaintext.MAX_BOOT_ID,
                              description=f"the node's boot id: {plaintext.BOOT_ID_RULE}"),
                   AfterValidator(plaintext.check_boot_id)]
KekVersion = Annotated[str, Field(max_length=32), PLAIN_TEXT]
Reason = Annotated[str, Field(min_length=1, max_length=500), PLAIN_TEXT]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Answer(Message):
    """What the escrow sends back: a field a newer escrow adds is ignored, so agents and
    custodian CLIs of the release before keep working while replicas are upgraded."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


# -- agent <-> escrow ---------------------------------------------------------------------

class NonceResponse(Answer):
    nonce: B64
    expires_at: str


class HealthResponse(Answer):
    status: Literal["ok"]
    store: Literal["sqlite", "postgresql"] | None = Field(
        default=None, description="the kind of database this replica keeps its data in "
                                  "(absent from older escrows)")
    writable: bool | None = Field(default=None, description="the database accepts writes "
                                  "(a replica on a read-only standby answers 503 instead)")


class InfoResponse(Answer):
    api: str
    deposit_public_key: B64 = Field(description="X25519 key that deposits are encrypted to")
    server_time: str


class EnrollRequest(Message):
    cluster_id: SwarmId
    node_id: SwarmId
    node_cert: Pem = Field(description="swarm-node.crt (PEM)")
    agent_public_key: Pem = Field(description="P-256 public key of the agent (PEM)")
    hostname: Hostname
    nonce: B64
    swarm_signature: B64 = Field(description="ECDSA/SHA-256 by the swarm node key, DER")
    agent_signature: B64 = Field(description="ECDSA/SHA-256 by the agent key, DER")


class EscrowedKey(Answer):
    version: int
    fingerprint: str


class EnrollResponse(Answer):
    cluster_id: str
    node_id: str
    enrolled_at: str
    keys: list[EscrowedKey] = Field(description="retained key versions, newest first")


class DepositRequest(Message):
    cluster_id: SwarmId
    node_id: SwarmId
    nonce: B64
    sealed_key: B64 = Field(description="HPKE ciphertext of the unlock key to the deposit key")
    signature: B64


class DepositResponse(Answer):
    version: int
    created: bool
    fingerprint: str


class UnsealRequest(Message):
    cluster_id: SwarmId
    node_id: SwarmId
    node_cert: Pem
    ephemeral_public_key: B64 = Field(description="X25519 public key (raw, 32 bytes)")
    hostname: Hostname
    boot_id: BootId
    kek_version: KekVersion = ""
    nonce: B64
    signature: B64


class ReleasedShare(Answer):
    version: Int63
    fingerprint: str
    slot: Int63
    holder: str
    sealed_share: B64 = Field(description="HPKE ciphertext of the SLIP-39 mnemonic")


# The wire spells states and outcomes as these literals, the values of the enums in
# escrow.core.states (checked below); an enum member's ``.value`` has the literal type.
RequestState = Literal["pending", "ready", "denied", "expired", "superseded", "completed",
                       "revoked"]
ResultOutcome = Literal["unlocked", "invalid_key", "failed"]
LockState = Literal["unlocked", "locked"]

for _literal, _enum in ((RequestState, states.RequestState), (ResultOutcome, states.Outcome),
                        (LockState, states.LockState)):
    if set(get_args(_literal)) != {member.value for member in _enum}:
        raise RuntimeError(f"the protocol and escrow.core.states disagree on {_enum.__name__}")


class RequestStatus(Answer):
    request_id: str
    cluster_id: str
    node_id: str
    state: RequestState
    created_at: str
    expires_at: str
    threshold: int
    needed: int = Field(description="shares still missing for the newest version")
    approvals: list[str]
    denial_reason: str = Field(default="", description="why a denied or revoked request ended")
    releases: list[ReleasedShare]


class ResultReport(Message):
    node_id: SwarmId
    outcome: ResultOutcome
    version: Int63
    signature: B64


class ResultResponse(Answer):
    recorded: bool


class HeartbeatRequest(Message):
    """An agent's periodic word that its node is up, signed by its agent key over a fresh
    nonce; ``goodbye`` is the last one, sent when the agent is stopped."""

    cluster_id: SwarmId
    node_id: SwarmId
    boot_id: BootId
    lock_state: LockState
    kek_version: KekVersion = ""
    agent_version: Annotated[str, Field(max_length=32), PLAIN_TEXT]
    uptime_seconds: Int63 = Field(description="seconds since the agent started")
    interval_seconds: Annotated[int, Field(ge=5, le=3600)] = Field(
        description="when the next beat is due; three missed make the node unreachable")
    goodbye: bool = False
    nonce: B64
    signature: B64


class HeartbeatResponse(Answer):
    recorded: bool


# -- custodians ---------------------------------------------------------------------------

class PendingRequest(Answer):
    request_id: str
    cluster_id: str
    node_id: str
    hostname: str
    boot_id: str
    source: str
    created_at: str
    expires_at: str
    approvals: list[str]
    threshold: int
    needed: int
    cert_not_after: str
    cert_sha256: str
    cert_serial: str = Field(default="",
                             description="the node certificate's serial number, in decimal")
    ephemeral_public_key: str
    eligible: bool = Field(description="whether the calling custodian holds a slot")
    approves_by_default_at: str = Field(
        default="", description="when the cluster's deny window approves the request unless a "
                                "custodian denies it first; '' when it waits for custodians")
    window_approvals: dict[str, str] = Field(
        default_factory=dict, description="the approvals a maintenance window gave: custodian "
                                          "-> window id")
    decided: bool = Field(default=False, description="whether the calling custodian has "
                                                     "approved or denied it already")


class ApproveRequest(Message):
    signature: B64 = Field(description="custodian's signature over approval_payload(...)")


# A power cut locks every manager of a cluster at once; one batch approves them all, each
# approval still signed over its own request's facts.
MAX_BATCH = 100


class BatchApproval(Message):
    request_id: str = Field(max_length=64, pattern=r"^[a-z0-9-]+$")
    signature: B64 = Field(description="custodian's signature over approval_payload(...) of "
                                       "this request")


class BatchApproveRequest(Message):
    cluster_id: SwarmId
    approvals: list[BatchApproval] = Field(min_length=1, max_length=MAX_BATCH)


class BatchOutcome(Answer):
    request_id: str
    state: RequestState | None = Field(description="the request's state once approved; null "
                                                   "when this approval was refused")
    approvals: list[str]
    error: str = Field(description="why this approval was refused ('' if it was not)")
    message: str


class BatchApproveResponse(Answer):
    batch_id: str
    results: list[BatchOutcome]


class DenyRequest(Message):
    reason: Reason
    signature: B64


class DecisionResponse(Answer):
    request_id: str
    state: RequestState
    approvals: list[str]


class ShareExportRequest(Message):
    cluster_id: SwarmId
    ephemeral_public_key: B64


# -- maintenance windows ------------------------------------------------------------------

WINDOW_ID_PATTERN = r"^w-[a-z0-9]{20}$"
WindowId = Annotated[str, Field(pattern=WINDOW_ID_PATTERN)]
MAX_WINDOW_NODES = 64
MAX_WINDOW_RESTARTS = 100
# The one spelling of escrow.core.timestamps.timestamp: a window's expiry is signed as text, so
# it must be the text the escrow compares (a second spelling of one moment would be another
# payload).
Moment = Annotated[str, Field(
    pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}\+00:00$")]
WindowStateName = Literal["open", "expired", "used", "closed"]

if set(get_args(WindowStateName)) != {member.value for member in states.WindowState}:
    raise RuntimeError("the protocol and escrow.core.states disagree on WindowState")


def _distinct(nodes: list[str]) -> list[str]:
    if len(set(nodes)) != len(nodes):
        raise ValueError("a node is named twice")
    return nodes


class WindowOpenRequest(Message):
    """A custodian's pre-approval of restarts of named nodes: the client makes the id and the
    absolute expiry, so every co-signer signs exactly these facts."""

    window_id: WindowId
    cluster_id: SwarmId
    nodes: Annotated[list[SwarmId], Field(min_length=1, max_length=MAX_WINDOW_NODES),
                     AfterValidator(_distinct)]
    restarts: Annotated[int, Field(ge=1, le=MAX_WINDOW_RESTARTS)]
    expires_at: Moment
    reason: Reason
    signature: B64 = Field(description="custodian's signature over window_payload(...)")


class WindowSignRequest(Message):
    signature: B64 = Field(description="co-signer's signature over window_payload(...) of the "
                                       "window as shown")


class WindowCloseRequest(Message):
    pass


class WindowView(Answer):
    window_id: str
    cluster_id: str
    nodes: list[str] = Field(description="node ids, sorted")
    restarts: int
    used: int
    expires_at: str
    reason: str = Field(description="as the opening custodian wrote it: untrusted text")
    created_at: str
    closed_at: str
    closed_by: str
    signers: list[str] = Field(description="each counts as one approval, in signing order")
    state: WindowStateName


# The share drill (escrow.core.drill): a custodian proves their paper share matches the
# escrow's copy without sending it.
MAX_DRILL_PROOFS = 64


class DrillSlot(Answer):
    version: Int63
    version_created_at: str
    slot: Int63
    custodian: str
    last_ok_at: str | None = Field(description="the last successful drill; null: never")


class ShareDrills(Answer):
    cluster_id: str
    custodian: str = Field(description="the calling custodian: the slots named so are theirs")
    newest: Int63 = Field(description="the cluster's newest key version")
    slots: list[DrillSlot] = Field(description="every custodian slot of every retained "
                                               "version, newest first")


class ShareProof(Message):
    version: Int63
    slot: Int63
    proof: B64 = Field(description="HMAC-SHA256 of escrow.core.drill.proof, 32 bytes")


class ShareVerifyRequest(Message):
    cluster_id: SwarmId
    nonce: B64 = Field(description="a fresh nonce from POST /v1/nonce, used once")
    proofs: list[ShareProof] = Field(min_length=1, max_length=MAX_DRILL_PROOFS)


class DrillResult(Answer):
    version: Int63
    slot: Int63
    match: bool


class ShareVerifyResponse(Answer):
    cluster_id: str
    newest: Int63 = Field(description="the cluster's newest key version")
    results: list[DrillResult]


def _encodable(value: object) -> object:
    """Error texts may quote what a client sent (an unknown field's name, say); a lone
    surrogate from a JSON escape would make the error itself unserialisable."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


Text = Annotated[str, BeforeValidator(_encodable)]


# Where the ``type`` of every problem points: under the reserved .invalid domain (RFC 6761)
# the URI is absolute and unique per reason, as RFC 9457 asks, yet no one can ever serve
# something else at it, and nothing resolves it by mistake (README, "The API").
PROBLEM_TYPES = "https://swarm-unseal.invalid/problems/"
PROBLEM_JSON = "application/problem+json"


def problem_type(reason: str) -> str:
    return PROBLEM_TYPES + quote(reason, safe="")


def problem_title(reason: str) -> str:
    """The title of a reason's problem type: the same for every occurrence (RFC 9457)."""
    return reason.replace("_", " ").capitalize()


class ErrorResponse(Answer):
    """Every error answer, as RFC 9457 problem details (application/problem+json): ``type``,
    ``title``, ``status`` and ``detail``, with this escrow's ``error`` (the stable reason, the
    last segment of ``type``), ``message`` (= ``detail``) and ``hint`` as extension members,
    which agents and CLIs read."""

    type: Text = Field(json_schema_extra={"format": "uri"},
                       description=f"{PROBLEM_TYPES}<error>: the problem type")
    title: Text = Field(description="the reason in words, the same for every occurrence")
    status: int = Field(ge=400, le=599, description="the HTTP status of the answer")
    detail: Text = Field(description="what happened this time (the same as message)")
    error: Text = Field(description="the reason: a stable machine code")
    message: Text
    hint: Text = Field(description="what to do next (may be empty)")


# -- what signatures cover ----------------------------------------------------------------

def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def enroll_payload(cluster_id: str, node_id: str, cert_der: bytes, agent_key_der: bytes,
                   hostname: str, nonce: bytes) -> bytes:
    return encode("swarm-unseal/v1/enroll", cluster_id, node_id, cert_der, agent_key_der,
                  hostname, nonce)


def deposit_payload(cluster_id: str, node_id: str, nonce: bytes, sealed_key: bytes) -> bytes:
    return encode("swarm-unseal/v1/deposit", cluster_id, node_id, nonce, sealed_key)


def unseal_payload(cluster_id: str, node_id: str, cert_der: bytes, ephemeral_key: bytes,
                   hostname: str, boot_id: str, kek_version: str, nonce: bytes) -> bytes:
    return encode("swarm-unseal/v1/unseal", cluster_id, node_id, cert_der, ephemeral_key,
                  hostname, boot_id, kek_version, nonce)


def result_payload(request_id: str, node_id: str, outcome: str, version: int) -> bytes:
    return encode("swarm-unseal/v1/result", request_id, node_id, outcome, version)


def heartbeat_payload(beat: HeartbeatRequest, nonce: bytes) -> bytes:
    return encode("swarm-unseal/v1/heartbeat", beat.cluster_id, beat.node_id, beat.boot_id,
                  beat.lock_state, beat.kek_version, beat.agent_version, beat.uptime_seconds,
                  beat.interval_seconds, int(beat.goodbye), nonce)


def approval_payload(decision: str, request: PendingRequest, reason: str = "") -> bytes:
    """What a custodian signs: every fact shown to them about the request, so an approval
    given for one set of facts (node, hostname, boot, source address, certificate, the agent's
    one-time key, expiry) is worth nothing for another."""
    return encode("swarm-unseal/v2/approval", decision, request.request_id, request.cluster_id,
                  request.node_id, request.hostname, request.boot_id, request.source,
                  request.cert_sha256, request.ephemeral_public_key, request.expires_at, reason)


def window_payload(window_id: str, cluster_id: str, nodes: list[str] | tuple[str, ...],
                   restarts: int, expires_at: str, reason: str) -> bytes:
    """What a custodian signs to open or co-sign a maintenance window: each signature is that
    custodian's approval of up to ``restarts`` requests of these nodes until ``expires_at``."""
    ordered = sorted(nodes)
    return encode("swarm-unseal/v2/window", window_id, cluster_id, len(ordered), *ordered,
                  restarts, expires_at, reason)


def custodian_http_payload(method: str, path: str, date: str, nonce: str,
                           body: bytes) -> bytes:
    """What a custodian's HTTP request signature covers. ``nonce`` (X-Escrow-Nonce) is the
    client's own random value, so two identical requests in one second are two requests, and
    the escrow's replay guard can key on what was signed."""
    return encode("swarm-unseal/v2/custodian-http", method.upper(), path, date, nonce,
                  hashlib.sha256(body).digest())


def share_info(request_id: str, cluster_id: str, version: int, slot: int) -> bytes:
    return encode(HPKE_INFO_SHARE, request_id, cluster_id, version, slot)


def deposit_info(cluster_id: str, node_id: str, nonce: bytes) -> bytes:
    return encode(HPKE_INFO_DEPOSIT, cluster_id, node_id, nonce)


# -- helpers both sides use ---------------------------------------------------------------

def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    """Decode base64; raises ValueError on anything else."""
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64") from exc


def sign(key: ec.EllipticCurvePrivateKey, payload: bytes) -> str:
    return b64e(key.sign(payload, ec.ECDSA(hashes.SHA256())))


# Order of P-256's group: an ECDSA signature (r, s) verifies exactly when (r, n - s) does.
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def normalize_signature(signature_b64: str) -> bytes | None:
    """The one canonical form of a P-256 ECDSA signature: strict DER with the low s of the two
    twins (BIP 62's rule). None for anything that is not such a signature. Re-spelled base64,
    a different DER length encoding and the high-s twin all normalise to the same bytes, so
    nothing keyed on a signature can be fooled by a second spelling of it."""
    try:
        raw = b64d(signature_b64)
        r, s = decode_dss_signature(raw)
    except ValueError:
        return None
    if not (0 < r < _P256_ORDER and 0 < s < _P256_ORDER):
        return None
    return encode_dss_signature(r, min(s, _P256_ORDER - s))


def verify(public_key: ec.EllipticCurvePublicKey, signature_b64: str, payload: bytes) -> bool:
    canonical = normalize_signature(signature_b64)
    if canonical is None:
        return False
    try:
        public_key.verify(canonical, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def public_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def public_pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
