"""The status page, for people: ``/status``, read-only, rendered by the escrow (Jinja2,
autoescaped) from the same fleet status ``GET /v1/status`` sends, redrawn every few seconds by
one script of its own (static/status.js).

What nodes control (hostnames above all) is escaped by the templates and could not run if it
were not: the Content-Security-Policy allows only the escrow's own script and style, no inline
script, no frames. A viewer signs in with their token, which becomes an HttpOnly, Secure,
SameSite=Strict cookie scoped to /status: every replica checks it against the store, so no
session lives in one process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

import jinja2
from aiohttp import web

from escrow.core.errors import IdentityError
from escrow.core.fleet import FleetStatus
from escrow.core.states import NodeState
from escrow.service.viewing import MAX_TOKEN

COOKIE = "escrow_viewer"
COOKIE_SECONDS = 12 * 3600  # a night's shift
REFRESH_SECONDS = 5
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_ASSETS = {"status.js": "text/javascript", "status.css": "text/css",
           "favicon.svg": "image/svg+xml"}

Identify = Callable[[str, str], Awaitable[str]]  # (token, source address): the viewer
Fleet = Callable[[], Awaitable[FleetStatus]]


def _mib(value: int) -> str:
    return f"{value / 2**20:,.0f} MiB"


def _describe(state: NodeState) -> str:
    if state == NodeState.WAITING:
        return "locked, waiting for custodians"
    if state == NodeState.QUARANTINED:
        return "quarantined: suspected copy"
    return str(state)


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("escrow.server", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["mib"] = _mib
    environment.filters["describe"] = _describe
    return environment


def _see_status() -> web.Response:
    """303 to the page (a response, not aiohttp's exception, which the API's middleware
    would turn into a JSON error)."""
    return web.Response(status=303, headers={**HEADERS, "Location": "/status"})


class StatusPage:
    def __init__(self, identify: Identify, fleet: Fleet) -> None:
        self._identify = identify
        self._fleet = fleet
        self._templates = _environment()
        self._assets = {name: (resources.files("escrow.server").joinpath("static", name)
                               .read_bytes(), kind) for name, kind in _ASSETS.items()}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/status", self.page)
        app.router.add_get("/status/panel", self.panel)
        app.router.add_post("/status/login", self.login)
        app.router.add_post("/status/logout", self.logout)
        app.router.add_get("/status/static/{name}", self.asset)

    def _html(self, template: str, values: dict[str, object], status: int = 200
              ) -> web.Response:
        return web.Response(status=status, text=self._templates.get_template(template).render(
            **values), content_type="text/html", charset="utf-8", headers=HEADERS)

    async def _viewer(self, request: web.Request) -> str | None:
        token = request.cookies.get(COOKIE, "")
        if not token:
            return None
        try:
            return await self._identify(token, request.remote or "unknown")
        except IdentityError:
            return None

    def _panel_values(self, status: FleetStatus) -> dict[str, object]:
        return {"status": status, "locked": len(status.locked),
                "waiting": sum(n.state == NodeState.WAITING for n in status.locked)}

    async def page(self, request: web.Request) -> web.Response:
        viewer = await self._viewer(request)
        if viewer is None:
            return self._html("login.html", {"problem": "", "max_token": MAX_TOKEN})
        return self._html("status.html", {"viewer": viewer, "refresh_seconds": REFRESH_SECONDS,
                                          **self._panel_values(await self._fleet())})

    async def panel(self, request: web.Request) -> web.Response:
        if await self._viewer(request) is None:
            return web.Response(status=401, text="sign in again", headers=HEADERS)
        return self._html("panel.html", self._panel_values(await self._fleet()))

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        token = form.get("token")
        token = token.strip() if isinstance(token, str) else ""
        try:
            await self._identify(token, request.remote or "unknown")
        except IdentityError as exc:
            return self._html("login.html", {"problem": f"{exc.message}: {exc.hint}",
                                             "max_token": MAX_TOKEN}, 401)
        response = _see_status()
        response.set_cookie(COOKIE, token, max_age=COOKIE_SECONDS, path="/status",
                            secure=True, httponly=True, samesite="Strict")
        return response

    async def logout(self, request: web.Request) -> web.Response:
        response = _see_status()
        response.del_cookie(COOKIE, path="/status")
        return response

    async def asset(self, request: web.Request) -> web.Response:
        found = self._assets.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        body, kind = found
        return web.Response(body=body, content_type=kind, headers={
            **HEADERS, "Cache-Control": "max-age=300"})
