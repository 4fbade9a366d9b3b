"""Real HTTP receivers on loopback for the escrow's webhooks: aiohttp in the test's own event
loop (:func:`receiving`), or http.server in a thread of its own that outlives one test's loop
and keeps every request with its raw bytes (:class:`Receivers`)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from aiohttp import web

from escrow.notifications.signing import ID_HEADER

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def receiving(path: str, handler: Handler) -> AsyncIterator[str]:
    """Serve POST ``path`` with ``handler`` until the block ends; yields its URL."""
    app = web.Application()
    app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}{path}"
    finally:
        await runner.cleanup()


def collector(into: list[dict[str, object]]) -> Handler:
    """A handler that keeps each JSON body it receives and answers 200."""
    async def collect(request: web.Request) -> web.Response:
        into.append(await request.json())
        return web.Response(text="ok")
    return collect


@dataclass(frozen=True)
class Delivery:
    """One request a receiver got, as it came, and what it answered."""

    receiver: str
    headers: Mapping[str, str]  # names in lower case
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict)
        return value

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


class Receivers:
    """Receivers on 127.0.0.1, one port for all: ``POST /NAME`` is receiver NAME's. Each
    event's first ``fail_first[NAME]`` attempts (told apart by the event id header) are
    answered 500, the rest 200."""

    def __init__(self, fail_first: Mapping[str, int] | None = None) -> None:
        self.fail_first = dict(fail_first or {})
        self.got: list[Delivery] = []
        self._lock = threading.Lock()
        self._attempts: Counter[tuple[str, str]] = Counter()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Receivers:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{name}"

    def delivered(self, name: str, event: str = "", **fields: object) -> list[Delivery]:
        """What ``name`` answered 200 to, of ``event`` (any, if empty) with those body
        fields."""
        with self._lock:
            got = list(self.got)
        return [d for d in got if d.receiver == name and d.status == 200
                and (not event or d.json["event"] == event)
                and all(d.json.get(k) == v for k, v in fields.items())]

    def attempts(self, event_id: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.got if d.header(ID_HEADER) == event_id]

    def wait(self, name: str, event: str, timeout: float, **fields: object) -> Delivery:
        """The first delivery ``delivered`` finds within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.delivered(name, event, **fields)
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"{name} got no {event} with {fields} within {timeout:g} s")

    def _answer(self, name: str, headers: Mapping[str, str], body: bytes) -> int:
        with self._lock:
            key = (name, headers.get(ID_HEADER.lower(), ""))
            self._attempts[key] += 1
            status = 500 if self._attempts[key] <= self.fail_first.get(name, 0) else 200
            self.got.append(Delivery(name, headers, body, status))
        return status

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receivers = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                status = receivers._answer(self.path.strip("/"), headers, body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test reads what was received, not a log of it

        return Handler
