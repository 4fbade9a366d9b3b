"""The agent's HTTPS transport (agent/https.py) against a real TLS server on loopback that
answers as the test scripts it: kept connections, a server that drops them, oversized and
broken answers, cancellation, and a certificate this agent does not trust."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.client import EscrowClient
from agent.errors import EscrowUnavailable
from agent.https import MAX_BODY, HttpError, Origin
from escrow.core.protocol import HealthResponse
from escrow.core.tls import client_context, make_quickstart_tls, server_context

# What the server does with one request on a connection: bytes to send back, whether to
# close the connection afterwards.
Script = Callable[[int], tuple[bytes, bool]]

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n' \
     b'{"status":"ok"}'


class Server:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.requests += 1
                answer, close = self.script(self.requests)
                writer.write(answer)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(tmp_path: Path, script: Script) -> AsyncIterator[tuple[Server, str, Path]]:
    ca = make_quickstart_tls(tmp_path / "tls", ["localhost", "127.0.0.1"])
    server = Server(script)
    listener = await asyncio.start_server(
        server.handle, "127.0.0.1", 0,
        ssl=server_context(tmp_path / "tls" / "server.pem", tmp_path / "tls" / "server.key"))
    port = listener.sockets[0].getsockname()[1]
    try:
        yield server, f"https://127.0.0.1:{port}", ca
    finally:
        listener.close()
        await listener.wait_closed()


def always(answer: bytes, close: bool = False) -> Script:
    return lambda _: (answer, close)


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
