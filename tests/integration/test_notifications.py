"""Notifications from a real `escrow serve` (TLS, SoftHSM, SQLite, then two replicas on
PostgreSQL) to real HTTP receivers on loopback, driven by real requests through the agent's own
client and the custodian CLI: a receiver that fails twice gets the event after retries,
signed as README's check (read from README) verifies, the failures counted in /metrics; each
receiver gets only the events it asked for; an expiry and a silent node, found by the server's
periodic look, are told once, a hostile hostname stored by an older escrow neutralised; a
stopping escrow cancels what it has not delivered; two replicas tell each event once."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.release import candidate_keys
from escrow.notifications.signing import ID_HEADER, SIGNATURE_HEADER
from escrow.server.notifier import WATCH_SECONDS
from lab.api import beat, client, enrolled, run
from lab.commands import readme_blocks
from lab.postgres import Server
from lab.receiver import Receivers
from lab.server import BOOT_ID, EscrowProcess, Node, make_escrow, make_replica

pytestmark = pytest.mark.slow
TTL = 8  # seconds a request lives: time enough to approve one, short enough to see it expire
# What an older escrow, which checked no hostname, may have stored: chat markup, a mention, a
# terminal escape.
HOSTILE = "<!channel> *x* @here \x1b[2K"


@dataclass
class Hooked:
    escrow: EscrowProcess
    secrets: dict[str, bytes]


@pytest.fixture(scope="module")
def receivers() -> Iterator[Receivers]:
    with Receivers(fail_first={"flaky": 2}) as running:
        yield running


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory, receivers: Receivers) -> Iterator[Hooked]:
    """One escrow with three receivers: oncall hears of everything, flaky (failing each
    event's first two attempts) of requests, chat of unlocks and expiries."""
    escrow = make_escrow(tmp_path_factory.mktemp("notifications"),
                         ESCROW_REQUESTS_TTL_SECONDS=str(TTL))
    secrets = {"oncall": escrow.webhook("oncall", receivers.url("oncall")),
               "flaky": escrow.webhook("flaky", receivers.url("flaky"), ["requested"]),
               "chat": escrow.webhook("chat", receivers.url("chat"), ["unlocked", "expired"])}
    escrow.custodian("alice")
    escrow.start()
    yield Hooked(escrow, secrets)
    assert escrow.stop() == 0


def readme_verify() -> Callable[[bytes, bytes, str], bool]:
    """README's `verify`, as a receiver would paste it."""
    [code] = readme_blocks("Notifications", 3, language="python")
    namespace: dict[str, object] = {}
    exec("\n".join(code), namespace)  # noqa: S102 (README's own example)
    verify = namespace["verify"]
    assert callable(verify)
    return verify


async def ask(escrow: EscrowProcess, node: Node, hostname: str = "") -> str:
    """An unseal request of ``node`` that waits for custodians: its id."""
    async with client(escrow) as c:
        status, _ = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                   node.agent_key, hostname or node.hostname, BOOT_ID)
    assert status.state == "pending"
    return status.request_id


def test_a_receiver_answering_500_twice_gets_the_request_signed_as_readme_checks_it(
        hooked: Hooked, receivers: Receivers) -> None:
    escrow = hooked.escrow

    def counted(name: str, **labels: str) -> float:
        return escrow.metric(name, receiver="flaky", event="requested", **labels)

    failed_before = counted("escrow_webhook_failed_attempts_total")
    _, node, _ = enrolled(escrow, 2, "auto,alice")
    request_id = run(ask(escrow, node))
    got = receivers.wait("flaky", "requested", 40, request_id=request_id)
    attempts = [a for a in receivers.attempts(got.header(ID_HEADER)) if a.receiver == "flaky"]
    assert [a.status for a in attempts] == [500, 500, 200]
    assert {a.body for a in attempts} == {got.body}  # the same event, signed anew each time
    verify = readme_verify()
    assert all(verify(hooked.secrets["flaky"], a.body, a.header(SIGNATURE_HEADER))
               for a in attempts)
    assert not verify(hooked.secrets["oncall"], got.body, got.header(SIGNATURE_HEADER))
    assert not verify(hooked.secrets["flaky"], got.body.replace(b"manager-1", b"manager-2"),
                      got.header(SIGNATURE_HEADER))
    assert counted("escrow_webhook_failed_attempts_total") - failed_before == 2
    assert counted("escrow_webhook_deliveries_total", outcome="delivered") >= 1
    sent = got.json
    assert (sent["id"], sent["node_id"], sent["hostname"], sent["needed"]) == (
        got.header(ID_HEADER), node.node_id, node.hostname, 1)
    assert sent["text"] == (f"Swarm manager `{node.hostname}` is locked and waits for 1 "
                            f"custodian approval(s): escrow approve {request_id}")
    [example] = readme_blocks("Notifications", 3, language="json")
    assert sorted(json.loads("\n".join(example))) == sorted(sent)  # README shows what is sent


