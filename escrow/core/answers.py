"""What a client of the escrow reports when it did not get the answer it asked for: the escrow
refused, rate-limited the request or cannot serve now, or no answer came (a certificate not
trusted or out of its dates, the time ran out, the network).

Pure, and the one mapping of both clients of the escrow API, the node agent's
(agent/client.py) and the custodian and viewer CLI's (escrow/api_client.py): each makes an
error of its own family from what this says, and names its own settings in the hints. Whatever
the escrow or a proxy in between sent, what is quoted of it is plain text
(escrow.core.plaintext.plain), for a terminal or the journal.
"""

from __future__ import annotations

import json
import math
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum

from escrow.core.plaintext import plain

RATE_LIMITED_STATUS = 429
# OpenSSL's X509_V_ERR_CERT_NOT_YET_VALID and X509_V_ERR_CERT_HAS_EXPIRED
_CLOCK_ERRORS = {9: "is not valid yet", 10: "has expired"}


class Kind(Enum):
    """What an answer's status says."""

    ANSWER = "answer"  # below 400: what was asked for, if it parses as such
    REFUSED = "refused"  # 4xx but 429: the escrow's word, the same request gets the same
    RATE_LIMITED = "rate limited"  # 429: the same request, later (Retry-After says when)
    UNAVAILABLE = "unavailable"  # 5xx: the escrow cannot serve now


def kind(status: int) -> Kind:
    if status >= 500:
        return Kind.UNAVAILABLE
    if status == RATE_LIMITED_STATUS:
        return Kind.RATE_LIMITED
    return Kind.REFUSED if status >= 400 else Kind.ANSWER


@dataclass(frozen=True)
class ErrorBody:
    """An error answer's body (escrow.core.protocol.ErrorResponse), as plain text; of a body
    that is not the escrow's (a proxy's page, say), reason "unknown" and its start."""

    reason: str
    message: str
    hint: str = ""
    escrow: bool = False  # whether the body was the escrow's JSON error

    def summary(self) -> str:
        return f"{self.reason}: {self.message}" if self.escrow else self.message


def error_body(text: str) -> ErrorBody:
    try:
        error = json.loads(text)
    except (ValueError, RecursionError):
        error = None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return ErrorBody("unknown", plain(text[:200]))
    reason, hint = error.get("error"), error.get("hint")
    return ErrorBody(plain(reason if isinstance(reason, str) else ""), plain(error["message"]),
                     plain(hint if isinstance(hint, str) else ""), escrow=True)


def cannot_serve(url: str, status: int, body: ErrorBody) -> str:
    """The message of a 5xx from the escrow at ``url`` (none: "the escrow")."""
    return plain(f"the escrow{_at(url)} cannot serve now ({status}): {body.summary()}")


def rate_limited(url: str, status: int, body: ErrorBody,
                 wait: float | None) -> tuple[str, str]:
    """The message and hint of a 429 from the escrow at ``url``, ``wait`` the seconds its
    Retry-After says (retry_after_seconds), if it says."""
    message = plain(f"the escrow{_at(url)} rate-limited this request ({status} {body.reason}): "
                    f"{body.message}")
    if wait is None:
        return message, "wait a minute, then retry"
    return message, f"wait {math.ceil(wait)} s (its Retry-After), then retry"


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """The seconds a Retry-After header says to wait (RFC 9110: delay-seconds or an HTTP
    date, from ``now``); None when there is none or it is unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value) if len(value) <= 12 else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, its origin unknown
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def no_answer(url: str, exc: BaseException, seconds: float, *, client: str, ca_setting: str,
              hint: str, now: datetime) -> tuple[str, str]:
    """The message and hint of a request to the escrow at ``url`` that got no answer within
    ``seconds`` because of ``exc``. ``client`` names the client in a sentence ("this agent"),
    ``ca_setting`` is where its user gives the escrow's CA, ``hint`` the hint of an escrow
    unreachable; ``now``, this host's clock, for a certificate out of its dates."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _CLOCK_ERRORS:
            return (f"the TLS certificate of the escrow at {url} "
                    f"{_CLOCK_ERRORS[exc.verify_code]} by this host's clock "
                    f"({now:%Y-%m-%d %H:%M:%S} UTC): this clock or the escrow's is wrong",
                    "compare both clocks (`timedatectl`) and synchronise them (NTP)")
        return (plain(f"the escrow at {url} presented a certificate {client} does not trust: "
                      f"{exc.verify_message}"),
                f"check {ca_setting}: the escrow's tls/ca.pem, or the CA of its "
                "server.tls_cert")
    if isinstance(exc, TimeoutError) and exc.errno is None:  # ours, not the kernel's ETIMEDOUT
        return f"the escrow at {url} did not answer within {round(seconds, 2):g} s", hint
    return plain(f"the escrow at {url} is unreachable: {type(exc).__name__}: {exc}"), hint


def _at(url: str) -> str:
    return f" at {url}" if url else ""
