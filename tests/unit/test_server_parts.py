"""The server's parts that need no token, database or socket: long polls, refusal summaries,
alerts and the metrics exposition (escrow/server/)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from escrow import webhook
from escrow.audit import AuditEvent
from escrow.core.protocol import RequestState, RequestStatus
from escrow.server import waiters
from escrow.server.alerts import Alerts
from escrow.server.metrics import Metrics
from escrow.server.refusal_log import RefusalLog
from escrow.server.unidentified import UnidentifiedRefusals
from escrow.server.waiters import Waiters

URL = "https://chat.example/hook"


def status(state: RequestState, needed: int = 0) -> RequestStatus:
    return RequestStatus(request_id="r-1", cluster_id="c-1", node_id="n-1", state=state,
                         created_at="2030-01-01T00:00:00Z", expires_at="2030-01-01T00:15:00Z",
                         threshold=2, needed=needed, approvals=[], releases=[])


PENDING = status("pending", needed=2)
READY = status("ready")


class Looks:
    """The service's status of one request, as a poll sees it: each look takes the next."""

    def __init__(self, *answers: RequestStatus, during: Callable[[], None] = lambda: None
                 ) -> None:
        self.answers = list(answers)
        self.during = during
        self.count = 0

    async def __call__(self) -> RequestStatus:
        self.count += 1
        self.during()
        return self.answers.pop(0)


def poll_and(work: Callable[[Waiters], None], looks: Callable[[], Awaitable[RequestStatus]],
             wait: float, waiting: Waiters | None = None) -> tuple[RequestStatus, float]:
    """A poll with ``work`` done once it waits; what it answered, and after how long."""
    polls = waiting or Waiters()

    async def main() -> tuple[RequestStatus, float]:
        started = time.monotonic()
        task = asyncio.create_task(polls.poll("r-1", looks, wait))
        await asyncio.sleep(0.05)
        work(polls)
        return await task, time.monotonic() - started

    return asyncio.run(main())


# -- long polls -----------------------------------------------------------------------------

def test_a_waiting_poll_looks_again_as_soon_as_a_custodian_decides() -> None:
    looks = Looks(PENDING, READY)
    answer, seconds = poll_and(lambda polls: polls.wake("r-1"), looks, wait=30)
    assert (answer.state, looks.count) == ("ready", 2)
    assert seconds < 5


def test_a_decision_on_another_request_does_not_end_the_wait() -> None:
    looks = Looks(PENDING, PENDING)
    answer, seconds = poll_and(lambda polls: polls.wake("r-2"), looks, wait=0.3)
    assert (answer.state, looks.count) == ("pending", 2)
    assert seconds >= 0.3


def test_a_decision_during_the_first_look_still_wakes_the_poll() -> None:
    polls = Waiters()
    looks = Looks(PENDING, READY, during=lambda: polls.wake("r-1") if looks.count == 1 else None)
    answer, seconds = poll_and(lambda polls: None, looks, wait=30, waiting=polls)
    assert (answer.state, looks.count) == ("ready", 2)
    assert seconds < 5


@pytest.mark.parametrize("wait", [0.0, -5.0, float("nan")])
def test_a_poll_without_a_positive_wait_looks_once(wait: float) -> None:
    looks = Looks(PENDING)
    assert asyncio.run(Waiters().poll("r-1", looks, wait)) == PENDING
    assert looks.count == 1


def test_a_finished_request_is_answered_without_waiting() -> None:
    looks = Looks(READY)
    assert asyncio.run(Waiters().poll("r-1", looks, 30)) == READY
    assert looks.count == 1


def test_no_poll_waits_longer_than_max_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waiters, "MAX_WAIT", 0.1)
    looks = Looks(PENDING, PENDING)
    answer, seconds = poll_and(lambda polls: None, looks, wait=3600)
    assert (answer, looks.count) == (PENDING, 2)
    assert seconds < 2


