"""The server's notifier without a token, database or receiver (escrow/server/notifier.py):
alerts logged and sent, an event claimed once and only when a receiver wants it, sent anyway
when it cannot be claimed, the periodic look at each stretch of time once, and what is not
delivered yet cancelled at stop. Deliveries themselves are tests/integration's."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiohttp
import pytest

from escrow.audit import AuditEvent
from escrow.core.errors import StoreError
from escrow.core.states import RequestState
from escrow.core.timestamps import timestamp
from escrow.notifications import events
from escrow.notifications.events import Event, EventKind
from escrow.notifications.receivers import Receiver
from escrow.server import notifier
from escrow.server.metrics import Metrics, Sample
from escrow.server.notifier import Notifier
from escrow.store import RequestRecord

T = TypeVar("T")
NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
Sent = list[tuple[str, str, dict[str, Any]]]  # (receiver, event kind, body)


def receiver(name: str, *kinds: EventKind) -> Receiver:
    return Receiver(name, f"https://chat.example/{name}", frozenset(kinds or EventKind),
                    b"s" * 32)


def asking(request_id: str = "r-1") -> RequestRecord:
    return RequestRecord(request_id, "c-1", "n-1", "manager-1", "unknown", "192.0.2.1", "pem",
                         b"k", "1", timestamp(NOW), timestamp(NOW + timedelta(minutes=15)),
                         RequestState.PENDING)


class FakeService:
    """The store's side of the claims: the first claim of a key wins, as Store.use_once."""

    def __init__(self, failing: bool = False, due: list[Event] | None = None) -> None:
        self.claims: list[str] = []
        self.taken: set[bytes] = set()
        self.failing = failing
        self.found = due or []
        self.looks: list[tuple[datetime, datetime]] = []

    def claim(self, event: Event) -> bool:
        self.claims.append(event.id)
        if self.failing:
            raise StoreError("the database is away", "wait")
        fresh = event.claim_key not in self.taken
        self.taken.add(event.claim_key)
        return fresh

    def due(self, start: datetime, now: datetime) -> list[Event]:
        self.looks.append((start, now))
        return self.found if len(self.looks) == 1 else []


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    posted: Sent = []

    async def deliver(session: aiohttp.ClientSession, to: Receiver, event_id: str,
                      kind: EventKind, body: bytes, *, failed: Callable[[], None]) -> bool:
        posted.append((to.name, kind.value, json.loads(body)))
        return True

    monkeypatch.setattr(notifier, "deliver", deliver)
    return posted


def make(service: FakeService, *receivers: Receiver) -> tuple[Notifier, Metrics]:
    metrics = Metrics()

    async def on_vault(fn: Callable[[], T]) -> T:
        return fn()

    async def ready() -> FakeService:
        return service

    return Notifier(receivers, metrics.webhook_deliveries, metrics.webhook_failures, on_vault,
                    ready), metrics


def run(notifying: Notifier, *work: Callable[[], None], settle: float = 0.05) -> None:
    async def main() -> None:
        notifying.start()
        for step in work:
            await asyncio.to_thread(step)  # as the vault thread calls the hooks
        await asyncio.sleep(settle)
        await notifying.stop()

    asyncio.run(main())


ALERT = AuditEvent("key.versions_full", "node:n-1", "c-1", {"retained": 8, "node": "n`<!here>"})


def test_an_alert_is_logged_and_sent_with_its_text_neutralised(
        sent: Sent, caplog: pytest.LogCaptureFixture) -> None:
    notifying, _ = make(FakeService(), receiver("oncall"))
    with caplog.at_level(logging.WARNING, "escrow.server"):
        run(notifying, lambda: notifying.alert(ALERT))
    assert caplog.messages == ['alert: key.versions_full in cluster c-1: '
                               '{"node": "n`<!here>", "retained": 8}']
    [(name, kind, body)] = sent
    assert (name, kind, body["alert"], body["details"]) == (
        "oncall", "alert", "key.versions_full", {"retained": 8, "node": "n`<!here>"})
    assert body["text"] == ("Escrow alert `key.versions_full` in cluster `c-1`: "
                            "`{\"node\": \"n'&lt;!here&gt;\", \"retained\": 8}`")


def test_an_alert_without_a_cluster_names_none(caplog: pytest.LogCaptureFixture) -> None:
    notifying, _ = make(FakeService())
    with caplog.at_level(logging.WARNING, "escrow.server"):
        notifying.alert(AuditEvent("audit.gap", "escrow"))
    assert caplog.messages == ["alert: audit.gap in cluster -: {}"]


def test_without_receivers_or_before_the_server_runs_an_alert_is_only_logged(
        sent: Sent) -> None:
    service = FakeService()
    run(make(service)[0], lambda: None)
    lone, _ = make(service)
    run(lone, lambda: lone.alert(ALERT))
    early, _ = make(service, receiver("oncall"))
    early.alert(ALERT)  # not started: no loop to send on
    assert (sent, service.claims) == ([], [])


