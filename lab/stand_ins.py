"""Stand-ins for an escrow replica on loopback, in the test's own event loop: a TLS server that
answers as the test scripts it, and a relay to a real escrow that the test can cut and restore
(a replica that goes away and comes back, as seen from a client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from escrow.core.tls import server_context

# What the server does with the n-th request it reads (from 1): bytes to send back, and whether
# to close the connection afterwards.
Script = Callable[[int], tuple[bytes, bool]]


def reply(status: int, body: object, reason: str = "Whatever") -> bytes:
    """An HTTP/1.1 answer with a JSON body."""
    text = json.dumps(body).encode()
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (status, reason.encode(), len(text)) + text)


def always(answer: bytes, close: bool = False) -> Script:
    return lambda _: (answer, close)


UNAVAILABLE = reply(503, {"error": "unhealthy", "message": "the database is away",
                          "hint": "retry in a moment"}, "Service Unavailable")


class Server:
    """Counts connections and keeps the head of each request it reads."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.open: set[asyncio.StreamWriter] = set()

    @property
    def requests(self) -> int:
        return len(self.heads)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.heads.append(head)
                answer, close = self.script(self.requests)
                writer.write(answer)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open.discard(writer)
            writer.close()

    def header(self, request: int, name: str) -> str:
        """The value of header ``name`` in the ``request``-th request (from 1)."""
        for line in self.heads[request - 1].split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode()
        raise KeyError(name)


@contextlib.asynccontextmanager
async def serving(script: Script, tls: Path) -> AsyncIterator[tuple[Server, str]]:
    """Serve over TLS with ``tls``/server.pem and server.key until the block ends; yields the
    server and its URL (https://127.0.0.1:PORT)."""
    server = Server(script)
    listener = await asyncio.start_server(
        server.handle, "127.0.0.1", 0,
        ssl=server_context(tls / "server.pem", tls / "server.key"))
    port = listener.sockets[0].getsockname()[1]
    try:
        yield server, f"https://127.0.0.1:{port}"
    finally:
        listener.close()
        # Connections a client keeps alive would outlive the block (and the event loop).
        for writer in list(server.open):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await listener.wait_closed()


@dataclass
class Relay:
    """Bytes between loopback clients and ``target`` (a port on 127.0.0.1), TLS untouched: the
    escrow behind it, at a URL of its own."""

    target: int
    port: int = 0
    connections: int = 0
    _listener: asyncio.Server | None = None
    _pipes: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    async def restore(self) -> None:
        """Listen (again, on the same port)."""
        self._listener = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._listener.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and drop every connection, as a replica that went away."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if listener is not None:
            await listener.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
            try:
                await asyncio.gather(_pipe(reader, upstream), _pipe(upstream_reader, writer))
            finally:
                upstream.close()
        except OSError:
            pass
        except asyncio.CancelledError:
            # cut() cancels it; asyncio's own done-callback for a connection's task would
            # report a cancelled one as an error.
            pass
        finally:
            writer.close()
            self._pipes.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


@contextlib.asynccontextmanager
async def relaying(target: int) -> AsyncIterator[Relay]:
    """A relay to ``target`` until the block ends."""
    relay = Relay(target)
    await relay.restore()
    try:
        yield relay
    finally:
        await relay.cut()
