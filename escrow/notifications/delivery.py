"""One event posted to one receiver: signed anew at each attempt, retried as
escrow.notifications.retry says, redirects never followed. Never raises for the receiver's
sake (unreachable, slow, redirecting, refusing): each failed attempt is counted and logged
under the receiver's name, never its URL. Cancellation goes through: a stopping server drops
what it has not delivered."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp

from escrow.core.plaintext import PlainLogArgs
from escrow.notifications import retry, signing
from escrow.notifications.events import EventKind
from escrow.notifications.receivers import Receiver
from escrow.notifications.settings import TABLE

log = logging.getLogger("escrow.webhook")
log.addFilter(PlainLogArgs())


async def deliver(session: aiohttp.ClientSession, receiver: Receiver, event_id: str,
                  kind: EventKind, body: bytes, *, failed: Callable[[], None],
                  sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                  clock: Callable[[], float] = time.time) -> bool:
    """POST ``body`` to ``receiver`` until it answers 2xx (True) or the delivery is given up
    (False); ``failed`` is called for each attempt that did not deliver."""
    try:
        async for attempt in retry.retrying(sleep):
            with attempt:
                number = attempt.retry_state.attempt_number
                try:
                    status, seconds = await _post(session, receiver, event_id, kind, body,
                                                  int(clock()))
                except retry.Failed as exc:
                    failed()
                    log.warning("webhook %s: %s %s, attempt %d of %d: %s", receiver.name, kind,
                                event_id, number, retry.ATTEMPTS, exc)
                    raise
    except retry.Failed:
        log.warning("webhook %s: %s %s given up", receiver.name, kind, event_id)
        return False
    log.info("webhook %s: %s %s delivered, answered %d in %.2f s", receiver.name, kind,
             event_id, status, seconds)
    return True


async def _post(session: aiohttp.ClientSession, receiver: Receiver, event_id: str,
                kind: EventKind, body: bytes, at: int) -> tuple[int, float]:
    started = time.monotonic()
    try:
        async with session.post(receiver.url, data=body,
                                headers=signing.headers(receiver.secret, body, at, event_id,
                                                        kind),
                                allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(
                                    total=retry.ATTEMPT_TIMEOUT_SECONDS)) as response:
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:  # messages may quote the URL
        raise retry.Retryable(f"no answer ({type(exc).__name__})") from None
    seconds = time.monotonic() - started
    verdict = retry.verdict(status)
    if verdict == retry.Verdict.DELIVERED:
        return status, seconds
    if verdict == retry.Verdict.RETRY:
        raise retry.Retryable(f"the receiver answered {status} in {seconds:.2f} s")
    if 300 <= status < 400:
        raise retry.Final(f"the receiver answered {status}, a redirect, which is not "
                          f"followed; set the final URL as url of [[{TABLE}]] "
                          f"{receiver.name}")
    raise retry.Final(f"the receiver answered {status}, which is not retried")
