"""What the server tells people without being asked (escrow.notifications): audited events
worth a page (logged, and sent as events) and every event a receiver asked for.

An event is made where it happens (on the vault thread, or by the periodic check), and then
everything runs on the event loop, in the background: claimed in the store shared by every
replica, so that one replica alone sends it (the claim itself runs on the vault thread, after
the request that caused the event), then posted to each receiver that wants it, with
retries. Nothing here delays or fails the request that caused an event; nothing is done for
an event no receiver wants. A stopping server cancels what it has not delivered.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeVar

import aiohttp
from prometheus_client import Counter

from escrow.audit import AuditEvent
from escrow.core.errors import EscrowError
from escrow.core.plaintext import PlainLogArgs
from escrow.notifications import body, events
from escrow.notifications.delivery import deliver
from escrow.notifications.events import TIMED, Event
from escrow.notifications.receivers import Receiver

log = logging.getLogger("escrow.server")
log.addFilter(PlainLogArgs())
T = TypeVar("T")
WATCH_SECONDS = 5.0  # how often expiries and silent nodes are looked for
# A replica that starts looks this far back, for what fell due while it was down (claims
# keep another replica's sending from being repeated).
LOOKBACK = timedelta(hours=1)
# Events this replica has handled already, so that one told again (the same refusal, over
# and over) costs no claim in the store; the oldest are forgotten first.
REMEMBERED = 10_000


class OnVault(Protocol):
    """Runs a call on the vault thread (EscrowServer.run)."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


class Service(Protocol):
    """What the notifier asks of the service (escrow.service.Escrow), on the vault thread."""

    def claim(self, event: Event) -> bool: ...

    def due(self, start: datetime, now: datetime) -> list[Event]: ...


class Notifier:
    def __init__(self, receivers: Sequence[Receiver], deliveries: Counter, failures: Counter,
                 on_vault: OnVault, service: Callable[[], Awaitable[Service]]) -> None:
        self.receivers = tuple(receivers)
        self._wanted = frozenset(kind for r in receivers for kind in r.events)
        self._deliveries = deliveries
        self._failures = failures
        self._on_vault = on_vault
        self._service = service
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        # The event loop holds tasks only weakly: one held nowhere else may vanish mid-way.
        self._sending: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        for receiver in receivers:  # every series there from the start, at 0
            for kind in receiver.events:
                failures.labels(receiver.name, kind)
                for outcome in ("delivered", "given_up"):
                    deliveries.labels(receiver.name, kind, outcome)

    def start(self) -> None:
        """Send from now on (on the event loop, which runs the sending)."""
        self._loop = asyncio.get_running_loop()
        if self._wanted & TIMED:
            self._watch = asyncio.create_task(self._watch_the_clock())

    async def stop(self) -> None:
        self._loop = None  # what happens from now on is not sent
        if self._watch is not None:
            self._watch.cancel()
        pending = list(self._sending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, *([self._watch] if self._watch else []),
                             return_exceptions=True)
        if pending:
            log.warning("stopping: %d notification(s) not delivered yet were cancelled",
                        len(pending))
        if self._session is not None:
            await self._session.close()

    def alert(self, event: AuditEvent) -> None:
        """An audited event worth a page (called on the vault thread)."""
        details = json.dumps(dict(event.details), sort_keys=True)
        log.warning("alert: %s in cluster %s: %s", event.event, event.cluster_id or "-", details)
        self.notify(events.from_alert(event, datetime.now(UTC)))

    def notify(self, event: Event) -> None:
        """``event`` happened (called on any thread)."""
        loop = self._loop
        if event.kind in self._wanted and loop is not None:
            loop.call_soon_threadsafe(self._take, event)

    def _take(self, event: Event) -> None:
        key = event.claim_key
        if key in self._seen or self._loop is None:
            return
        self._seen[key] = None
        if len(self._seen) > REMEMBERED:
            self._seen.popitem(last=False)
        task = asyncio.create_task(self._logged(self._send(event)))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, event: Event) -> None:
        if not await self._claim(event):
            log.info("notification %s %s is another replica's to send", event.kind, event.id)
            return
        if self._session is None:  # made with the first event to send, on the event loop
            self._session = aiohttp.ClientSession(headers={"User-Agent": "swarm-unseal-escrow"})
        encoded, session = body.encoded(event), self._session
        await asyncio.gather(*(self._deliver(session, receiver, event, encoded)
                               for receiver in self.receivers if receiver.wants(event.kind)))

    async def _deliver(self, session: aiohttp.ClientSession, receiver: Receiver, event: Event,
                       encoded: bytes) -> None:
        def failed() -> None:
            self._failures.labels(receiver.name, event.kind).inc()

        delivered = await deliver(session, receiver, event.id, event.kind, encoded,
                                  failed=failed)
        self._deliveries.labels(receiver.name, event.kind,
                                "delivered" if delivered else "given_up").inc()

    async def _claim(self, event: Event) -> bool:
        try:
            escrow = await self._service()
            return await self._on_vault(lambda: escrow.claim(event))
        except EscrowError as exc:
            # Told twice (receivers can de-duplicate on the id) beats not told at all.
            log.warning("notification %s %s could not be claimed (%s): sent all the same, "
                        "another replica may send it too", event.kind, event.id, exc.message)
            return True

    async def _watch_the_clock(self) -> None:
        """Every WATCH_SECONDS, the events time brought about since the last look."""
        since = datetime.now(UTC) - LOOKBACK
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            now = datetime.now(UTC)
            try:
                escrow = await self._service()
                due = await self._on_vault(partial(escrow.due, since, now))
            except EscrowError as exc:  # the next look covers this one's time too
                log.warning("expiries and silent nodes not looked for: %s", exc.message)
                continue
            except Exception:  # a bug: said loudly, and the looking goes on
                log.exception("expiries and silent nodes not looked for")
                continue
            since = now
            for event in due:
                if event.kind in self._wanted:
                    self._take(event)

    async def _logged(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:
            log.exception("a notification failed")
