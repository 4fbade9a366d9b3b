"""One event delivered to a real HTTP receiver on loopback (escrow/notifications/delivery.py):
which answers are retried, which given up at once, redirects never followed, every attempt
signed anew. The back-off's sleeps are recorded, not slept."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools

import aiohttp
import pytest
from aiohttp import web

from escrow.notifications import retry, signing
from escrow.notifications.delivery import deliver
from escrow.notifications.events import EventKind
from escrow.notifications.receivers import Receiver
from lab.net import free_port
from lab.receiver import receiving

SECRET = b"a" * 32
BODY = b'{"event":"requested","id":"ev-1"}'


class Script:
    """A receiver answering ``statuses`` in turn (the last one for ever), keeping what it
    got."""

    def __init__(self, *statuses: int, delay: float = 0.0) -> None:
        self.statuses = statuses
        self.delay = delay
        self.got: list[tuple[dict[str, str], bytes]] = []

    async def answer(self, request: web.Request) -> web.StreamResponse:
        self.got.append((dict(request.headers), await request.read()))
        await asyncio.sleep(self.delay)
        status = self.statuses[min(len(self.got), len(self.statuses)) - 1]
        if 300 <= status < 400:
            return web.Response(status=status, headers={"Location": "http://127.0.0.1:9/x"})
        return web.Response(status=status)


def send(script: Script | None, url: str = "") -> tuple[bool, int, list[float]]:
    """Deliver BODY to ``script`` (or to ``url``): (delivered, failed attempts, waits)."""
    waits: list[float] = []
    failures = 0
    clock = itertools.count(1_764_580_000, 7)

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    def failed() -> None:
        nonlocal failures
        failures += 1

    async def main() -> bool:
        async with aiohttp.ClientSession() as session:
            if script is None:
                return await deliver(session, Receiver("r", url, frozenset(EventKind), SECRET),
                                     "ev-1", EventKind.REQUESTED, BODY, failed=failed,
                                     sleep=sleep, clock=lambda: next(clock))
            async with receiving("/hook", script.answer) as hook:
                return await deliver(session, Receiver("r", hook, frozenset(EventKind), SECRET),
                                     "ev-1", EventKind.REQUESTED, BODY, failed=failed,
                                     sleep=sleep, clock=lambda: next(clock))

    return asyncio.run(main()), failures, waits


def test_a_receiver_answering_500_twice_gets_the_event_at_the_third_attempt() -> None:
    script = Script(500, 503, 200)
    assert send(script)[:2] == (True, 2)
    assert len(script.got) == 3
    assert {body for _, body in script.got} == {BODY}
    assert {h[signing.ID_HEADER] for h, _ in script.got} == {"ev-1"}


def test_each_attempt_is_signed_anew_at_its_own_time() -> None:
    script = Script(500, 200)
    send(script)
    stamps = []
    for headers, body in script.got:
        fields = dict(part.split("=", 1) for part in headers[signing.SIGNATURE_HEADER].split(","))
        mac = hmac.new(SECRET, fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
        assert fields["v1"] == mac
        assert headers[signing.EVENT_HEADER] == "requested"
        assert headers["Content-Type"] == "application/json"
        stamps.append(int(fields["t"]))
    assert stamps == [1_764_580_000, 1_764_580_007]


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_a_transient_answer_is_tried_again(status: int) -> None:
    assert send(Script(status, 204))[:2] == (True, 1)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
def test_a_refusing_answer_is_given_up_at_once(status: int) -> None:
    script = Script(status)
    assert send(script) == (False, 1, [])
    assert len(script.got) == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_neither_followed_nor_tried_again(
        status: int, caplog: pytest.LogCaptureFixture) -> None:
    script = Script(status)
    with caplog.at_level("WARNING", "escrow.webhook"):
        assert send(script) == (False, 1, [])
    assert len(script.got) == 1
    assert f"answered {status}, a redirect, which is not followed" in caplog.text


def test_a_receiver_that_keeps_failing_is_given_up_after_five_attempts() -> None:
    script = Script(500)
    delivered, failures, waits = send(script)
    assert (delivered, failures, len(script.got), len(waits)) == (False, 5, 5, 4)


def test_no_listener_is_tried_again_and_the_log_names_the_receiver_not_the_url(
        caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook?token=sekrit"
    with caplog.at_level("INFO", "escrow.webhook"):
        assert send(None, url)[:2] == (False, 5)
    assert "no answer (ClientConnectorError)" in caplog.text
    assert "webhook r: requested ev-1 given up" in caplog.text
    assert "sekrit" not in caplog.text


def test_a_receiver_slower_than_the_attempts_deadline_is_tried_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "ATTEMPT_TIMEOUT_SECONDS", 0.2)
    script = Script(200, delay=1.0)
    delivered, failures, _ = send(script)
    assert (delivered, failures, len(script.got)) == (False, 5, 5)
