"""Connection limits in front of aiohttp, so slow or greedy clients cannot hold `escrow serve`.

aiohttp alone waits for a request's headers and body for as long as the client keeps sending,
and accepts connections until the process runs out of open files: one client trickling header
bytes on a thousand connections left nobody else a file to connect with. Here, for every TCP
connection, from the moment it is accepted:

- beyond ``server.max_connections`` open in all, or ``server.max_connections_per_source`` from
  one client address (IPv6: one /64, see escrow.ratelimit.source_key), it is closed at once;
  connections still shaking hands count, since TLS is started here (loop.start_tls) and not
  by the listener;
- its TLS handshake must end within ``server.tls_handshake_timeout_seconds`` (a TLS close, the
  wait for the client's close_notify, too);
- a request's headers must be complete within ``server.header_timeout_seconds`` of the
  handshake or, on a kept-alive connection, of the first byte after a response; then the
  connection is cut (no answer: a client this slow is not waiting for one);
- its body within ``server.body_timeout_seconds`` of the headers: the middleware
  ``_body_deadline`` in server/app.py answers 408 and marks the request with
  :data:`SLOW_BODY`, and the connection closes;
- a kept-alive connection with no request is closed after ``server.keepalive_seconds``
  (aiohttp's keepalive_timeout, set by escrow/cli/serve.py).

At start the soft open-files limit is raised toward what ``max_connections`` needs (up to the
hard limit; systemd's LimitNOFILE= sets both), and the caps are lowered, with a warning, to
what the limit allows once :data:`RESERVED_FILES` are kept for the escrow's own files.
Every refusal and cut is counted in ``escrow_connections_dropped_total{reason}`` and logged at
most once per source a minute, with counts by reason; ``escrow_connections_open`` says how
many are open.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import resource
import ssl
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry, Counter, Gauge

from escrow.config import ServerSettings
from escrow.ratelimit import source_key
from escrow.server.refusal_log import RefusalLog

log = logging.getLogger("escrow.server.connections")

# Open files the escrow needs besides its connections: Python, the data directory's lock,
# SQLite (database, WAL, shared memory), SoftHSM's token files, the log, webhook calls.
RESERVED_FILES = 128
# Set on a request whose body missed its deadline (by server/app.py), so it is counted here.
SLOW_BODY = "escrow.slow_body"

REASONS = {  # for the log: what each reason label of the counter means
    "max_connections": "refused, server.max_connections open",
    "max_connections_per_source": "refused, server.max_connections_per_source open from it",
    "tls_handshake_timeout": "TLS handshake cut at server.tls_handshake_timeout_seconds",
    "tls_handshake_failed": "TLS handshake failed (no shared protocol or cipher suite?)",
    "header_timeout": "request headers cut at server.header_timeout_seconds",
    "body_timeout": "request body cut at server.body_timeout_seconds (408)",
}

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Limits:
    max_connections: int
    max_connections_per_source: int
    tls_handshake_timeout: float
    header_timeout: float

    @classmethod
    def of(cls, settings: ServerSettings) -> Limits:
        return cls(settings.max_connections,
                   min(settings.max_connections_per_source, settings.max_connections),
                   settings.tls_handshake_timeout_seconds, settings.header_timeout_seconds)

    def within(self, open_files: int) -> Limits:
        """These limits lowered to what a soft limit of ``open_files`` allows; the per-source
        cap keeps its share of the total, so one source still cannot take every file."""
        allowed = max(1, open_files - RESERVED_FILES)
        if allowed >= self.max_connections:
            return self
        share = self.max_connections_per_source * allowed // self.max_connections
        return Limits(allowed, max(1, share), self.tls_handshake_timeout, self.header_timeout)


def fit_open_files(limits: Limits) -> Limits:
    """Raise this process's soft open-files limit to what ``limits`` need (up to the hard
    limit), and return the limits that fit the soft limit it then has."""
    needed = limits.max_connections + RESERVED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return limits
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (OSError, ValueError):  # setrlimit filtered (systemd: SystemCallFilter=~@resources)
        pass
    fitted = limits.within(soft)
    if fitted != limits:
        log.warning("the open-files limit (%d) allows %d connections at once, %d per source, "
                    "not server.max_connections = %d: raise it (LimitNOFILE=, ulimit -n)",
                    soft, fitted.max_connections, fitted.max_connections_per_source,
                    limits.max_connections)
    return fitted


# What asyncio reads decrypted data into, per TLS connection (sslproto.SSLProtocol.max_size,
# 256 KiB by default, allocated whole at every accept): most of the server's memory per
# connected agent. A TLS record carries at most 16 KiB, so reads of 32 KiB lose nothing.
TLS_READ_BUFFER = 32 * 1024


def shrink_tls_buffers() -> None:
    """Give this process's TLS connections TLS_READ_BUFFER read buffers (the serving escrow
    calls it once, before it listens)."""
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


class ConnectionGate:
    """The protocol factory for ``loop.create_server`` (given no ``ssl``: TLS starts here).
    Each accepted connection gets a :class:`_Connection`, which hands the decrypted stream to
    an aiohttp RequestHandler made by ``server``."""

    def __init__(self, server: web.Server, context: ssl.SSLContext, limits: Limits,
                 dropped: Counter, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.context = context
        self.limits = limits
        self._server = server
        self._dropped = dropped
        self._clock = clock
        self._log = RefusalLog()
        self._open: set[_Connection] = set()
        self._per_source: Tally[str] = Tally()
        self._by_handler: dict[RequestHandler, _Connection] = {}
        self._closing = False
        # Every RequestHandler copies the server's request handler when it is made: wrapped
        # here, before the first one, it tells each connection when a request starts and ends.
        server.request_handler = self._wrap(server.request_handler)
        if registry is not None:
            open_now = Gauge("escrow_connections_open",
                             "TCP connections open, TLS handshakes included",
                             registry=registry)
            open_now.set_function(lambda: len(self._open))

    def __call__(self) -> _Connection:
        return _Connection(self)

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, connection: _Connection) -> str | None:
        """Count the connection in, or say why it is refused."""
        if self._closing:
            return "closing"
        if len(self._open) >= self.limits.max_connections:
            return "max_connections"
        if self._per_source[connection.source] >= self.limits.max_connections_per_source:
            return "max_connections_per_source"
        self._open.add(connection)
        self._per_source[connection.source] += 1
        return None

    def release(self, connection: _Connection) -> None:
        if connection in self._open:
            self._open.discard(connection)
            self._per_source[connection.source] -= 1
            if self._per_source[connection.source] <= 0:
                del self._per_source[connection.source]
        if connection.http is not None:
            self._by_handler.pop(connection.http, None)

    def handler(self, connection: _Connection) -> RequestHandler:
        """An aiohttp RequestHandler for a connection whose handshake is done."""
        handler = self._server()
        self._by_handler[handler] = connection
        return handler

    def dropped(self, source: str, reason: str) -> None:
        """Count a refused or cut connection; log it unless its source had a line this
        minute (then the next line says how many there were, by reason)."""
        self._dropped.labels(reason).inc()
        for summary in self._log.note(source, "connection", reason, self._clock()):
            counts = ", ".join(f"{REASONS.get(r.removeprefix('connection.'), r)} x{count}"
                               for r, count in summary.reasons)
            log.warning("dropped %d connection(s) from %s in %.0f s: %s", summary.total,
                        summary.source, summary.seconds, counts)

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Shutting down: refuse new connections and cut those still shaking hands; aiohttp
        ends the others gracefully."""
        self._closing = True
        for connection in list(self._open):
            if not connection.serving:
                connection.abort()

    def abort_all(self) -> None:
        for connection in list(self._open):
            connection.abort()

    def _wrap(self, inner: Handler) -> Handler:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            connection = self._by_handler.get(request.protocol)
            if connection is None:
                return await inner(request)
            connection.request_started()
            try:
                response = await inner(request)
            finally:
                connection.request_finished()
            if request.get(SLOW_BODY):
                self.dropped(connection.source, "body_timeout")
            return response
        return handle


