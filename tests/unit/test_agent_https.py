"""The agent's HTTPS transport (escrow/https.py, the CLI's too) and its client's failover
between the escrow's URLs (agent/client.py) against real TLS servers on loopback that answer
as the test scripts them (lab/stand_ins.py): kept connections, a server that drops them,
oversized and broken answers, cancellation, a certificate this agent does not trust, requests
that never left, and which failures move a call on to the next URL."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent import client as agent_client
from agent import deposit_key
from agent.client import EscrowClient
from agent.config import CA_SETTING
from agent.errors import EscrowRejected, EscrowUnavailable
from escrow.core import protocol
from escrow.core.errors import ConfigError
from escrow.core.protocol import HealthResponse
from escrow.core.tls import client_context, make_quickstart_tls
from escrow.core.unlockkey import UnlockKey
from escrow.https import MAX_BODY, HttpError, NotSent, Origin
from lab import stand_ins
from lab.net import free_port
from lab.stand_ins import UNAVAILABLE, Script, Server, always, reply

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n' \
     b'{"status":"ok"}'


@asynccontextmanager
async def serving(tmp_path: Path, script: Script) -> AsyncIterator[tuple[Server, str, Path]]:
    """A scripted server with a certificate of its own CA: the server, its URL and the CA."""
    ca = make_quickstart_tls(tmp_path / "tls", ["localhost", "127.0.0.1"])
    async with stand_ins.serving(script, tmp_path / "tls") as (server, url):
        yield server, url, ca


def test_requests_share_one_kept_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, always(OK)) as (server, url, ca):
            origin = Origin(url, client_context(ca), connections=2, keepalive=30)
            for _ in range(3):
                answer = await origin.request("GET", "/healthz", None, 5)
                assert (answer.status, answer.body) == (200, b'{"status":"ok"}')
            await origin.close()
            assert (server.connections, server.requests) == (1, 3)
    asyncio.run(main())


@pytest.mark.parametrize("pause", [0.0, 0.05], ids=["at-once", "after-the-close-is-seen"])
def test_a_connection_the_server_dropped_is_replaced_without_an_error(tmp_path: Path,
                                                                     pause: float) -> None:
    async def main() -> None:
        # The server closes after each answer without saying so (no Connection: close), as
        # one whose keep-alive ran out does.
        async with serving(tmp_path, always(OK, close=True)) as (server, url, ca):
            origin = Origin(url, client_context(ca), connections=1, keepalive=30)
            for _ in range(3):
                assert (await origin.request("GET", "/healthz", None, 5)).status == 200
                await asyncio.sleep(pause)
            await origin.close()
            assert server.connections == 3
    asyncio.run(main())


def test_a_connection_idle_past_keepalive_is_not_reused(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, always(OK)) as (server, url, ca):
            origin = Origin(url, client_context(ca), connections=1, keepalive=0.05)
            await origin.request("GET", "/healthz", None, 5)
            await asyncio.sleep(0.1)
            await origin.request("GET", "/healthz", None, 5)
            await origin.close()
            assert server.connections == 2
    asyncio.run(main())


def test_an_oversized_answer_is_refused_and_its_connection_dropped(tmp_path: Path) -> None:
    huge = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
            + b"x" * (MAX_BODY + 1))

    async def main() -> None:
        async with serving(tmp_path, always(huge)) as (_, url, ca):
            origin = Origin(url, client_context(ca), connections=1, keepalive=30)
            with pytest.raises(HttpError, match="over"):
                await origin.request("GET", "/v1/info", None, 5)
            assert origin._idle == []
            await origin.close()
    asyncio.run(main())


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"status\"",  # cut short
    b"SMTP ready\r\n\r\n",  # not HTTP
], ids=["truncated", "not-http"])
def test_a_broken_answer_is_an_unreachable_escrow_not_a_crash(tmp_path: Path,
                                                               answer: bytes) -> None:
    async def main() -> None:
        async with serving(tmp_path, always(answer, close=True)) as (_, url, ca), \
                EscrowClient(url, ca, timeout=5) as client:
            with pytest.raises(EscrowUnavailable, match="unreachable"):
                await client.health()
    asyncio.run(main())


def test_a_silent_server_times_out_and_a_cancelled_request_keeps_no_connection(
        tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, always(b"")) as (_, url, ca):
            origin = Origin(url, client_context(ca), connections=1, keepalive=30)
            with pytest.raises(TimeoutError):
                await origin.request("GET", "/v1/unseal/r?wait=20", None, 0.2)
            task = asyncio.create_task(origin.request("GET", "/v1/unseal/r?wait=20", None, 30))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert origin._idle == []
            await origin.close()
    asyncio.run(main())


def test_an_untrusted_certificate_is_named_as_such(tmp_path: Path) -> None:
    other_ca = make_quickstart_tls(tmp_path / "other", ["localhost"])

    async def main() -> None:
        async with serving(tmp_path, always(OK)) as (server, url, _):
            async with EscrowClient(url, other_ca, timeout=5) as client:
                with pytest.raises(EscrowUnavailable, match="does not trust") as caught:
                    await client.health()
            assert "escrow_ca" in caught.value.hint
            assert server.requests == 0
    asyncio.run(main())


def test_the_answer_reaches_the_protocol_model(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, always(OK)) as (_, url, ca):
            origin = Origin(url, client_context(ca), connections=1, keepalive=30)
            answer = await origin.request("GET", "/healthz", None, 5)
            assert HealthResponse.model_validate_json(answer.body).status == "ok"
            await origin.close()
    asyncio.run(main())


def test_only_https_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="https"):
        Origin("http://escrow:8443", ssl.create_default_context(), connections=1, keepalive=1)



DEAD = f"https://127.0.0.1:{free_port()}"  # nothing listens there
SILENT = b""  # a script's answer: nothing at all, the connection left open
AGENT_KEY = ec.generate_private_key(ec.SECP256R1())
DEPOSIT_KEY = bytes(range(32))
INFO = reply(200, {"api": "v1", "deposit_public_key": protocol.b64e(DEPOSIT_KEY),
                   "server_time": "2026-11-01T12:00:00Z"})
NONCE = reply(200, {"nonce": protocol.b64e(b"\1" * 32), "expires_at": "2026-11-01T12:02:00Z"})
DEPOSITED = reply(201, {"version": 1, "created": True, "fingerprint": "ab"})


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Path]:
    """One certificate for every scripted replica: (its directory, the CA)."""
    return tmp_path / "tls", make_quickstart_tls(tmp_path / "tls", ["127.0.0.1"])


def answers(*script: bytes) -> Script:
    """The n-th request gets the n-th answer, and any after the last, SILENT."""
    return lambda n: (script[n - 1] if n <= len(script) else SILENT, False)


async def deposit(client: EscrowClient) -> int:
    """A deposit, as the agent makes one: /v1/info, a nonce, then the POST it signs."""
    return (await client.deposit("c" * 25, "n" * 25, AGENT_KEY, UnlockKey(bytes(32)),
                                 deposit_key.fingerprint(DEPOSIT_KEY))).version


def test_a_request_that_found_no_connection_is_marked_not_sent() -> None:
    async def main() -> None:
        refused = Origin(DEAD, ssl.create_default_context(), connections=1, keepalive=1)
        with pytest.raises(NotSent) as caught:
            await refused.request("POST", "/v1/unseal", b"{}", 5)
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)

        taken: list[asyncio.StreamWriter] = []

        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            taken.append(writer)  # takes the connection, never says a word of TLS
        listener = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        hung = Origin(f"https://127.0.0.1:{port}", ssl.create_default_context(),
                      connections=1, keepalive=1)
        with pytest.raises(NotSent) as caught:
            await hung.request("POST", "/v1/unseal", b"{}", 0.3)
        assert isinstance(caught.value.__cause__, TimeoutError)
        for writer in taken:
            writer.close()
        listener.close()
        await listener.wait_closed()
    asyncio.run(main())


def test_a_get_that_gets_no_answer_at_one_url_is_asked_at_the_next(
        tls: tuple[Path, Path]) -> None:
    directory, ca = tls

    async def main() -> None:
        async with stand_ins.serving(always(SILENT), directory) as (silent, first), \
                stand_ins.serving(always(OK), directory) as (answering, second), \
                EscrowClient([first, second], ca, timeout=0.3) as client:
            await client.health()
            assert client.url == second
            assert (silent.requests, answering.requests) == (1, 1)
    asyncio.run(main())


def test_a_replica_that_never_finishes_the_handshake_is_left_within_the_connect_time(
        tls: tuple[Path, Path]) -> None:
    """A host that is gone drops packets instead of refusing them: a connection not up within
    connect_timeout counts as not sent (so any request moves on), long before the request's
    own time."""
    directory, ca = tls

    async def main() -> None:
        hung: list[asyncio.StreamWriter] = []

        async def accept_and_say_nothing(reader: asyncio.StreamReader,
                                         writer: asyncio.StreamWriter) -> None:
            hung.append(writer)

        listener = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        try:
            async with stand_ins.serving(always(OK), directory) as (answering, second), \
                    EscrowClient([f"https://localhost:{port}", second], ca, timeout=30,
                                 connect_timeout=0.3) as client:
                began = asyncio.get_running_loop().time()
                await client.health()
                assert asyncio.get_running_loop().time() - began < 5
                assert client.url == second
                assert answering.requests == 1
        finally:
            for writer in hung:
                writer.close()
            listener.close()
            await listener.wait_closed()
    asyncio.run(main())


def test_a_post_that_may_have_been_processed_is_not_sent_again_elsewhere(
        tls: tuple[Path, Path]) -> None:
    directory, ca = tls

    async def main() -> None:
        async with stand_ins.serving(answers(INFO, NONCE), directory) as (silent, first), \
                stand_ins.serving(always(OK), directory) as (other, second), \
                EscrowClient([first, second], ca, timeout=0.3) as client:
            with pytest.raises(EscrowUnavailable) as caught:
                await deposit(client)
            assert caught.value.message == f"the escrow at {first} did not answer within 0.3 s"
            assert silent.requests == 3  # info, nonce, and the deposit left unanswered
            assert other.requests == 0
    asyncio.run(main())


def test_a_503_or_a_refused_connection_moves_a_deposit_on_and_the_next_call_stays_there(
        tls: tuple[Path, Path]) -> None:
    directory, ca = tls
    twice = answers(INFO, NONCE, DEPOSITED, INFO, NONCE, DEPOSITED)

    async def main() -> None:
        async with stand_ins.serving(always(UNAVAILABLE), directory) as (unavailable, first), \
                stand_ins.serving(twice, directory) as (escrow, second), \
                EscrowClient([DEAD, first, second], ca) as client:
            assert await deposit(client) == 1
            assert client.url == second
            assert await deposit(client) == 1
            # The second deposit went straight to the URL that took the first, and each was
            # signed over a nonce of the replica it went to.
            assert (unavailable.requests, escrow.requests) == (1, 6)
    asyncio.run(main())


def test_a_refusal_is_the_escrows_answer_and_is_not_asked_elsewhere(
        tls: tuple[Path, Path]) -> None:
    directory, ca = tls
    refusal = reply(403, {"error": "revoked", "message": "node revoked", "hint": ""})

    async def main() -> None:
        async with stand_ins.serving(always(refusal), directory) as (refusing, first), \
                stand_ins.serving(always(OK), directory) as (other, second), \
                EscrowClient([DEAD, first, second], ca) as client:
            with pytest.raises(EscrowRejected, match="revoked"):
                await client.health()
            assert client.url == first
            assert (refusing.requests, other.requests) == (1, 0)
    asyncio.run(main())


def test_when_no_url_takes_a_call_the_error_names_each_one_and_why(
        tls: tuple[Path, Path], tmp_path: Path) -> None:
    directory, ca = tls
    make_quickstart_tls(tmp_path / "stranger", ["127.0.0.1"])

    async def main() -> None:
        async with stand_ins.serving(always(OK), tmp_path / "stranger") as (untrusted, first), \
                stand_ins.serving(always(UNAVAILABLE), directory) as (_, second), \
                EscrowClient([DEAD, first, second], ca) as client:
            with pytest.raises(EscrowUnavailable) as caught:
                await client.health()
            assert untrusted.requests == 0
        message = caught.value.message
        assert message.startswith("no URL of the escrow could take the request: "
                                  f"the escrow at {DEAD} is unreachable: ")
        assert (f"; the escrow at {first} presented a certificate this agent does not "
                "trust: ") in message
        assert message.endswith(f"; the escrow at {second} cannot serve now (503): "
                                "unhealthy: the database is away")
        assert caught.value.hint == ("check the escrow service and the network; check "
                                     f"{CA_SETTING}: the escrow's tls/ca.pem, or the CA of "
                                     "its server.tls_cert; the agent retries by itself once "
                                     "the escrow recovers")
    asyncio.run(main())


def test_a_call_ends_within_its_time_and_names_the_urls_it_had_no_time_for(
        tls: tuple[Path, Path]) -> None:
    directory, ca = tls

    async def main() -> None:
        async with stand_ins.serving(always(SILENT), directory) as (_, first), \
                stand_ins.serving(always(OK), directory) as (answering, second), \
                EscrowClient([first, second], ca, timeout=0.3, call_timeout=0.3) as client:
            with pytest.raises(EscrowUnavailable) as caught:
                await client.health()
            assert answering.requests == 0
        assert caught.value.message == (
            f"no URL of the escrow could take the request: the escrow at {first} did not "
            f"answer within 0.3 s; not tried within the 0.3 s the request may take: {second}")
    asyncio.run(main())


def test_a_long_poll_moved_on_asks_the_next_url_to_wait_only_as_long_as_the_call_has_left(
        tls: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    directory, ca = tls
    monkeypatch.setattr(agent_client, "POLL_SLACK", 0.5)
    pending = reply(200, {"request_id": "r-1", "cluster_id": "c" * 25, "node_id": "n" * 25,
                          "state": "pending", "created_at": "2026-11-01T12:00:00Z",
                          "expires_at": "2026-11-01T12:15:00Z", "threshold": 2, "needed": 1,
                          "approvals": [], "releases": []})

    async def main() -> None:
        async with stand_ins.serving(always(SILENT), directory) as (silent, first), \
                stand_ins.serving(always(pending), directory) as (answering, second), \
                EscrowClient([first, second], ca, call_timeout=3.5) as client:
            status = await client.poll("r-1", wait=2)
            assert (status.request_id, status.state) == ("r-1", "pending")
            assert silent.heads[0].startswith(b"GET /v1/unseal/r-1?wait=2 ")
            # 2.5 s of 3.5 went to the first URL: the second is asked to wait 0.5 s.
            assert answering.heads[0].startswith(b"GET /v1/unseal/r-1?wait=0.")
    asyncio.run(main())


def test_an_unreadable_escrow_ca_is_told_in_the_agent_s_own_words(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as told:
        client_context(tmp_path / "nope.pem", CA_SETTING)
    assert "--escrow-ca" in told.value.hint
    assert "ESCROW_CA" not in told.value.hint
