"""The agent's client of the escrow API: TLS pinned to the escrow's CA, every message signed.

Signatures are made over escrow.core.protocol's canonical payloads; the unseal request carries a
fresh X25519 key to which the escrow encrypts every released share.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.x509 import load_pem_x509_certificate
from pydantic import BaseModel, ValidationError

from agent import deposit_key
from agent.errors import EscrowRejected, EscrowUnavailable
from agent.https import HttpError, Origin
from escrow.core import protocol
from escrow.core.plaintext import plain
from escrow.core.protocol import (
    HPKE,
    DepositResponse,
    EnrollResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    InfoResponse,
    NonceResponse,
    RequestStatus,
    ResultOutcome,
)
from escrow.core.tls import client_context
from escrow.core.unlockkey import UnlockKey

M = TypeVar("M", bound=BaseModel)


def _cert_der(cert_pem: str) -> bytes:
    return load_pem_x509_certificate(cert_pem.encode("ascii")).public_bytes(
        serialization.Encoding.DER)


def parse_answer(status: int, text: str, model: type[M]) -> M:
    """The escrow's answer as ``model``, or the AgentError it amounts to. Pure: whatever the
    escrow (or a proxy in between) sent, nothing else is raised; what an error quotes of it
    is plain text (escrow.core.plaintext.plain), for the journal and the operator's terminal."""
    if status >= 500:
        raise EscrowUnavailable(f"the escrow cannot serve now ({status}): "
                                f"{_error_message(text)}",
                                "the agent retries by itself once the escrow recovers")
    if status >= 400:
        try:
            error = json.loads(text)
            raise EscrowRejected(status, plain(error.get("error", "")),
                                 plain(error.get("message", "")), plain(error.get("hint", "")))
        except (ValueError, AttributeError, RecursionError):
            raise EscrowRejected(status, "unknown", plain(text[:200])) from None
    try:
        return model.model_validate_json(text)
    except ValidationError:
        raise EscrowUnavailable("the escrow's answer does not match the protocol",
                                "check that agent and escrow versions match") from None