def test_each_receiver_gets_only_the_events_it_asked_for(hooked: Hooked,
                                                         receivers: Receivers) -> None:
    escrow = hooked.escrow
    _, node, key = enrolled(escrow, 2, "auto,alice")

    async def approved_and_unlocked() -> str:
        async with client(escrow) as c:
            status, ephemeral = await c.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                               node.agent_key, node.hostname, BOOT_ID)
            approved = await asyncio.to_thread(escrow.as_custodian, "alice", "approve",
                                               status.request_id, "--yes")
            assert approved.returncode == 0, approved.stderr
            ready = await c.poll(status.request_id)
            assert list(candidate_keys(ready, ephemeral)) == [(1, key)]
            await c.report(status.request_id, node.node_id, node.agent_key, "unlocked", 1)
            return status.request_id

    request_id = run(approved_and_unlocked())
    receivers.wait("chat", "unlocked", 20, request_id=request_id)
    receivers.wait("oncall", "unlocked", 20, request_id=request_id)
    time.sleep(1)  # for anything sent at the same time to arrive

    def told(name: str) -> list[str]:
        return [d.json["event"] for d in receivers.delivered(name, request_id=request_id)]

    assert told("oncall") == ["requested", "approved", "unlocked"]
    assert told("chat") == ["unlocked"]
    assert set(told("flaky")) <= {"requested"}
    [approval] = receivers.delivered("oncall", "approved", request_id=request_id)
    assert (approval.json["custodian"], approval.json["approvals"],
            approval.json["needed"]) == ("alice", 1, 0)
    [unlock] = receivers.delivered("chat", "unlocked", request_id=request_id)
    assert unlock.json["version"] == 1
    assert unlock.header(ID_HEADER) == unlock.json["id"]


def test_an_expired_request_is_told_once_with_a_stored_hostile_hostname_neutralised(
        hooked: Hooked, receivers: Receivers) -> None:
    escrow = hooked.escrow
    _, node, _ = enrolled(escrow, 2, "auto,alice")
    request_id = run(ask(escrow, node))
    with sqlite3.connect(escrow.data_dir / "escrow.db") as db:
        db.execute("UPDATE requests SET hostname = ? WHERE request_id = ?",
                   (HOSTILE, request_id))
    db.close()
    got = receivers.wait("chat", "expired", TTL + WATCH_SECONDS + 15, request_id=request_id)
    text = got.json["text"]
    assert "`&lt;!channel&gt; *x* @\u200bhere \\x1b[2K`" in text
    assert "<!channel>" not in text
    assert "@here" not in text
    assert "\x1b" not in text
    assert got.json["hostname"] == "<!channel> *x* @here \\x1b[2K"
    assert got.json["needed"] == 1
    time.sleep(WATCH_SECONDS + 1)  # the next look finds nothing new
    for name in ("chat", "oncall"):
        assert len(receivers.delivered(name, "expired", request_id=request_id)) == 1


def test_a_node_whose_heartbeats_stop_is_told_unreachable_once(
        hooked: Hooked, receivers: Receivers) -> None:
    escrow = hooked.escrow
    _, node, _ = enrolled(escrow, 1, "auto")

    async def one_beat() -> None:
        async with client(escrow) as c:
            await beat(c, node, BOOT_ID, interval=5)

    run(one_beat())
    got = receivers.wait("oncall", "node_unreachable", 3 * 5 + WATCH_SECONDS + 15,
                         node_id=node.node_id)
    assert (got.json["hostname"], got.json["boot_id"], got.json["goodbye"],
            got.json["interval_seconds"]) == (node.hostname, BOOT_ID, False, 5)
    time.sleep(WATCH_SECONDS + 1)
    assert len(receivers.delivered("oncall", "node_unreachable", node_id=node.node_id)) == 1
    assert receivers.delivered("chat", node_id=node.node_id) == []