def test_shutting_down_answers_waiting_polls_at_once_and_later_ones_do_not_wait() -> None:
    looks = Looks(PENDING, PENDING)
    closed = Waiters()
    answer, seconds = poll_and(lambda polls: polls.close(), looks, wait=30, waiting=closed)
    assert (answer, looks.count, seconds < 5) == (PENDING, 2, True)
    later = Looks(PENDING)
    assert asyncio.run(closed.poll("r-1", later, 30)) == PENDING
    assert later.count == 1


def test_unknown_and_finished_requests_leave_no_waiter_behind() -> None:
    polls = Waiters()

    async def unknown() -> RequestStatus:
        raise LookupError("no such request")

    with pytest.raises(LookupError):
        asyncio.run(polls.poll("nobody", unknown, 30))
    asyncio.run(polls.poll("r-1", Looks(READY), 30))
    asyncio.run(polls.poll("r-2", Looks(PENDING), 0))
    assert list(polls._decided) == ["r-2"]


# -- refusals of unidentified callers -------------------------------------------------------

def refusals(interval: float = 60.0) -> tuple[UnidentifiedRefusals, Callable[[], float | None]]:
    """The refusals, and how many were counted as ``deposit.bad_signature``."""
    registry = CollectorRegistry()
    counter = Counter("refusals", "test", ["action", "reason"], registry=registry)
    return UnidentifiedRefusals(counter, RefusalLog(interval=interval)), lambda: (
        registry.get_sample_value("refusals_total", {"action": "deposit",
                                                     "reason": "bad_signature"}))


def test_every_refusal_is_counted_and_a_source_is_summarised_at_its_first(
        caplog: pytest.LogCaptureFixture) -> None:
    noted, counted = refusals()
    with caplog.at_level(logging.WARNING, "escrow.server"):
        for _ in range(3):
            noted.note("deposit", "bad_signature", "192.0.2.7")
    assert counted() == 3
    assert caplog.messages == ["refused 1 unauthenticated request(s) from 192.0.2.7 in 0 s: "
                               "deposit.bad_signature x1"]


def test_at_shutdown_what_was_refused_since_the_last_summary_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    noted, _ = refusals()
    for _ in range(3):
        noted.note("custodian", "unauthenticated", "192.0.2.7")
    caplog.clear()
    with caplog.at_level(logging.WARNING, "escrow.server"):
        noted.flush()
        assert caplog.messages == []
        noted.flush(everything=True)
    assert len(caplog.messages) == 1
    assert caplog.messages[0].endswith(": custodian.unauthenticated x2")


def test_a_source_that_goes_quiet_is_summarised_by_the_background_task(
        caplog: pytest.LogCaptureFixture) -> None:
    noted, _ = refusals(interval=0.2)

    async def main() -> None:
        noted.start()
        for _ in range(2):
            noted.note("enroll", "invalid_body", "192.0.2.7")
        await asyncio.sleep(0.5)
        noted.stop()

    with caplog.at_level(logging.WARNING, "escrow.server"):
        asyncio.run(main())
    assert caplog.messages[-1].endswith(": enroll.invalid_body x1")
    assert len(caplog.messages) == 2


