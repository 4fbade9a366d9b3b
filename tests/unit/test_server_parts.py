"""The server's parts that need no token, database or socket: long polls, refusal summaries
and the metrics exposition (escrow/server/; the notifier's are in test_notifier.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry, Counter

from escrow.core.protocol import RequestState, RequestStatus
from escrow.core.states import NodeState
from escrow.core.version import VERSION
from escrow.server import waiters
from escrow.server.metrics import Metrics, Sample
from escrow.server.refusal_log import RefusalLog
from escrow.server.unidentified import UnidentifiedRefusals
from escrow.server.waiters import Waiters
from escrow.service.readings import Tally


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


# -- metrics --------------------------------------------------------------------------------

def scraped(metrics: Metrics, sample: Sample) -> str:
    body, content_type = metrics.latest(sample)
    assert content_type.startswith("text/plain; version=0.0.4")
    return body.decode()


def test_the_exposition_carries_every_series_and_the_gauges_sampled_at_the_scrape() -> None:
    text = scraped(Metrics(), Sample(4096, True, Tally(3, {("c1", NodeState.UNLOCKED): 2,
                                                           ("c1", NodeState.UNREACHABLE): 1})))
    assert "escrow_pending_approvals 3.0" in text
    assert 'escrow_nodes{cluster="c1",state="unlocked"} 2.0' in text
    assert "escrow_data_dir_free_bytes 4096.0" in text
    assert "escrow_hsm_up 1.0" in text
    assert "escrow_store_up 1.0" in text
    assert f'escrow_build_info{{version="{VERSION}"}} 1.0' in text
    for name in ("escrow_requests_total", "escrow_shares_released_total",
                 "escrow_hsm_seconds", "escrow_connections_dropped_total",
                 "escrow_unauthenticated_refusals_total", "escrow_source_limited_total",
                 "escrow_http_request_duration_seconds", "process_cpu_seconds_total",
                 "python_info"):
        assert f"# TYPE {name} " in text


def test_a_node_state_no_node_is_in_any_more_leaves_the_exposition() -> None:
    metrics = Metrics()
    scraped(metrics, Sample(1, True, Tally(0, {("c1", NodeState.LOCKED): 1})))
    text = scraped(metrics, Sample(1, True, Tally(0, {("c1", NodeState.REVOKED): 1})))
    assert 'state="locked"' not in text
    assert 'escrow_nodes{cluster="c1",state="revoked"} 1.0' in text


def test_while_the_store_is_down_its_series_leave_the_exposition_and_store_up_says_so(
        ) -> None:
    metrics = Metrics()
    scraped(metrics, Sample(1, True, Tally(2, {("c1", NodeState.LOCKED): 1})))
    text = scraped(metrics, Sample(1, False, None))
    assert "escrow_store_up 0.0" in text
    assert "escrow_hsm_up 0.0" in text
    assert "# TYPE escrow_pending_approvals " not in text
    assert "# TYPE escrow_nodes " not in text
    assert "escrow_data_dir_free_bytes 1.0" in text


def test_a_scraper_that_asks_for_openmetrics_gets_it_and_any_other_the_text_format() -> None:
    metrics = Metrics()
    sample = Sample(1, True, None)
    body, content_type = metrics.latest(sample, "application/openmetrics-text; version=1.0.0,"
                                                "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert "# TYPE escrow_build info" in body.decode()
    body, content_type = metrics.latest(sample, "application/json")
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"# EOF" not in body