class _Connection(asyncio.Protocol):
    """One TCP connection: the raw socket's protocol until TLS starts, then the decrypted
    stream's, passed on to aiohttp's RequestHandler with a deadline on request headers."""

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._loop = asyncio.get_running_loop()
        self.source = "unknown"
        self._raw: asyncio.Transport | None = None
        self._http: RequestHandler | None = None
        self._early: list[bytes] = []  # decrypted before the handshake's waiter returned
        self._early_eof = False
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._gone = False
        self._tls_task: asyncio.Task[None] | None = None  # referenced until it ends

    @property
    def serving(self) -> bool:
        return self._http is not None

    @property
    def http(self) -> RequestHandler | None:
        return self._http

    # -- the raw connection -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # a TCP listener's
        self._raw = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.source = source_key(str(peer[0]))
        refused = self._gate.admit(self)
        if refused is not None:
            self._gone = True
            transport.abort()
            if refused != "closing":  # shutting down: not a limit at work
                self._gate.dropped(self.source, refused)
            return
        self._tls_task = self._loop.create_task(self._start_tls(transport))

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        limits = self._gate.limits
        began = self._loop.time()
        try:
            tls = await self._loop.start_tls(
                raw, self, self._gate.context, server_side=True,
                ssl_handshake_timeout=limits.tls_handshake_timeout,
                ssl_shutdown_timeout=limits.tls_handshake_timeout)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            if self._loop.time() - began >= limits.tls_handshake_timeout * 0.99:
                self._gate.dropped(self.source, "tls_handshake_timeout")
            elif isinstance(exc, ssl.SSLError):
                self._gate.dropped(self.source, "tls_handshake_failed")
            # else the client went away: nothing refused it
            self._lost()
            return
        except asyncio.CancelledError:
            raw.abort()
            self._lost()
            raise
        except Exception:  # a bug: the connection must still not stay counted
            log.exception("cannot start TLS on a connection from %s", self.source)
            raw.abort()
            self._lost()
            return
        if tls is None or self._gone or self._gate.closing:  # None: the client went away
            raw.abort()
            self._lost()
            return
        self._http = self._gate.handler(self)
        self._arm()  # the first request's headers are due from the handshake on
        self._http.connection_made(tls)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)
        if self._early_eof:
            self.eof_received()

    def abort(self) -> None:
        """Close at once, without a TLS close_notify (a handshake in progress fails)."""
        if self._raw is not None:
            self._raw.abort()

    def _lost(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._gone = True
        self._gate.release(self)

    # -- the decrypted stream (after start_tls, SSLProtocol calls these) ----------------------

    def data_received(self, data: bytes) -> None:
        if self._http is None:
            self._early.append(data)
            return
        if not self._busy and self._timer is None and data:
            self._arm()  # the first byte of the next request's headers
        self._http.data_received(data)

    def eof_received(self) -> None:
        if self._http is None:
            self._early_eof = True
        else:
            self._http.eof_received()

    def pause_writing(self) -> None:
        if self._http is not None:
            self._http.pause_writing()

    def resume_writing(self) -> None:
        if self._http is not None:
            self._http.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()
        if self._http is not None:
            self._http.connection_lost(exc)

    # -- the header deadline ------------------------------------------------------------------

    def _arm(self) -> None:
        self._timer = self._loop.call_later(self._gate.limits.header_timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        if self._busy or self._gone:
            return
        self._gate.dropped(self.source, "header_timeout")
        self.abort()

    def request_started(self) -> None:
        self._busy = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_finished(self) -> None:
        # The next request's deadline starts with its first byte (data_received).
        self._busy = False
