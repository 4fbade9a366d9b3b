"""The CLI's clients of the escrow API: TLS pinned to the escrow's CA, at one of the escrow's
URLs (escrow.core.failover: the one that answered last, the next ones only when it cannot take
the request); a custodian's requests each signed with their key
(escrow.core.protocol.custodian_http_payload), a viewer's carrying their token.

Each call runs the project's one HTTP client (escrow/https.py, the agent's too) in an event
loop of its own, and maps what came back as the agent does (escrow.core.answers): a refusal
is the escrow's word, a 5xx or a rate limit says when to try again.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, TypeAdapter, ValidationError

from escrow.core import answers, failover, protocol
from escrow.core.answers import Kind
from escrow.core.errors import ConfigError, EscrowError, IdentityError, RequestError
from escrow.core.failover import Failure, MovesOn, failed
from escrow.core.tls import client_context
from escrow.https import HttpError, NotSent, Origin, Response

T = TypeVar("T")
TIMEOUT = 30.0
# Where the CLI's user gives the escrow's CA (every command that calls the escrow names it so).
CA_SETTING = "--ca / ESCROW_CA"
UNREACHABLE_HINT = "check --url, --ca and that `escrow serve` runs"
RETRY_HINT = "retry in a moment; the escrow's log says why it cannot serve"


class ApiClient:
    """``url``: the escrow's URL, or several (replicas) separated by commas, in order of
    preference; each may carry a path (``https://host/escrow``: an escrow behind a reverse
    proxy that serves it there), kept in every request."""

    def __init__(self, url: str, ca: str) -> None:
        try:
            urls = failover.parse_urls(url)
        except ValueError as exc:
            raise ConfigError(f"escrow URL {exc}",
                              "give --url https://HOST:PORT (or ESCROW_URL), or several "
                              "separated by commas") from None
        self.replicas = failover.Replicas([item.rstrip("/") for item in urls])
        self.context = client_context(Path(ca), CA_SETTING)

    def _headers(self, method: str, path: str, raw: bytes) -> list[tuple[str, str]]:
        """The headers of one attempt, made anew for each, besides those every request
        carries (escrow/https.py)."""
        return []

    def call(self, method: str, path: str, answer: type[T] | TypeAdapter[T],
             body: BaseModel | None = None) -> T:
        """``path``: the API's (``/v1/...``), under each URL's own path."""
        raw = body.model_dump_json().encode() if body is not None else b""
        return asyncio.run(self._call(method, path, answer, raw))

    async def _call(self, method: str, path: str, answer: type[T] | TypeAdapter[T],
                    raw: bytes) -> T:
        failures: list[EscrowError] = []
        for index in self.replicas.order():
            url = self.replicas.urls[index]
            origin = Origin(url, self.context, connections=1, keepalive=0)
            try:
                result = await self._attempt(origin, url, method, path, answer, raw)
            except MovesOn as moved:
                failures.append(moved.error)
                continue
            except EscrowError:
                self.replicas.answered(index)
                raise
            finally:
                await origin.close()
            self.replicas.answered(index)
            return result
        if len(failures) == 1:
            raise failures[0]
        raise EscrowError(*failover.unavailable(
            [(failure.message, failure.hint) for failure in failures]))

    async def _attempt(self, origin: Origin, url: str, method: str, path: str,
                       answer: type[T] | TypeAdapter[T], raw: bytes) -> T:
        """One attempt at ``url``: the answer; MovesOn if it failed in a way that lets the
        request go on at the next URL, EscrowError otherwise."""
        # Only GETs are sent again after no answer came: a decision or an export that went
        # out may have been taken.
        again = method == "GET"
        try:
            response = await self._send(origin, method, path, raw,
                                        self._headers(method, path, raw))
        except NotSent as exc:
            raise failed(_unreachable(url, exc.__cause__ or exc), Failure.NOT_SENT,
                         repeatable=again) from None
        except (HttpError, OSError) as exc:
            raise failed(_unreachable(url, exc), Failure.NO_ANSWER, repeatable=again) from None
        try:
            return parse_answer(response.status, response.body.decode("utf-8", "replace"),
                                answer, url, response.header("Retry-After"))
        except EscrowError as exc:
            if response.status == failover.UNAVAILABLE_STATUS:
                raise failed(exc, Failure.UNAVAILABLE, repeatable=again) from None
            raise

    async def _send(self, origin: Origin, method: str, path: str, raw: bytes,
                    headers: Sequence[tuple[str, str]]) -> Response:
        """The one place a request leaves (tests watch it here)."""
        return await origin.request(method, path, raw or None, TIMEOUT, headers)


class CustodianClient(ApiClient):
    def __init__(self, url: str, ca: str, key: ec.EllipticCurvePrivateKey) -> None:
        super().__init__(url, ca)
        self.key = key
        self.key_id = protocol.sha256_hex(protocol.public_der(key.public_key()))

    def _headers(self, method: str, path: str, raw: bytes) -> list[tuple[str, str]]:
        # Signed for this attempt: the escrow refuses a signed request it has seen, at any
        # replica, so each attempt carries a date and nonce of its own. The path signed is
        # the API's, as the escrow verifies it (the path it serves): without the URL's own,
        # which a proxy serving the escrow under a path takes off before passing it on.
        date = str(int(time.time()))
        nonce = secrets.token_hex(16)
        return [
            *super()._headers(method, path, raw),
            ("X-Escrow-Key-Id", self.key_id),
            ("X-Escrow-Date", date),
            ("X-Escrow-Nonce", nonce),
            ("X-Escrow-Signature", protocol.sign(
                self.key, protocol.custodian_http_payload(method, path, date, nonce, raw))),
        ]


class ViewerClient(ApiClient):
    """A viewer's: reads the fleet's status (GET /v1/status) with their token."""

    def __init__(self, url: str, ca: str, token: str) -> None:
        super().__init__(url, ca)
        self._token = token

    def _headers(self, method: str, path: str, raw: bytes) -> list[tuple[str, str]]:
        return [*super()._headers(method, path, raw), ("Authorization", f"Bearer {self._token}")]


def _unreachable(url: str, exc: BaseException) -> EscrowError:
    return EscrowError(*answers.no_answer(url, exc, TIMEOUT, client="this command",
                                          ca_setting=CA_SETTING, hint=UNREACHABLE_HINT,
                                          now=datetime.now(UTC)))


def parse_answer(status: int, text: str, answer: type[T] | TypeAdapter[T], url: str = "",
                 retry_after: str | None = None) -> T:
    """The escrow's answer, or the EscrowError it amounts to (escrow.core.answers), the
    escrow at ``url`` having sent ``retry_after`` (its Retry-After header). Pure: whatever
    the escrow (or a proxy in between) sent, nothing else is raised; what an error quotes of
    it is plain text (escrow.core.plaintext.plain), so it cannot drive the custodian's
    terminal."""
    seen = answers.kind(status)
    if seen is not Kind.ANSWER:
        body = answers.error_body(text)
        if seen is Kind.UNAVAILABLE:
            raise EscrowError(answers.cannot_serve(url, status, body), body.hint or RETRY_HINT)
        if seen is Kind.RATE_LIMITED:
            wait = answers.retry_after_seconds(retry_after, datetime.now(UTC))
            raise RequestError(body.reason, *answers.rate_limited(url, status, body, wait),
                               status, wait)
        raise IdentityError(body.reason, f"the escrow refused ({status}): {body.message}",
                            body.hint, status)
    adapter = answer if isinstance(answer, TypeAdapter) else TypeAdapter(answer)
    try:
        return adapter.validate_json(text)
    except ValidationError:
        raise EscrowError("the escrow's answer does not match the protocol",
                          "check that the CLI and the escrow versions match") from None