def test_a_stopping_escrow_cancels_deliveries_still_retrying(tmp_path: Path) -> None:
    with Receivers(fail_first={"down": 100}) as failing:
        escrow = make_escrow(tmp_path)
        escrow.webhook("down", failing.url("down"), ["requested"])
        escrow.custodian("alice")
        escrow.start()
        try:
            _, node, _ = enrolled(escrow, 2, "auto,alice")
            run(ask(escrow, node))
            deadline = time.monotonic() + 10
            while not failing.got and time.monotonic() < deadline:
                time.sleep(0.1)
            assert [d.status for d in failing.got] == [500]  # waiting for its second attempt
        finally:
            started = time.monotonic()
            assert escrow.stop() == 0
        assert time.monotonic() - started < 15
        assert "1 notification(s) not delivered yet were cancelled" in escrow.log()
        assert len(failing.got) < 5


@pytest.mark.parametrize("case", ["secret readable by all", "retired webhook_url"])
def test_escrow_serve_refuses_a_bad_receiver_before_it_listens_saying_what_to_do(
        tmp_path: Path, case: str) -> None:
    url = "https://chat.example/hooks/T0/B0/sekrit-token"
    if case == "retired webhook_url":
        escrow = make_escrow(tmp_path, ESCROW_SERVER_WEBHOOK_URL=url)
        expected = ["ESCROW_SERVER_WEBHOOK_URL is no longer a setting", "[[webhooks]]"]
    else:
        escrow = make_escrow(tmp_path)
        escrow.webhook("oncall", url)
        (tmp_path / "webhook-oncall.secret").chmod(0o644)
        expected = ["webhook oncall secret file", "readable or writable by every user",
                    "chmod 600"]
    with pytest.raises(RuntimeError, match="escrow serve exited"):
        escrow.start()
    log = escrow.log()
    assert all(text in log for text in expected), log
    assert "sekrit" not in log
    assert "Traceback" not in log


def test_two_replicas_on_one_postgresql_store_tell_each_event_once(
        postgres: Server, tmp_path: Path) -> None:
    with Receivers() as receivers, postgres.database() as name:
        url, password = postgres.url(name), str(postgres.password_file)
        first = make_escrow(tmp_path / "a", "--store-url", url, "--store-password-file",
                            password, ESCROW_REQUESTS_TTL_SECONDS="4")
        first.custodian("alice")
        second = make_replica(first, tmp_path / "b", url, postgres.password_file,
                              ESCROW_REQUESTS_TTL_SECONDS="4")
        secret = first.webhook("oncall", receivers.url("oncall"))
        second.webhook("oncall", receivers.url("oncall"), secret=secret)
        running: list[EscrowProcess] = []
        try:
            for replica in (first, second):
                replica.start()
                running.append(replica)
            _, node, _ = enrolled(first, 2, "auto,alice")
            request_id = run(ask(second, node))

            async def one_beat() -> None:
                async with client(first) as c:
                    await beat(c, node, BOOT_ID, interval=5)

            run(one_beat())
            expired = receivers.wait("oncall", "expired", 4 + WATCH_SECONDS + 15,
                                     request_id=request_id)
            receivers.wait("oncall", "node_unreachable", 3 * 5 + WATCH_SECONDS + 15,
                           node_id=node.node_id)
            time.sleep(WATCH_SECONDS + 1)  # both replicas have looked since
            for event in ("requested", "expired", "node_unreachable"):
                assert len(receivers.delivered("oncall", event, node_id=node.node_id)) == 1, \
                    event
        finally:
            for replica in running:
                replica.stop()
        # Each replica found the expiry; the one that came second found it claimed.
        logs = first.log() + second.log()
        assert f"notification expired {expired.json['id']} is another replica's to send" in logs
