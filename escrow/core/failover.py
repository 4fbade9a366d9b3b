"""Several URLs of one escrow: the order a client asks them in, and whether a failed attempt
moves on to the next (pure; agent/client.py and escrow/api_client.py do the I/O).

Replicas of the escrow share one database, so any of them answers any step of any request: an
unseal request made at one is polled and reported at another. A client therefore sticks to the
URL that answered last, and asks the others, in the configured order after it, only when that
one cannot take a request:

- nothing was sent (no connection: refused, unreachable, the TLS handshake or the certificate
  failed, or the time ran out before the request went out): any request moves on;
- the replica answered 503 (its token or database is away, or it is shutting down), which the
  escrow answers having changed nothing: any request moves on;
- the request went out and no full answer came (a timeout, a reset, a broken answer): only a
  request that may be repeated moves on, since any other may have been processed;
- any other answer, a 4xx among them, is the escrow's word: it is not asked elsewhere.

Each URL is tried at most once per call, so a call ends after one round of the list at most.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from urllib.parse import urlsplit

from escrow.core.errors import EscrowError

# Only 503 says "not now, and nothing was done" (escrow/server/app.py answers it for an
# unavailable token or database and while shutting down); a 500 may follow a partial change.
UNAVAILABLE_STATUS = 503


class Failure(Enum):
    """How an attempt at one URL failed."""

    NOT_SENT = "not sent"
    NO_ANSWER = "no answer"
    UNAVAILABLE = "unavailable"


def moves_on(failure: Failure, *, repeatable: bool) -> bool:
    """Whether the request goes on to the next URL. ``repeatable``: sending it twice does no
    more than sending it once (a GET, a fresh nonce, a result report)."""
    return failure is not Failure.NO_ANSWER or repeatable


class MovesOn(Exception):
    """An attempt failed at one URL in a way that lets the call go on at the next one;
    ``error`` says how, for the call's error if no URL takes it."""

    def __init__(self, error: EscrowError) -> None:
        super().__init__(error.message)
        self.error = error


def failed(error: EscrowError, failure: Failure, *, repeatable: bool) -> Exception:
    """What an attempt that failed as ``failure`` raises: ``error``, or MovesOn carrying it."""
    return MovesOn(error) if moves_on(failure, repeatable=repeatable) else error


class Replicas:
    """The escrow's URLs in order of preference, and the one every call starts at: the one
    that answered last (the first, until another answers)."""

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("no escrow URL")
        self.urls = tuple(urls)
        self._current = 0

    @property
    def current(self) -> str:
        return self.urls[self._current]

    def order(self) -> tuple[int, ...]:
        """The indexes of the URLs to try for one call: the current one, then the others in
        their configured order after it, each once."""
        count = len(self.urls)
        return tuple((self._current + step) % count for step in range(count))

    def answered(self, index: int) -> None:
        """The URL at ``index`` answered (or a call ended there): the next call starts at it,
        so a replica that went away is not asked first again while another answers."""
        self._current = index


def parse_urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """The URLs of ``value``: a string of one URL or several separated by commas, or a
    sequence of strings of one URL each. ValueError says what is wrong with the first wrong
    one (the caller names the setting)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    urls = tuple(item.strip() for item in items)
    if not urls or urls == ("",):
        raise ValueError("names no URL")
    for url in urls:
        if not url:
            raise ValueError("has an empty entry (a comma too many?)")
        try:
            parts = urlsplit(url)
        except ValueError:  # an unbalanced "[" of an IPv6 address
            raise ValueError(f"{_shown(url)} is not an https:// URL") from None
        if "@" in parts.netloc:
            # Such a URL would be shown in every message that names it (so not here either),
            # and the escrow takes no password: agents and custodians prove who they are by
            # their keys.
            raise ValueError(f"the URL of {parts.netloc.rpartition('@')[2]} carries a user "
                             "name or password")
        try:
            _ = parts.port  # raises ValueError unless a number from 0 to 65535
        except ValueError:
            raise ValueError(f"{_shown(url)} has no valid port") from None
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"{_shown(url)} is not an https:// URL")
    duplicate = next((url for index, url in enumerate(urls) if url in urls[:index]), None)
    if duplicate is not None:
        raise ValueError(f"names {_shown(duplicate)} twice")
    return urls


def unavailable(failures: Sequence[tuple[str, str]], untried: Sequence[str] = (),
                seconds: float = 0.0) -> tuple[str, str]:
    """The message and hint of a call that no URL took: ``failures`` are the (message, hint)
    of each URL tried, in order, each naming its URL; ``untried``, the URLs left when the
    ``seconds`` the call may take were up."""
    messages = [message for message, _ in failures]
    if untried:
        messages.append(f"not tried within the {seconds:g} s the request may take: "
                        + ", ".join(untried))
    hints = dict.fromkeys(hint for _, hint in failures if hint)
    return ("no URL of the escrow could take the request: " + "; ".join(messages),
            "; ".join(hints))


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
