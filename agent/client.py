"""The agent's client of the escrow API: TLS pinned to the escrow's CA, every message signed,
and every call made at one of the escrow's URLs (escrow.core.failover: the one that answered
last, and the next ones only when it cannot take the call).

Signatures are made over escrow.core.protocol's canonical payloads; the unseal request carries a
fresh X25519 key to which the escrow encrypts every released share. A call of several requests
(a nonce and the request it signs; a deposit key checked, then what goes only to it) makes them
all at one URL, and starts over at the next URL when one of them fails there in a way that
moves on: a signed request is signed anew over that replica's nonce, and a heartbeat or a
deposit goes only to a replica whose deposit key was checked just before.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
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
from agent.config import CA_SETTING
from agent.errors import AgentError, EscrowRejected, EscrowUnavailable
from escrow.core import answers, failover, protocol
from escrow.core.answers import Kind
from escrow.core.errors import EscrowError
from escrow.core.failover import Failure, MovesOn, failed
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
from escrow.https import CONNECT_TIMEOUT, HttpError, NotSent, Origin, Response

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# How much longer than the wait it asks for a long poll may take to be answered.
POLL_SLACK = 30.0
UNREACHABLE_HINT = "check the escrow service and the network"
RETRY_HINT = "the agent retries by itself once the escrow recovers"


def _cert_der(cert_pem: str) -> bytes:
    return load_pem_x509_certificate(cert_pem.encode("ascii")).public_bytes(
        serialization.Encoding.DER)


def parse_answer(status: int, text: str, model: type[M], url: str = "") -> M:
    """The escrow's answer as ``model``, or the AgentError it amounts to. Pure: whatever the
    escrow (or a proxy in between) sent, nothing else is raised; what an error quotes of it
    is plain text (escrow.core.plaintext.plain), for the journal and the operator's terminal.
    ``url``, if given, is named as the escrow that answered."""
    seen = answers.kind(status)
    if seen is Kind.UNAVAILABLE:
        raise EscrowUnavailable(answers.cannot_serve(url, status, answers.error_body(text)),
                                RETRY_HINT)
    if seen is not Kind.ANSWER:  # a rate limit among them: agent/decision.py tells it apart
        body = answers.error_body(text)
        raise EscrowRejected(status, body.reason, body.message, body.hint)
    try:
        return model.model_validate_json(text)
    except ValidationError:
        raise EscrowUnavailable("the escrow's answer does not match the protocol",
                                "check that agent and escrow versions match") from None


@dataclass(frozen=True)
class Offer:
    """What one URL of the escrow answered at /v1/info, and the deposit key it offers."""

    url: str
    info: InfoResponse
    key: bytes  # the raw X25519 public key


@dataclass(frozen=True)
class _At:
    """One URL, for the requests a call makes there; all end by the call's ``deadline`` (the
    event loop's clock)."""

    index: int
    url: str
    deadline: float

    def left(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()


class EscrowClient:
    """``urls``: the escrow's URLs in order of preference, as a sequence or one string (one
    URL, or several separated by commas). Each request takes at most ``timeout`` seconds (a
    long poll, as much longer as it waits); one call, all its requests at every URL it tries,
    at most ``call_timeout`` (by default three requests' worth: a deposit is three), so the
    daemon's calls stay within what agent/runtime.py counts as a hang. A connection that is not
    up within ``connect_timeout`` counts as not sent, so the call moves to the next URL."""

    def __init__(self, urls: str | Sequence[str], ca: Path | ssl.SSLContext, *,
                 timeout: float = 30.0, connections: int = 4, keepalive: float = 15.0,
                 call_timeout: float | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self._replicas = failover.Replicas([url.rstrip("/")
                                            for url in failover.parse_urls(urls)])
        context = ca if isinstance(ca, ssl.SSLContext) else client_context(ca, CA_SETTING)
        self._origins = [Origin(url, context, connections=connections, keepalive=keepalive,
                                connect_timeout=min(timeout, connect_timeout))
                         for url in self._replicas.urls]
        self._timeout = timeout
        self._call_timeout = 3 * timeout if call_timeout is None else call_timeout

    @property
    def urls(self) -> tuple[str, ...]:
        return self._replicas.urls

    @property
    def url(self) -> str:
        """The URL the next call starts at: the one that answered last."""
        return self._replicas.current

    async def __aenter__(self) -> EscrowClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        trace: TracebackType | None) -> None:
        for origin in self._origins:
            await origin.close()

    async def _round(self, call: Callable[[_At], Awaitable[T]],
                     seconds: float | None = None) -> T:
        """``call`` at the current URL, then at each next one while it fails there in a way
        that moves on (escrow.core.failover), each URL once, all within ``seconds``
        (call_timeout). Where it ends, the next call starts. A ``call`` of several requests
        makes the one that may not be repeated last, so starting it over elsewhere repeats
        only requests that may be."""
        seconds = self._call_timeout if seconds is None else seconds
        deadline = asyncio.get_running_loop().time() + seconds
        order = self._replicas.order()
        failures: list[EscrowError] = []
        for index in order:
            at = _At(index, self._replicas.urls[index], deadline)
            if at.left() <= 0:
                break
            try:
                result = await call(at)
            except MovesOn as moved:
                failures.append(moved.error)
                continue
            except AgentError:
                self._replicas.answered(index)
                raise
            self._replicas.answered(index)
            return result
        untried = [self._replicas.urls[index] for index in order[len(failures):]]
        if len(failures) == 1 and not untried:
            raise failures[0]
        raise EscrowUnavailable(*failover.unavailable(
            [(failure.message, failure.hint) for failure in failures], untried, seconds))

    async def _attempt(self, at: _At, method: str, path: str, model: type[M],
                       body: BaseModel | None = None, *, timeout: float | None = None,
                       repeatable: bool | None = None) -> M:
        """One request at ``at``: the answer as ``model``; MovesOn if it failed in a way that
        lets the call go on at the next URL, AgentError otherwise. ``repeatable`` (GETs by
        default): sending the request twice does no more than sending it once."""
        seconds = max(0.0, min(self._timeout if timeout is None else timeout, at.left()))
        again = method == "GET" if repeatable is None else repeatable
        data = body.model_dump_json().encode() if body is not None else None
        try:
            answer = await self._send(at.index, method, path, data, seconds)
        except NotSent as exc:
            raise failed(_unreachable(at.url, exc.__cause__ or exc, seconds),
                         Failure.NOT_SENT, repeatable=again) from None
        except (HttpError, OSError) as exc:
            raise failed(_unreachable(at.url, exc, seconds), Failure.NO_ANSWER,
                         repeatable=again) from None
        try:
            return parse_answer(answer.status, answer.body.decode("utf-8", "replace"), model,
                                at.url)
        except EscrowUnavailable as exc:
            if answer.status == failover.UNAVAILABLE_STATUS:
                raise failed(exc, Failure.UNAVAILABLE, repeatable=again) from None
            raise

    async def _send(self, index: int, method: str, target: str, data: bytes | None,
                    timeout: float) -> Response:
        """The one place a request leaves, to the URL at ``index`` (tests answer it here)."""
        return await self._origins[index].request(method, target, data, timeout)

    async def health(self) -> None:
        """Raise EscrowUnavailable unless the escrow can reach its database and token."""
        await self._round(lambda at: self._attempt(at, "GET", "/healthz",
                                                   protocol.HealthResponse))

    async def info(self) -> InfoResponse:
        return await self._round(lambda at: self._attempt(at, "GET", "/v1/info",
                                                          InfoResponse))

    async def offer(self) -> Offer:
        """The deposit key the escrow offers now, and which URL offered it."""
        return await self._round(self._offer_at)

    async def _offer_at(self, at: _At) -> Offer:
        info = await self._attempt(at, "GET", "/v1/info", InfoResponse)
        return Offer(at.url, info, deposit_key.offered_key(at.url, info.deposit_public_key))

    async def deposit_key_sha256(self) -> str:
        """The fingerprint of the deposit key the escrow offers now (what trust on first use
        pins)."""
        return deposit_key.fingerprint((await self.offer()).key)

    async def nonce(self) -> bytes:
        return await self._round(self._nonce_at)

    async def _nonce_at(self, at: _At) -> bytes:
        # Issuing a nonce stores nothing (escrow/nonces.py): one asked for again is no harm.
        answer = await self._attempt(at, "POST", "/v1/nonce", NonceResponse, repeatable=True)
        return protocol.b64d(answer.nonce)

    async def enroll(self, cluster_id: str, node_id: str, node_cert_pem: str,
                     swarm_key: ec.EllipticCurvePrivateKey, agent_key: ec.EllipticCurvePrivateKey,
                     hostname: str) -> EnrollResponse:
        async def at_one(at: _At) -> EnrollResponse:
            nonce = await self._nonce_at(at)
            payload = protocol.enroll_payload(cluster_id, node_id, _cert_der(node_cert_pem),
                                              protocol.public_der(agent_key.public_key()),
                                              hostname, nonce)
            body = protocol.EnrollRequest(
                cluster_id=cluster_id, node_id=node_id, node_cert=node_cert_pem,
                agent_public_key=protocol.public_pem(agent_key.public_key()),
                hostname=hostname, nonce=protocol.b64e(nonce),
                swarm_signature=protocol.sign(swarm_key, payload),
                agent_signature=protocol.sign(agent_key, payload))
            return await self._attempt(at, "POST", "/v1/enroll", EnrollResponse, body)
        return await self._round(at_one)

    async def deposit(self, cluster_id: str, node_id: str, agent_key: ec.EllipticCurvePrivateKey,
                      key: UnlockKey, pinned: str) -> DepositResponse:
        """Deposit ``key``, encrypted to the escrow's deposit key only if that key's
        fingerprint is ``pinned`` (DepositKeyMismatch otherwise: nothing more is sent)."""
        async def at_one(at: _At) -> DepositResponse:
            offered = (await self._offer_at(at)).key
            deposit_key.check(at.url, offered, pinned)
            nonce = await self._nonce_at(at)
            server_key = X25519PublicKey.from_public_bytes(offered)
            sealed = HPKE.encrypt(key.swmkey().encode("ascii"), server_key,
                                  info=protocol.deposit_info(cluster_id, node_id, nonce))
            body = protocol.DepositRequest(
                cluster_id=cluster_id, node_id=node_id, nonce=protocol.b64e(nonce),
                sealed_key=protocol.b64e(sealed),
                signature=protocol.sign(agent_key, protocol.deposit_payload(
                    cluster_id, node_id, nonce, sealed)))
            return await self._attempt(at, "POST", "/v1/deposit", DepositResponse, body)
        return await self._round(at_one)

    async def unseal(self, cluster_id: str, node_id: str, node_cert_pem: str,
                     agent_key: ec.EllipticCurvePrivateKey, hostname: str, boot_id: str,
                     kek_version: str = "") -> tuple[RequestStatus, X25519PrivateKey]:
        """Send an unseal request; the returned private key opens the released shares."""
        ephemeral = X25519PrivateKey.generate()
        raw = ephemeral.public_key().public_bytes_raw()

        async def at_one(at: _At) -> RequestStatus:
            nonce = await self._nonce_at(at)
            payload = protocol.unseal_payload(cluster_id, node_id, _cert_der(node_cert_pem),
                                              raw, hostname, boot_id, kek_version, nonce)
            body = protocol.UnsealRequest(
                cluster_id=cluster_id, node_id=node_id, node_cert=node_cert_pem,
                ephemeral_public_key=protocol.b64e(raw), hostname=hostname, boot_id=boot_id,
                kek_version=kek_version, nonce=protocol.b64e(nonce),
                signature=protocol.sign(agent_key, payload))
            return await self._attempt(at, "POST", "/v1/unseal", RequestStatus, body)
        return await self._round(at_one), ephemeral

    async def poll(self, request_id: str, wait: float = 0.0) -> RequestStatus:
        async def at_one(at: _At) -> RequestStatus:
            # A URL asked after another failed has what is left of the call: it is asked to
            # answer within that.
            held = min(wait, max(0.0, at.left() - POLL_SLACK))
            return await self._attempt(at, "GET", f"/v1/unseal/{request_id}?wait={held:g}",
                                       RequestStatus, timeout=held + POLL_SLACK)
        return await self._round(at_one, max(self._call_timeout, wait + POLL_SLACK))

    async def report(self, request_id: str, node_id: str, agent_key: ec.EllipticCurvePrivateKey,
                     outcome: ResultOutcome, version: int) -> None:
        body = protocol.ResultReport(
            node_id=node_id, outcome=outcome,
            version=version, signature=protocol.sign(agent_key, protocol.result_payload(
                request_id, node_id, outcome, version)))
        # A replayed report changes nothing (escrow/service/unseal.py), and the unseal flow
        # sends one again after a failure anyway.
        await self._round(lambda at: self._attempt(
            at, "POST", f"/v1/unseal/{request_id}/result", protocol.ResultResponse, body,
            repeatable=True))

    async def heartbeat(self, beat: Callable[[bytes], HeartbeatRequest], pinned: str, *,
                        within: float | None = None) -> None:
        """Send the beat that ``beat`` makes and signs over a fresh nonce (agent/heartbeat.py
        says what a beat holds), within ``within`` seconds (call_timeout), only to an escrow
        whose deposit key is the ``pinned`` one: an impersonator (say, one holding the
        escrow's TLS key) learns nothing of this node."""
        async def at_one(at: _At) -> None:
            deposit_key.check(at.url, (await self._offer_at(at)).key, pinned)
            body = beat(await self._nonce_at(at))
            await self._attempt(at, "POST", "/v1/heartbeat", HeartbeatResponse, body)
        await self._round(at_one, within)


def _unreachable(url: str, exc: BaseException, seconds: float) -> EscrowUnavailable:
    """Why the escrow at ``url`` gave no answer within ``seconds``."""
    return EscrowUnavailable(*answers.no_answer(
        url, exc, seconds, client="this agent", ca_setting=CA_SETTING, hint=UNREACHABLE_HINT,
        now=datetime.now(UTC)))
