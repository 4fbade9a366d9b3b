"""The webhook that tells custodians' chat (Slack, Mattermost, anything taking JSON) that a
locked manager waits for their approvals.

The hostname is the node's to choose, so the chat ``text`` never carries it as markup: it goes
through escrow.core.plaintext.plain, then ``&``, ``<`` and ``>`` are escaped as Slack asks (so no
``<!channel>``, ``<@U123>`` or ``<https://...|label>``), and it sits in a code span, in which
neither Slack nor Mattermost formats ``*``, ``_`` or ``~`` (a backtick, which would end the span,
becomes ``'``; an ``@`` is followed by a zero-width space, so ``@channel`` mentions no one). The
JSON fields carry the values for programs, only passed through plain().

Redirects are not followed: the URL is the operator's, and a receiver that answers 3xx is
misconfigured or is sending the request (and the node's details) somewhere else; it is logged as
a failure. A webhook never blocks or fails an unseal request: every error is logged and dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from escrow.core.plaintext import PlainLogArgs, plain

log = logging.getLogger("escrow.webhook")
log.addFilter(PlainLogArgs())
TIMEOUT_SECONDS = 5.0
ZERO_WIDTH_SPACE = "\u200b"


@dataclass(frozen=True)
class PendingApproval:
    """What the webhook says about one unseal request waiting for custodians."""

    request_id: str
    cluster_id: str
    node_id: str
    hostname: str
    needed: int
    expires_at: str


def chat_code(value: str) -> str:
    """``value`` as a chat code span that Slack and Mattermost show as the literal text."""
    text = plain(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("`", "'").replace("@", "@" + ZERO_WIDTH_SPACE)
    return f"`{text}`"


def payload(pending: PendingApproval) -> dict[str, Any]:
    return {
        "text": f"Swarm manager {chat_code(pending.hostname)} is locked and waits for "
                f"{pending.needed} custodian approval(s): "
                f"escrow approve {plain(pending.request_id)}",
        "request_id": plain(pending.request_id), "cluster_id": plain(pending.cluster_id),
        "node_id": plain(pending.node_id), "hostname": plain(pending.hostname),
        "needed": pending.needed, "expires_at": plain(pending.expires_at),
    }


async def notify(url: str, pending: PendingApproval, *,
                 timeout: float = TIMEOUT_SECONDS) -> None:
    """Tell ``url`` that ``pending`` waits for custodians (a background task of the unseal)."""
    await post(url, payload(pending), about=pending.request_id, timeout=timeout)


async def post(url: str, body: dict[str, Any], *, about: str,
               timeout: float = TIMEOUT_SECONDS) -> bool:
    """POST ``body`` as JSON to ``url`` without following redirects; True if the receiver
    answered 2xx. Never raises for the receiver's sake (unreachable, slow, redirecting,
    refusing): that is logged, naming ``about`` (a request id, an event). Any text in ``body``
    that people read must already be neutralised (see :func:`chat_code`)."""
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session, \
                session.post(url, json=body, allow_redirects=False) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.warning("webhook for %s failed: %s", about, type(exc).__name__)
        return False
    elapsed = time.monotonic() - started
    if 200 <= status < 300:
        log.info("webhook for %s answered %s in %.2f s", about, status, elapsed)
        return True
    if 300 <= status < 400:
        log.warning("webhook for %s failed: the receiver answered %s, a redirect, which is not "
                    "followed; set the final URL as server.webhook_url", about, status)
    else:
        log.warning("webhook for %s failed: the receiver answered %s in %.2f s", about, status,
                    elapsed)
    return False
