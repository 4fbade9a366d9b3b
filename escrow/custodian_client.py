"""The custodian's client of the escrow API: TLS pinned to the escrow's CA, every HTTP request
signed with the custodian's key (escrow.core.protocol.custodian_http_payload)."""

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

from escrow.core import protocol
from escrow.core.errors import ConfigError, EscrowError, IdentityError
from escrow.core.plaintext import plain
from escrow.core.tls import client_context

T = TypeVar("T")


class CustodianClient:
    def __init__(self, url: str, ca: str, key: ec.EllipticCurvePrivateKey) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"escrow URL {url!r} is not an https:// URL",
                              "give --url https://HOST:PORT (or ESCROW_URL)")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.context = client_context(Path(ca))
        self.key = key
        self.key_id = protocol.sha256_hex(protocol.public_der(key.public_key()))

    def call(self, method: str, path: str, answer: type[T] | TypeAdapter[T],
             body: BaseModel | None = None) -> T:
        raw = body.model_dump_json().encode() if body is not None else b""
        date = str(int(time.time()))
        nonce = secrets.token_hex(16)
        headers = {
            "Content-Type": "application/json",
            "X-Escrow-Key-Id": self.key_id,
            "X-Escrow-Date": date,
            "X-Escrow-Nonce": nonce,
            "X-Escrow-Signature": protocol.sign(
                self.key, protocol.custodian_http_payload(method, path, date, nonce, raw)),
        }
        connection = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                 timeout=30)
        try:
            connection.request(method, path, body=raw or None, headers=headers)
            response = connection.getresponse()
            text = response.read().decode("utf-8", errors="replace")
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            raise EscrowError(plain(f"cannot reach the escrow at https://{self.host}:"
                                    f"{self.port}: {exc}"),
                              "check --url, --ca and that `escrow serve` runs") from None
        finally:
            connection.close()
        return parse_answer(status, text, answer)


def parse_answer(status: int, text: str, answer: type[T] | TypeAdapter[T]) -> T:
    """The escrow's answer, or the EscrowError it amounts to. Pure: whatever the escrow (or a
    proxy in between) sent, nothing else is raised; what an error quotes of it is plain text
    (escrow.core.plaintext.plain), so it cannot drive the custodian's terminal."""
    if status >= 400:
        try:
            error = json.loads(text)
            message, hint = str(error["message"]), str(error.get("hint", ""))
            reason = str(error.get("error", ""))
        except (ValueError, KeyError, TypeError, RecursionError):
            message, hint, reason = text[:200], "", "unknown"
        raise IdentityError(plain(reason), f"the escrow refused ({status}): {plain(message)}",
                            plain(hint), status)
    adapter = answer if isinstance(answer, TypeAdapter) else TypeAdapter(answer)
    try:
        return adapter.validate_json(text)
    except ValidationError:
        raise EscrowError("the escrow's answer does not match the protocol",
                          "check that the CLI and the escrow versions match") from None