class EscrowClient:
    def __init__(self, url: str, ca: Path, *, timeout: float = 30.0, connections: int = 4,
                 keepalive: float = 15.0) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        self._origin = Origin(self.url, client_context(ca), connections=connections,
                              keepalive=keepalive)

    async def __aenter__(self) -> EscrowClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self._origin.close()

    async def _call(self, method: str, path: str, model: type[M], body: BaseModel | None = None,
                    timeout: float | None = None) -> M:
        data = body.model_dump_json().encode() if body is not None else None
        try:
            answer = await self._origin.request(method, path, data,
                                                self._timeout if timeout is None else timeout)
        except ssl.SSLCertVerificationError as exc:
            raise _certificate_problem(self.url, exc) from None
        except (HttpError, TimeoutError, OSError) as exc:
            raise EscrowUnavailable(plain(f"the escrow at {self.url} is unreachable: "
                                          f"{type(exc).__name__}: {exc}"),
                                    "check the escrow service and the network") from None
        return parse_answer(answer.status, answer.body.decode("utf-8", "replace"), model)

    async def health(self) -> None:
        """Raise EscrowUnavailable unless the escrow can reach its database and token."""
        await self._call("GET", "/healthz", protocol.HealthResponse)

    async def info(self) -> InfoResponse:
        return await self._call("GET", "/v1/info", InfoResponse)

    async def deposit_key_sha256(self) -> str:
        """The fingerprint of the deposit key the escrow offers now (what trust on first use
        pins)."""
        info = await self.info()
        return deposit_key.fingerprint(deposit_key.offered_key(self.url,
                                                               info.deposit_public_key))

    async def nonce(self) -> bytes:
        return protocol.b64d((await self._call("POST", "/v1/nonce", NonceResponse)).nonce)

    async def enroll(self, cluster_id: str, node_id: str, node_cert_pem: str,
                     swarm_key: ec.EllipticCurvePrivateKey, agent_key: ec.EllipticCurvePrivateKey,
                     hostname: str) -> EnrollResponse:
        nonce = await self.nonce()
        payload = protocol.enroll_payload(cluster_id, node_id, _cert_der(node_cert_pem),
                                          protocol.public_der(agent_key.public_key()), hostname,
                                          nonce)
        body = protocol.EnrollRequest(
            cluster_id=cluster_id, node_id=node_id, node_cert=node_cert_pem,
            agent_public_key=protocol.public_pem(agent_key.public_key()), hostname=hostname,
            nonce=protocol.b64e(nonce), swarm_signature=protocol.sign(swarm_key, payload),
            agent_signature=protocol.sign(agent_key, payload))
        return await self._call("POST", "/v1/enroll", EnrollResponse, body)

    async def deposit(self, cluster_id: str, node_id: str, agent_key: ec.EllipticCurvePrivateKey,
                      key: UnlockKey, pinned: str) -> DepositResponse:
        """Deposit ``key``, encrypted to the escrow's deposit key only if that key's
        fingerprint is ``pinned`` (DepositKeyMismatch otherwise: nothing more is sent)."""
        info = await self.info()
        offered = deposit_key.offered_key(self.url, info.deposit_public_key)
        deposit_key.check(self.url, offered, pinned)
        nonce = await self.nonce()
        server_key = X25519PublicKey.from_public_bytes(offered)
        sealed = HPKE.encrypt(key.swmkey().encode("ascii"), server_key,
                              info=protocol.deposit_info(cluster_id, node_id, nonce))
        body = protocol.DepositRequest(
            cluster_id=cluster_id, node_id=node_id, nonce=protocol.b64e(nonce),
            sealed_key=protocol.b64e(sealed),
            signature=protocol.sign(agent_key, protocol.deposit_payload(cluster_id, node_id,
                                                                        nonce, sealed)))
        return await self._call("POST", "/v1/deposit", DepositResponse, body)

    async def unseal(self, cluster_id: str, node_id: str, node_cert_pem: str,
                     agent_key: ec.EllipticCurvePrivateKey, hostname: str, boot_id: str,
                     kek_version: str = "") -> tuple[RequestStatus, X25519PrivateKey]:
        """Send an unseal request; the returned private key opens the released shares."""
        ephemeral = X25519PrivateKey.generate()
        raw = ephemeral.public_key().public_bytes_raw()
        nonce = await self.nonce()
        payload = protocol.unseal_payload(cluster_id, node_id, _cert_der(node_cert_pem), raw,
                                          hostname, boot_id, kek_version, nonce)
        body = protocol.UnsealRequest(
            cluster_id=cluster_id, node_id=node_id, node_cert=node_cert_pem,
            ephemeral_public_key=protocol.b64e(raw), hostname=hostname, boot_id=boot_id,
            kek_version=kek_version, nonce=protocol.b64e(nonce),
            signature=protocol.sign(agent_key, payload))
        return await self._call("POST", "/v1/unseal", RequestStatus, body), ephemeral

    async def poll(self, request_id: str, wait: float = 0.0) -> RequestStatus:
        return await self._call("GET", f"/v1/unseal/{request_id}?wait={wait:g}", RequestStatus,
                                timeout=wait + 30)

    async def report(self, request_id: str, node_id: str, agent_key: ec.EllipticCurvePrivateKey,
                     outcome: ResultOutcome, version: int) -> None:
        body = protocol.ResultReport(
            node_id=node_id, outcome=outcome,
            version=version, signature=protocol.sign(agent_key, protocol.result_payload(
                request_id, node_id, outcome, version)))
        await self._call("POST", f"/v1/unseal/{request_id}/result", protocol.ResultResponse,
                         body)

    async def heartbeat(self, beat: Callable[[bytes], HeartbeatRequest], pinned: str) -> None:
        """Send the beat that ``beat`` makes and signs over a fresh nonce (agent/heartbeat.py
        says what a beat holds), only to the escrow whose deposit key is the ``pinned`` one: an
        impersonator (say, one holding the escrow's TLS key) learns nothing of this node."""
        info = await self.info()
        deposit_key.check(self.url, deposit_key.offered_key(self.url, info.deposit_public_key),
                          pinned)
        body = beat(await self.nonce())
        await self._call("POST", "/v1/heartbeat", HeartbeatResponse, body)


def _error_message(text: str) -> str:
    """The message of the escrow's JSON error body, or the start of whatever came instead
    (a proxy's HTML page, say), as plain text."""
    try:
        error = json.loads(text)
        return plain(f"{error['error']}: {error['message']}")
    except (ValueError, TypeError, KeyError, RecursionError):
        return plain(text[:200])


# OpenSSL's X509_V_ERR_CERT_NOT_YET_VALID and X509_V_ERR_CERT_HAS_EXPIRED
_CLOCK_ERRORS = {9: "is not valid yet", 10: "has expired"}


def _certificate_problem(url: str, exc: ssl.SSLCertVerificationError) -> EscrowUnavailable:
    code = exc.verify_code
    if code in _CLOCK_ERRORS:
        return EscrowUnavailable(
            f"the escrow's TLS certificate {_CLOCK_ERRORS[code]} by this host's clock "
            f"({datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC): this clock or the escrow's is wrong",
            "compare both clocks (`timedatectl`) and synchronise them (NTP)")
    return EscrowUnavailable(plain(f"the escrow at {url} presented a certificate this agent "
                                   f"does not trust: {exc.verify_message}"),
                             "check escrow_ca in the agent's config")
