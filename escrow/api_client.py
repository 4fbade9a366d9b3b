"""The CLI's clients of the escrow API: TLS pinned to the escrow's CA, at one of the escrow's
URLs (escrow.core.failover: the one that answered last, the next ones only when it cannot take
the request); a custodian's requests each signed with their key
(escrow.core.protocol.custodian_http_payload), a viewer's carrying their token."""

from __future__ import annotations

import http.client
import json
import secrets
import time
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, TypeAdapter, ValidationError

from escrow.core import failover, protocol
from escrow.core.errors import ConfigError, EscrowError, IdentityError
from escrow.core.failover import Failure
from escrow.core.plaintext import plain
from escrow.core.tls import client_context

T = TypeVar("T")
TIMEOUT = 30.0
UNREACHABLE_HINT = "check --url, --ca and that `escrow serve` runs"


class _MovesOn(Exception):
    """An attempt failed at one URL in a way that lets the request go on at the next one."""

    def __init__(self, error: EscrowError) -> None:
        super().__init__(error.message)
        self.error = error


class ApiClient:
    """``url``: the escrow's URL, or several (replicas) separated by commas, in order of
    preference."""

    def __init__(self, url: str, ca: str) -> None:
        try:
            self.replicas = failover.Replicas(failover.parse_urls(url))
        except ValueError as exc:
            raise ConfigError(f"escrow URL {exc}",
                              "give --url https://HOST:PORT (or ESCROW_URL), or several "
                              "separated by commas") from None
        self.context = client_context(Path(ca))

    def _headers(self, method: str, path: str, raw: bytes) -> dict[str, str]:
        """The headers of one attempt, made anew for each."""
        return {"Content-Type": "application/json"}

    def call(self, method: str, path: str, answer: type[T] | TypeAdapter[T],
             body: BaseModel | None = None) -> T:
        raw = body.model_dump_json().encode() if body is not None else b""
        failures: list[EscrowError] = []
        for index in self.replicas.order():
            try:
                status, text = self._exchange(self.replicas.urls[index], method, path, raw)
            except _MovesOn as moved:
                failures.append(moved.error)
                continue
            except EscrowError:
                self.replicas.answered(index)
                raise
            self.replicas.answered(index)
            return parse_answer(status, text, answer)
        if len(failures) == 1:
            raise failures[0]
        raise EscrowError(*failover.unavailable(
            [(failure.message, failure.hint) for failure in failures]))

    def _exchange(self, url: str, method: str, path: str, raw: bytes) -> tuple[int, str]:
        """One attempt at ``url``: the status and body of its answer; _MovesOn if it failed in
        a way that lets the request go on at the next URL, EscrowError otherwise."""
        headers = self._headers(method, path, raw)
        parts = urlsplit(url)
        connection = http.client.HTTPSConnection(parts.hostname or "", parts.port or 443,
                                                 context=self.context, timeout=TIMEOUT)
        # Only GETs are sent again after no answer came: a decision or an export that went
        # out may have been taken.
        again = method == "GET"
        try:
            try:
                connection.connect()  # TCP and the TLS handshake: nothing of the request yet
            except OSError as exc:
                raise _failed(_unreachable(url, exc), Failure.NOT_SENT, again) from None
            try:
                connection.request(method, path, body=raw or None, headers=headers)
                response = connection.getresponse()
                text = response.read().decode("utf-8", errors="replace")
                status = response.status
            except (OSError, http.client.HTTPException) as exc:
                raise _failed(_unreachable(url, exc), Failure.NO_ANSWER, again) from None
        finally:
            connection.close()
        if status == failover.UNAVAILABLE_STATUS:
            _, message, hint = _error_fields(text)
            raise _failed(EscrowError(f"the escrow at {url} cannot serve now ({status}): "
                                      f"{message}", hint), Failure.UNAVAILABLE, again)
        return status, text


class CustodianClient(ApiClient):
    def __init__(self, url: str, ca: str, key: ec.EllipticCurvePrivateKey) -> None:
        super().__init__(url, ca)
        self.key = key
        self.key_id = protocol.sha256_hex(protocol.public_der(key.public_key()))

    def _headers(self, method: str, path: str, raw: bytes) -> dict[str, str]:
        # Signed for this attempt: the escrow refuses a signed request it has seen, at any
        # replica, so each attempt carries a date and nonce of its own.
        date = str(int(time.time()))
        nonce = secrets.token_hex(16)
        return {
            **super()._headers(method, path, raw),
            "X-Escrow-Key-Id": self.key_id,
            "X-Escrow-Date": date,
            "X-Escrow-Nonce": nonce,
            "X-Escrow-Signature": protocol.sign(
                self.key, protocol.custodian_http_payload(method, path, date, nonce, raw)),
        }


class ViewerClient(ApiClient):
    """A viewer's: reads the fleet's status (GET /v1/status) with their token."""

    def __init__(self, url: str, ca: str, token: str) -> None:
        super().__init__(url, ca)
        self._token = token

    def _headers(self, method: str, path: str, raw: bytes) -> dict[str, str]:
        return {**super()._headers(method, path, raw), "Authorization": f"Bearer {self._token}"}


def _failed(error: EscrowError, failure: Failure, repeatable: bool) -> Exception:
    """What an attempt that failed so raises: the error, or _MovesOn carrying it."""
    return _MovesOn(error) if failover.moves_on(failure, repeatable=repeatable) else error


def _unreachable(url: str, exc: Exception) -> EscrowError:
    return EscrowError(plain(f"cannot reach the escrow at {url}: {exc}"), UNREACHABLE_HINT)


def parse_answer(status: int, text: str, answer: type[T] | TypeAdapter[T]) -> T:
    """The escrow's answer, or the EscrowError it amounts to. Pure: whatever the escrow (or a
    proxy in between) sent, nothing else is raised; what an error quotes of it is plain text
    (escrow.core.plaintext.plain), so it cannot drive the custodian's terminal."""
    if status >= 400:
        reason, message, hint = _error_fields(text)
        raise IdentityError(reason, f"the escrow refused ({status}): {message}", hint, status)
    adapter = answer if isinstance(answer, TypeAdapter) else TypeAdapter(answer)
    try:
        return adapter.validate_json(text)
    except ValidationError:
        raise EscrowError("the escrow's answer does not match the protocol",
                          "check that the CLI and the escrow versions match") from None


def _error_fields(text: str) -> tuple[str, str, str]:
    """The reason, message and hint of the escrow's JSON error body (or the start of whatever
    came instead), as plain text."""
    try:
        error = json.loads(text)
        message, hint = str(error["message"]), str(error.get("hint", ""))
        reason = str(error.get("error", ""))
    except (ValueError, KeyError, TypeError, RecursionError):
        message, hint, reason = text[:200], "", "unknown"
    return plain(reason), plain(message), plain(hint)