def test_an_event_no_receiver_wants_is_never_claimed_nor_sent(sent: Sent) -> None:
    service = FakeService()
    notifying, _ = make(service, receiver("chat", EventKind.UNLOCKED))
    run(notifying, lambda: notifying.notify(events.requested(asking(), 1, NOW)),
        lambda: notifying.notify(events.unlocked(asking(), 1, NOW)))
    assert service.claims == [events.unlocked(asking(), 1, NOW).id]
    assert [(name, kind) for name, kind, _ in sent] == [("chat", "unlocked")]


def test_each_receiver_gets_only_the_events_it_asked_for(sent: Sent) -> None:
    notifying, _ = make(FakeService(), receiver("oncall"),
                        receiver("chat", EventKind.UNLOCKED, EventKind.EXPIRED))
    run(notifying, lambda: notifying.notify(events.requested(asking(), 1, NOW)),
        lambda: notifying.notify(events.unlocked(asking(), 1, NOW)))
    assert sorted((name, kind) for name, kind, _ in sent) == [
        ("chat", "unlocked"), ("oncall", "requested"), ("oncall", "unlocked")]


def test_an_event_another_replica_claimed_is_not_sent_again(sent: Sent) -> None:
    service = FakeService()
    event = events.expired(asking(), 1)
    service.taken.add(event.claim_key)  # the other replica was first
    notifying, _ = make(service, receiver("oncall"))
    run(notifying, lambda: notifying.notify(event))
    assert (service.claims, sent) == ([event.id], [])


def test_an_event_that_cannot_be_claimed_is_sent_all_the_same(
        sent: Sent, caplog: pytest.LogCaptureFixture) -> None:
    notifying, _ = make(FakeService(failing=True), receiver("oncall"))
    with caplog.at_level(logging.WARNING, "escrow.server"):
        run(notifying, lambda: notifying.notify(events.expired(asking(), 1)))
    assert [kind for _, kind, _ in sent] == ["expired"]
    assert "could not be claimed (the database is away): sent all the same" in caplog.text


def test_an_event_told_over_and_over_is_claimed_and_sent_once(sent: Sent) -> None:
    service = FakeService()
    notifying, _ = make(service, receiver("oncall"))
    refusal = events.refused("unseal", "revoked", "m", "c-1", "n-1", "manager-1", "", NOW)
    run(notifying, *[lambda: notifying.notify(refusal)] * 20)
    assert (len(service.claims), len(sent)) == (1, 1)


def test_the_clock_is_watched_only_for_receivers_of_timed_events_each_stretch_once(
        sent: Sent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notifier, "WATCH_SECONDS", 0.01)
    untimed = FakeService()
    run(make(untimed, receiver("chat", EventKind.UNLOCKED))[0], settle=0.1)
    assert untimed.looks == []
    timed = FakeService(due=[events.expired(asking(), 0)])
    run(make(timed, receiver("oncall", EventKind.EXPIRED))[0], settle=0.1)
    first, *later = timed.looks
    assert first[1] - first[0] >= notifier.LOOKBACK  # a new replica looks an hour back
    assert later
    assert all(start == end for (_, end), (start, _) in zip(timed.looks, later, strict=False))
    assert [kind for _, kind, _ in sent] == ["expired"]


def test_deliveries_still_running_at_stop_are_cancelled(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cancelled = threading.Event()

    async def deliver(session: aiohttp.ClientSession, to: Receiver, event_id: str,
                      kind: EventKind, body: bytes, *, failed: Callable[[], None]) -> bool:
        try:
            await asyncio.sleep(30)  # a receiver that keeps failing, between two attempts
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return True

    monkeypatch.setattr(notifier, "deliver", deliver)
    notifying, metrics = make(FakeService(), receiver("oncall"))
    with caplog.at_level(logging.WARNING, "escrow.server"):
        run(notifying, lambda: notifying.notify(events.requested(asking(), 1, NOW)))
    assert cancelled.is_set()
    assert "1 notification(s) not delivered yet were cancelled" in caplog.text
    text = metrics.latest(Sample(0, True, None))[0].decode()
    assert ('escrow_webhook_deliveries_total{event="requested",outcome="delivered",'
            'receiver="oncall"} 0.0') in text


def test_every_receivers_series_is_in_the_exposition_from_the_start() -> None:
    _, metrics = make(FakeService(), receiver("chat", EventKind.UNLOCKED))
    text = metrics.latest(Sample(0, True, None))[0].decode()
    assert 'escrow_webhook_failed_attempts_total{event="unlocked",receiver="chat"} 0.0' in text
    assert ('escrow_webhook_deliveries_total{event="unlocked",outcome="given_up",'
            'receiver="chat"} 0.0') in text
    assert "https://" not in text  # receivers are named, their URLs never shown