def test_refusals_noted_on_two_threads_are_all_counted() -> None:
    noted, counted = refusals()

    def note_many() -> None:
        for n in range(500):
            noted.note("deposit", "bad_signature", f"192.0.2.{n % 50}")

    threads = [threading.Thread(target=note_many) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counted() == 1000


# -- alerts ---------------------------------------------------------------------------------

Posted = list[tuple[str, dict[str, Any], str]]


@pytest.fixture
def posted(monkeypatch: pytest.MonkeyPatch) -> Posted:
    sent: Posted = []

    async def post(url: str, body: dict[str, Any], *, about: str,
                   timeout: float = webhook.TIMEOUT_SECONDS) -> bool:
        sent.append((url, body, about))
        return True

    monkeypatch.setattr(webhook, "post", post)
    return sent


EVENT = AuditEvent("key.versions_full", "escrow", "c-1", {"versions": 8, "node": "n`<!here>"})


def alert_from_the_vault_thread(alerts: Alerts, event: AuditEvent) -> None:
    async def main() -> None:
        alerts.start()
        await asyncio.to_thread(alerts.alert, event)
        await asyncio.sleep(0.05)

    asyncio.run(main())


def test_an_alert_is_logged_and_posted_with_its_text_neutralised(
        posted: Posted, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "escrow.server"):
        alert_from_the_vault_thread(Alerts(URL), EVENT)
    assert caplog.messages == ['alert: key.versions_full in cluster c-1: '
                               '{"node": "n`<!here>", "versions": 8}']
    assert posted == [(URL, {
        "text": "Escrow alert `key.versions_full` in cluster `c-1`: "
                "`{\"node\": \"n'&lt;!here&gt;\", \"versions\": 8}`",
        "event": "key.versions_full", "cluster_id": "c-1",
        "details": {"versions": 8, "node": "n`<!here>"}}, "key.versions_full")]


def test_an_alert_without_a_cluster_names_none(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "escrow.server"):
        Alerts("").alert(AuditEvent("audit.gap", "escrow"))
    assert caplog.messages == ["alert: audit.gap in cluster -: {}"]


def test_an_alert_is_only_logged_without_a_webhook_or_before_the_server_runs(
        posted: Posted) -> None:
    alert_from_the_vault_thread(Alerts(""), EVENT)
    Alerts(URL).alert(EVENT)
    assert posted == []


def test_custodians_hear_of_an_unseal_request_only_while_it_needs_them(posted: Posted) -> None:
    async def main(alerts: Alerts) -> None:
        alerts.unseal_requested(READY, "manager-1")
        alerts.unseal_requested(PENDING, "manager-1")
        await asyncio.sleep(0.05)

    asyncio.run(main(Alerts(URL)))
    asyncio.run(main(Alerts("")))
    assert len(posted) == 1
    url, body, about = posted[0]
    assert (url, about) == (URL, "r-1")
    assert body == webhook.payload(webhook.PendingApproval(
        "r-1", "c-1", "n-1", "manager-1", 2, PENDING.expires_at))


def test_posts_still_running_at_cleanup_are_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    cancelled = asyncio.Event()

    async def post(url: str, body: dict[str, Any], *, about: str,
                   timeout: float = webhook.TIMEOUT_SECONDS) -> bool:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return True

    monkeypatch.setattr(webhook, "post", post)

    async def main() -> None:
        alerts = Alerts(URL)
        alerts.unseal_requested(PENDING, "manager-1")
        await asyncio.sleep(0.05)
        alerts.stop()
        await asyncio.wait_for(cancelled.wait(), timeout=5)

    asyncio.run(main())


# -- metrics --------------------------------------------------------------------------------

def test_the_exposition_carries_every_series_and_the_gauges_sampled_at_the_scrape() -> None:
    metrics = Metrics()
    text = metrics.latest(pending=3, free_bytes=4096,
                          nodes={("c1", "unlocked"): 2, ("c1", "unreachable"): 1}).decode()
    assert "escrow_pending_approvals 3.0" in text
    assert 'escrow_nodes{cluster="c1",state="unlocked"} 2.0' in text
    assert "escrow_data_dir_free_bytes 4096.0" in text
    for name in ("escrow_requests_total", "escrow_shares_released_total",
                 "escrow_hsm_seconds", "escrow_connections_dropped_total",
                 "escrow_unauthenticated_refusals_total", "escrow_source_limited_total"):
        assert f"# TYPE {name} " in text


def test_a_node_state_no_node_is_in_any_more_leaves_the_exposition() -> None:
    metrics = Metrics()
    metrics.latest(pending=0, free_bytes=1, nodes={("c1", "locked"): 1})
    text = metrics.latest(pending=0, free_bytes=1, nodes={("c1", "unlocked"): 1}).decode()
    assert 'state="locked"' not in text
    assert 'escrow_nodes{cluster="c1",state="unlocked"} 1.0' in text
