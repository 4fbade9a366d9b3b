"""HTTP/1.1 over TLS to one origin, on asyncio streams, with h11 speaking the protocol: the
project's one HTTP client, under the node agent's client of the escrow API (agent/client.py)
and the custodian and viewer CLI's (escrow/api_client.py, which runs it with asyncio.run).

The resident agent keeps this open all its life, so it is chosen for what it costs an idle
process: h11 and the standard library add about 0.2 MiB where aiohttp's client added 10 (so it
imports nothing of the escrow but its core, which the agent may import).
h11 does all the parsing and framing (sans-I/O); this module only moves bytes, keeps a few
connections warm between requests, and bounds every request in time and size.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

# An escrow answer is a few KiB (a request status with its released shares); anything much
# larger is not the escrow.
MAX_BODY = 1024 * 1024
READ_CHUNK = 64 * 1024
# TCP and TLS handshakes, seconds: on loopback or a LAN they take milliseconds, and a SYN lost
# to a full accept queue is sent again after 1 s and 3 s.
CONNECT_TIMEOUT = 5.0


class HttpError(Exception):
    """The origin could not be reached, broke the protocol, or sent too much."""


class ClosedBeforeAnswer(HttpError):
    """The origin closed the connection before it answered."""


class NotSent(HttpError):
    """No byte of the request left: no connection could be made (refused, unreachable, the
    TLS handshake or the certificate failed) or the time ran out first. The failure is this
    exception's ``__cause__``; the request may go to another origin, whatever its method."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        """The value of the first header ``name`` (any case), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection
    idle_since: float = 0.0

    def usable(self, now: float, keepalive: float) -> bool:
        return (now - self.idle_since < keepalive and not self.reader.at_eof()
                and not self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


class Origin:
    """Requests to the one origin of ``url`` (``https://host[:port][/prefix]``), at most
    ``connections`` at a time, each connection kept ``keepalive`` seconds after its last
    answer for the next request. A request's target is the API's path, sent under
    ``prefix``: an escrow behind a reverse proxy that serves it under a path of its own."""

    def __init__(self, url: str, context: ssl.SSLContext, *, connections: int,
                 keepalive: float, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"not an https:// URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.authority = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self._context = context
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(connections)
        self._idle: list[_Connection] = []

    async def request(self, method: str, target: str, body: bytes | None, timeout: float,
                      headers: Sequence[tuple[str, str]] = ()) -> Response:
        """One request, answered in full within ``timeout`` seconds, with ``headers`` besides
        Host, Content-Type and Content-Length (JSON) and Accept. Raises NotSent (from the
        OSError or TimeoutError that kept the request in), or, once the request may have gone
        out, HttpError, TimeoutError, or OSError."""
        sent = False
        try:
            async with self._slots, asyncio.timeout(timeout):
                connection = self._take()
                if connection is not None:
                    try:
                        sent = True
                        return await self._exchange(connection, method, target, body, headers)
                    except (ClosedBeforeAnswer, ConnectionError):
                        # The origin closed a kept connection as this request went out (its
                        # own keep-alive ran out), so it was never processed: once more on a
                        # fresh one.
                        sent = False
                connection = await self._open()
                sent = True
                return await self._exchange(connection, method, target, body, headers)
        except OSError as exc:  # TimeoutError and ssl.SSLError among them
            if sent:
                raise
            raise NotSent(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        for connection in idle:
            with contextlib.suppress(OSError):
                await connection.writer.wait_closed()

    def _take(self) -> _Connection | None:
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable(now, self._keepalive):
                return connection
            connection.close()
        return None

    async def _open(self) -> _Connection:
        # Its own bound, well under a request's: a replica whose host is gone drops packets
        # rather than refusing them, and the next replica should not wait a request's time.
        async with asyncio.timeout(self._connect_timeout):
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self._context, server_hostname=self.host,
                limit=READ_CHUNK)
        return _Connection(reader, writer, h11.Connection(h11.CLIENT))

    async def _exchange(self, connection: _Connection, method: str, target: str,
                        body: bytes | None, headers: Sequence[tuple[str, str]]) -> Response:
        # Closed unless the answer ends cleanly: a cancelled, timed-out or broken exchange
        # leaves a connection in an unknown state.
        try:
            response = await self._send_and_read(connection, method, target, body or b"",
                                                 headers)
        except BaseException:
            connection.close()
            raise
        protocol = connection.protocol
        if protocol.our_state is h11.DONE and protocol.their_state is h11.DONE:
            protocol.start_next_cycle()
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)
        else:
            connection.close()
        return response

    async def _send_and_read(self, connection: _Connection, method: str, target: str,
                             body: bytes, extra: Sequence[tuple[str, str]]) -> Response:
        protocol = connection.protocol
        headers = [("Host", self.authority), ("Content-Type", "application/json"),
                   ("Content-Length", str(len(body))), ("Accept", "application/json"), *extra]
        try:
            data = protocol.send(h11.Request(method=method, target=self.prefix + target,
                                             headers=headers))
            data += protocol.send(h11.Data(data=body)) if body else b""
            data += protocol.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise HttpError(f"cannot send {method} {target}: {exc}") from None
        connection.writer.write(data)
        await connection.writer.drain()
        status = 0
        answered: tuple[tuple[str, str], ...] = ()
        received = bytearray()
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(f"the answer breaks HTTP/1.1: {exc}") from None
            if event is h11.NEED_DATA:
                chunk = await connection.reader.read(READ_CHUNK)
                if not chunk and not status:
                    raise ClosedBeforeAnswer("the connection closed before an answer")
                # b"" after an answer began: h11 says whether that cut it short.
                protocol.receive_data(chunk)
            elif isinstance(event, h11.Response):
                status = event.status_code
                answered = tuple((name.decode("latin-1"), value.decode("latin-1"))
                                 for name, value in event.headers)
            elif isinstance(event, h11.Data):
                received += event.data
                if len(received) > MAX_BODY:
                    raise HttpError(f"the answer is over {MAX_BODY} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, bytes(received), answered)
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpError("the connection closed in the middle of an answer")
            # h11.InformationalResponse (100 Continue and the like) carries nothing for us.
