"""A real HTTP receiver on loopback for the escrow's webhook: aiohttp, a port of its own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

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
