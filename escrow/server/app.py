"""The HTTPS API (aiohttp). Thin: parses, authenticates transport-level things, and hands every
piece of work to :class:`escrow.service.Escrow` on the one thread that owns the token and the
database, so neither ever blocks the event loop and PKCS#11 is never used from two threads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from pydantic import BaseModel, ValidationError

from escrow.config import Settings
from escrow.core import protocol
from escrow.core.errors import (
    Conflict,
    DiskFull,
    EscrowError,
    HsmError,
    IdentityError,
    InputError,
    NotFound,
    PolicyError,
    Refusal,
    RequestError,
    StoreError,
    WrongPin,
    reason_of,
)
from escrow.core.fleet import EscrowHealth, FleetStatus
from escrow.core.hsm import Pin
from escrow.core.plaintext import PlainLogArgs
from escrow.core.protocol import (
    ApproveRequest,
    BatchApproveRequest,
    DecisionResponse,
    DepositRequest,
    DepositResponse,
    EnrollRequest,
    ErrorResponse,
    HealthResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    InfoResponse,
    NonceResponse,
    ResultReport,
    ResultResponse,
    ShareExportRequest,
    ShareVerifyRequest,
    UnsealRequest,
    WindowCloseRequest,
    WindowOpenRequest,
    WindowSignRequest,
)
from escrow.core.states import Decision
from escrow.core.timestamps import timestamp
from escrow.core.version import VERSION
from escrow.diskspace import Reserve
from escrow.notifications.receivers import open_receivers
from escrow.ratelimit import SourceLimiter
from escrow.server.connections import SLOW_BODY
from escrow.server.hsmlink import HsmLink, opener
from escrow.server.metrics import Metrics, Sample
from escrow.server.notifier import Notifier
from escrow.server.openapi import openapi_document
from escrow.server.refusal_log import RefusalLog
from escrow.server.status_page import StatusPage
from escrow.server.unidentified import UnidentifiedRefusals
from escrow.server.waiters import Waiters
from escrow.service import Escrow, readings
from escrow.service.viewing import Viewing
from escrow.store import StoreKind
from escrow.store.opening import open_store
from escrow.store.sql import SqlStore
from escrow.vault import Vault

log = logging.getLogger("escrow.server")
log.addFilter(PlainLogArgs())  # no quoted value can forge a log line or carry escapes
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
# Where a full disk gives the reserve's space away: the paths that release shares.
RELEASE_PATHS = frozenset({"/v1/unseal", "/v1/unseal/{request_id}",
                           "/v1/unseal/{request_id}/result", "/v1/requests/{request_id}/approve",
                           "/v1/requests/approve"})
_SWARM_ID = re.compile(r"[a-z0-9]{25}")
UNLIMITED = frozenset({"/v1/openapi.json", "/v1/info", "/status/static/{name}"})
# The action a refused body counts under, as the service names it.
ACTIONS = {"/v1/enroll": "enroll", "/v1/deposit": "deposit", "/v1/unseal": "unseal",
           "/v1/heartbeat": "heartbeat",
           "/v1/windows": "custodian", "/v1/windows/{window_id}/sign": "custodian",
           "/v1/windows/{window_id}/close": "custodian",
           "/v1/unseal/{request_id}/result": "unseal.result",
           "/v1/requests/{request_id}/approve": "custodian",
           "/v1/requests/{request_id}/deny": "custodian", "/v1/requests/approve": "custodian",
           "/v1/shares/export": "custodian", "/v1/shares/verify": "custodian",
           "/v1/shares/drills": "custodian"}


def _status_of(error: EscrowError) -> int:
    if isinstance(error, Refusal):
        return error.status
    for kind, status in ((NotFound, 404), (Conflict, 409), (PolicyError, 409),
                         (InputError, 400), (HsmError, 503), (StoreError, 503)):
        if isinstance(error, kind):
            return status
    return 500


def _error(status: int, code: str, message: str, hint: str = "",
           retry_after: float | None = None, title: str = "") -> web.Response:
    """An error answer: RFC 9457 problem details, with ``code`` as the problem type's last
    segment and as ``error``, which clients read (escrow.core.protocol.ErrorResponse)."""
    body = ErrorResponse(type=protocol.problem_type(code),
                         title=title or protocol.problem_title(code), status=status,
                         detail=message, error=code, message=message, hint=hint)
    headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after else None
    # Bytes, so no charset parameter is added: application/problem+json defines none.
    return web.Response(status=status, body=body.model_dump_json().encode(),
                        content_type=protocol.PROBLEM_JSON, headers=headers)


def _json(model: BaseModel | list[Any], status: int = 200) -> web.Response:
    if isinstance(model, list):
        text = json.dumps([m.model_dump(mode="json") for m in model])
    else:
        text = model.model_dump_json()
    return web.Response(status=status, text=text, content_type="application/json")


class EscrowServer:
    def __init__(self, settings: Settings, pin: Pin) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vault")
        self._waiters = Waiters()
        self._closing = False
        # Reads the receivers' secrets: a missing one stops `escrow serve` before it listens.
        self._notifier = Notifier(open_receivers(settings.webhooks, os.environ),
                                  self.metrics.webhook_deliveries, self.metrics.webhook_failures,
                                  self.run, self._ready)
        self._unidentified = UnidentifiedRefusals(self.metrics.unidentified, RefusalLog())
        self.escrow: Escrow | None = None
        self._hsm = HsmLink(opener(settings.hsm, pin), settings.hsm.token, self.metrics.hsm)
        self._reserve = Reserve(settings.data_dir, settings.server.disk_reserve_bytes)
        self._store: SqlStore | None = None
        self._limiter = SourceLimiter(settings.server.source_rate, settings.server.source_burst)
        self._viewing: Viewing | None = None  # needs the store alone: on-call sees a dead HSM
        self._page = StatusPage(self._viewer_of, self._fleet)

    # -- lifecycle --------------------------------------------------------------------------

    def _open(self) -> SqlStore:
        self._store = open_store(self.settings, lambda: timestamp(datetime.now(UTC)))
        self._viewing = Viewing(self._store, self.settings.server.max_versions,
                                lambda: datetime.now(UTC))
        self._reserve.make()
        try:
            self._service()
        except WrongPin:
            raise
        except HsmError:
            pass  # logged by the link; the API answers 503 until the token is back
        return self._store

    def _service(self) -> Escrow:
        """The service, made once the token answers (it unwraps the deposit key)."""
        if self.escrow is None:
            if self._store is None:
                raise StoreError("the escrow is starting", "retry in a moment")
            vault = Vault(self._store, self._hsm, lambda: datetime.now(UTC), "escrow")
            self.escrow = Escrow(vault, self.settings.server, self.metrics.released.inc,
                                 self._reserve.check_room, self._unidentified.note,
                                 self._notifier.alert, self._reserve.give_to_releases,
                                 self._notifier.notify)
        return self.escrow

    def _close(self) -> None:
        self._hsm.close()
        if self._store is not None:
            self._store.close()

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    async def start(self, app: web.Application) -> None:
        self._notifier.start()
        store = await self.run(self._open)
        loop = asyncio.get_running_loop()

        def decided(request_id: str | None) -> None:
            loop.call_soon_threadsafe(self._waiters.wake, request_id)
        # Decisions taken through another replica wake this one's long polls too.
        store.listen(decided)
        self._unidentified.start()

    async def shutdown(self, app: web.Application) -> None:
        self._closing = True
        self._unidentified.flush(everything=True)
        self._waiters.close()

    async def cleanup(self, app: web.Application) -> None:
        await self._notifier.stop()
        self._unidentified.stop()
        await self.run(self._close)
        self.pool.shutdown(wait=True)

    def app(self) -> web.Application:
        deadline = _body_deadline(self.settings.server.body_timeout_seconds)
        app = web.Application(client_max_size=self.settings.server.max_body_bytes,
                              middlewares=[self._middleware, deadline])
        app.on_startup.append(self.start)
        app.on_shutdown.append(self.shutdown)
        app.on_cleanup.append(self.cleanup)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/v1/openapi.json", self.openapi)
        app.router.add_get("/v1/info", self.info)
        app.router.add_post("/v1/nonce", self.nonce)
        app.router.add_post("/v1/enroll", self.enroll)
        app.router.add_post("/v1/deposit", self.deposit)
        app.router.add_post("/v1/unseal", self.unseal)
        app.router.add_get("/v1/unseal/{request_id}", self.unseal_status)
        app.router.add_post("/v1/unseal/{request_id}/result", self.result)
        app.router.add_post("/v1/heartbeat", self.heartbeat)
        app.router.add_get("/v1/requests", self.requests)
        app.router.add_post("/v1/requests/{request_id}/approve", self.approve)
        app.router.add_post("/v1/requests/{request_id}/deny", self.deny)
        app.router.add_post("/v1/requests/approve", self.approve_batch)
        app.router.add_post("/v1/shares/export", self.export)
        app.router.add_post("/v1/shares/verify", self.verify_share)
        app.router.add_get("/v1/shares/drills", self.share_drills)
        app.router.add_get("/v1/windows", self.windows)
        app.router.add_post("/v1/windows", self.open_window)
        app.router.add_post("/v1/windows/{window_id}/sign", self.sign_window)
        app.router.add_post("/v1/windows/{window_id}/close", self.close_window)
        app.router.add_get("/v1/status", self.status)
        self._page.add_routes(app)
        return app

    # -- plumbing ---------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        endpoint = _endpoint(request)  # never the raw path, which the caller chooses
        with self.metrics.latency.labels(endpoint).time():
            response = await self._answer(request, handler, endpoint)
        self.metrics.requests.labels(endpoint, str(response.status)).inc()
        return response

    async def _answer(self, request: web.Request, handler: Handler,
                      endpoint: str) -> web.StreamResponse:
        wait = (self._limiter.take(self._source(request), time.monotonic())
                if _costs_a_token(endpoint) else 0.0)
        if self._closing and endpoint not in ("/healthz", "/metrics"):
            response: web.StreamResponse = _error(503, "shutting_down",
                                                  "the escrow is shutting down",
                                                  "retry in a few seconds")
        elif wait:
            self.metrics.limited.labels(endpoint).inc()
            response = _error(429, "source_rate_limited",
                              f"too many requests from {self._source(request)}",
                              "slow down; agents back off by themselves", wait)
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason,
                                  title=exc.reason)
                if "Allow" in exc.headers:  # a 405 says which methods the path takes
                    response.headers["Allow"] = exc.headers["Allow"]
            except EscrowError as exc:
                if isinstance(exc, DiskFull) and endpoint in RELEASE_PATHS:
                    self._reserve.release()  # so the next release finds room
                response = _error(_status_of(exc), reason_of(exc), exc.message, exc.hint,
                                  exc.retry_after if isinstance(exc, Refusal) else None)
            except Exception:
                log.exception("unexpected error in %s", endpoint)
                response = _error(500, "internal", "internal error; see the escrow's log")
        return response

    async def _body(self, request: web.Request, model: type[M]) -> tuple[M, bytes]:
        raw = await request.read()
        try:
            return parse_body(raw, model), raw
        except RequestError as exc:
            endpoint = _endpoint(request)
            self._unidentified.note(ACTIONS.get(endpoint, endpoint), exc.reason,
                                    self._source(request))
            raise

    def _source(self, request: web.Request) -> str:
        return request.remote or "unknown"

    async def _custodian(self, request: web.Request, body: bytes) -> str:
        escrow = await self._ready()
        key_id = request.headers.get("X-Escrow-Key-Id", "")
        date = request.headers.get("X-Escrow-Date", "")
        nonce = request.headers.get("X-Escrow-Nonce", "")
        signature = request.headers.get("X-Escrow-Signature", "")
        if not (key_id and date and nonce and signature):
            self._unidentified.note("custodian", "unauthenticated", self._source(request))
            raise _bad("unauthenticated", "custodian requests need X-Escrow-Key-Id, "
                       "X-Escrow-Date, X-Escrow-Nonce and X-Escrow-Signature", status=401)
        source = self._source(request)
        return await self.run(lambda: escrow.authenticate_custodian(
            key_id, date, nonce, signature, request.method, request.path_qs, body, source))

    async def _viewer_of(self, token: str, source: str) -> str:
        """The viewer holding ``token`` (a refusal is counted, as for any stranger)."""
        viewing = self._viewing
        if viewing is None:
            raise StoreError("the escrow is starting", "retry in a moment")
        try:
            return await self.run(lambda: viewing.identify(token))
        except IdentityError as exc:
            self._unidentified.note("status", exc.reason, source)
            raise

    async def _fleet(self) -> FleetStatus:
        viewing, store = self._viewing, self._store
        if viewing is None or store is None:
            raise StoreError("the escrow is starting", "retry in a moment")

        def health() -> EscrowHealth:
            problem = self._hsm.problem()
            try:
                store.check_writable()
                writable = True
            except StoreError:
                writable = False
            return EscrowHealth(
                hsm="down" if problem else "up", hsm_error=problem.message if problem else "",
                store=store.kind, writable=writable,
                data_dir_free_bytes=self._reserve.free_bytes(),
                disk_reserve_bytes=self._reserve.size, replicas=store.replicas())

        return FleetStatus(generated_at=timestamp(datetime.now(UTC)), version=VERSION,
                           health=await self.run(health),
                           clusters=await self.run(viewing.clusters))

    async def _ready(self) -> Escrow:
        if self.escrow is not None:
            return self.escrow
        return await self.run(self._service)

    def _checked_store(self) -> StoreKind:
        """Which database this replica keeps its data in; raise unless it answers and takes
        writes, and the token wraps and unwraps a test value. On the vault thread."""
        if self._store is None:
            raise StoreError("the escrow is starting", "retry in a moment")
        kind = self._store.check_writable()
        problem = self._hsm.problem()
        if problem is not None:
            raise problem
        return kind

    def _sample(self) -> Sample:
        """What a scrape looks at, on the vault thread: the token and the store themselves,
        never the service, which is made only once the token answers."""
        return Sample(self._reserve.free_bytes(), self._hsm.problem() is None, self._tally())

    def _tally(self) -> readings.Tally | None:
        """What the store says now, or None while it does not answer."""
        if self._store is None:
            return None
        try:
            return readings.tally(self._store, datetime.now(UTC),
                                  self.settings.server.max_versions)
        except StoreError:
            return None

    # -- public endpoints -------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            await self._ready()
            store = await self.run(self._checked_store)
        except EscrowError as exc:
            return _error(503, "unhealthy", exc.message, exc.hint)
        return _json(HealthResponse(status="ok", store=store, writable=True))

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        """200 whatever is down: on-call looks at the metrics when something is, and they
        say what (escrow_hsm_up, escrow_store_up)."""
        sample = await self.run(self._sample)
        body, content_type = self.metrics.latest(sample, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def info(self, request: web.Request) -> web.Response:
        return _json(InfoResponse(api=protocol.API_VERSION,
                                  deposit_public_key=protocol.b64e(
                                      (await self._ready()).deposit_public_key),
                                  server_time=timestamp(datetime.now(UTC))))

    async def nonce(self, request: web.Request) -> web.Response:
        nonce, expires = (await self._ready()).nonces.issue()
        return _json(NonceResponse(nonce=protocol.b64e(nonce), expires_at=timestamp(expires)))

    # -- agent endpoints --------------------------------------------------------------------

    async def enroll(self, request: web.Request) -> web.Response:
        body, _ = await self._body(request, EnrollRequest)
        escrow, source = await self._ready(), self._source(request)
        return _json(await self.run(lambda: escrow.enroll(body, source)))

    async def deposit(self, request: web.Request) -> web.Response:
        body, _ = await self._body(request, DepositRequest)
        escrow, source = await self._ready(), self._source(request)
        result = await self.run(lambda: escrow.deposit(body, source))
        return _json(DepositResponse(version=result.version, created=result.created,
                                     fingerprint=result.fingerprint),
                     201 if result.created else 200)

    async def unseal(self, request: web.Request) -> web.Response:
        body, _ = await self._body(request, UnsealRequest)
        escrow, source = await self._ready(), self._source(request)
        # While the token is known to be away, a request would only be recorded to fail, and
        # count against the node's rate limit.
        await self.run(self._hsm.token)
        status = await self.run(lambda: escrow.unseal(body, source))
        return _json(status, 201)

    async def unseal_status(self, request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        try:
            wait = float(request.query.get("wait", "0"))
        except ValueError:
            raise _bad("bad_wait", "wait must be a number of seconds") from None
        escrow = await self._ready()
        # A held request (another boot of the node may be alive) is looked at again when its
        # hold ends, so an unclean reboot waits no longer than the hold; one of a cluster with
        # a deny window, when the window passes.
        due = await self.run(lambda: escrow.due_in(request_id))
        return _json(await self._waiters.poll(
            request_id, lambda: self.run(lambda: escrow.status(request_id)),
            min(wait, due + 0.05) if due else wait))

    async def result(self, request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        body, _ = await self._body(request, ResultReport)
        escrow, source = await self._ready(), self._source(request)
        await self.run(lambda: escrow.report(request_id, body, source))
        return _json(ResultResponse(recorded=True))

    async def heartbeat(self, request: web.Request) -> web.Response:
        body, _ = await self._body(request, HeartbeatRequest)
        escrow, source = await self._ready(), self._source(request)
        await self.run(lambda: escrow.heartbeat(body, source))
        return _json(HeartbeatResponse(recorded=True))

    # -- viewer endpoints -------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            self._unidentified.note("status", "unauthenticated", self._source(request))
            raise _bad("unauthenticated", "the status needs a viewer token: Authorization: "
                       "Bearer TOKEN", status=401)
        await self._viewer_of(token.strip(), self._source(request))
        return _json(await self._fleet())

    # -- custodian endpoints ----------------------------------------------------------------

    async def requests(self, request: web.Request) -> web.Response:
        custodian = await self._custodian(request, await request.read())
        escrow = await self._ready()
        return _json(await self.run(lambda: escrow.pending(custodian)))

    async def _decide(self, request: web.Request, decision: Decision) -> web.Response:
        request_id = request.match_info["request_id"]
        model: type[ApproveRequest] | type[protocol.DenyRequest] = (
            ApproveRequest if decision == Decision.APPROVE else protocol.DenyRequest)
        body, raw = await self._body(request, model)
        custodian = await self._custodian(request, raw)
        reason = getattr(body, "reason", "")
        escrow = await self._ready()
        status = await self.run(lambda: escrow.decide(custodian, request_id, decision,
                                                      body.signature, reason))
        self._waiters.wake(request_id)
        return _json(DecisionResponse(request_id=request_id, state=status.state,
                                      approvals=status.approvals))

    async def approve(self, request: web.Request) -> web.Response:
        return await self._decide(request, Decision.APPROVE)

    async def deny(self, request: web.Request) -> web.Response:
        return await self._decide(request, Decision.DENY)

    async def approve_batch(self, request: web.Request) -> web.Response:
        body, raw = await self._body(request, BatchApproveRequest)
        custodian = await self._custodian(request, raw)
        escrow = await self._ready()
        answer = await self.run(lambda: escrow.approve_batch(custodian, body))
        for result in answer.results:
            if not result.error:
                self._waiters.wake(result.request_id)
        return _json(answer)

    async def windows(self, request: web.Request) -> web.Response:
        custodian = await self._custodian(request, await request.read())
        cluster_id = request.query.get("cluster_id", "")
        if cluster_id and not _SWARM_ID.fullmatch(cluster_id):
            raise _bad("bad_cluster_id", "cluster_id must be a swarm cluster id (25 lower-case "
                       "letters or digits)")
        escrow = await self._ready()
        return _json(await self.run(lambda: escrow.windows.list(custodian, cluster_id)))

    async def open_window(self, request: web.Request) -> web.Response:
        body, raw = await self._body(request, WindowOpenRequest)
        custodian = await self._custodian(request, raw)
        escrow = await self._ready()
        return _json(await self.run(lambda: escrow.windows.open(custodian, body)), 201)

    async def sign_window(self, request: web.Request) -> web.Response:
        window_id = request.match_info["window_id"]
        body, raw = await self._body(request, WindowSignRequest)
        custodian = await self._custodian(request, raw)
        escrow = await self._ready()
        return _json(await self.run(lambda: escrow.windows.sign(custodian, window_id,
                                                                body.signature)))

    async def close_window(self, request: web.Request) -> web.Response:
        window_id = request.match_info["window_id"]
        _, raw = await self._body(request, WindowCloseRequest)
        custodian = await self._custodian(request, raw)
        escrow = await self._ready()
        return _json(await self.run(lambda: escrow.windows.close(custodian, window_id)))

    async def export(self, request: web.Request) -> web.Response:
        body, raw = await self._body(request, ShareExportRequest)
        custodian = await self._custodian(request, raw)
        escrow = await self._ready()
        share = await self.run(lambda: escrow.export_share(custodian, body.cluster_id,
                                                           body.ephemeral_public_key))
        return _json(share)

    async def verify_share(self, request: web.Request) -> web.Response:
        body, raw = await self._body(request, ShareVerifyRequest)
        custodian = await self._custodian(request, raw)
        escrow = await self._ready()
        return _json(await self.run(lambda: escrow.verify_share(custodian, body)))

    async def share_drills(self, request: web.Request) -> web.Response:
        custodian = await self._custodian(request, await request.read())
        cluster_id = request.query.get("cluster_id", "")
        if not _SWARM_ID.fullmatch(cluster_id):
            raise _bad("bad_cluster_id", "cluster_id must be a swarm cluster id (25 lower-case "
                       "letters or digits)")
        escrow = await self._ready()
        return _json(await self.run(lambda: escrow.share_drills(custodian, cluster_id)))


def _body_deadline(seconds: float) -> Middleware:
    """The whole body within ``seconds`` (server.body_timeout_seconds) of the headers, or 408
    and the connection closes: read here, it is kept for the handler (request.read() caches
    it)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(seconds):
                    await request.read()
            except TimeoutError:
                request[SLOW_BODY] = True  # counted and logged by server/connections.py
                response = _error(408, "body_timeout",
                                  f"the request body did not arrive within {seconds:g} s",
                                  "send the whole body at once")
                response.force_close()
                return response
        return await handler(request)

    return middleware


def parse_body(raw: bytes, model: type[M]) -> M:
    """A request body as ``model``, or a 400 naming what is wrong with it."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise _bad("malformed_json", "the body is not JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # Unknown fields first: they name what the sender got wrong most directly.
        errors = sorted(exc.errors(include_input=False, include_url=False),
                        key=lambda e: e["type"] != "extra_forbidden")
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                             for e in errors[:6])
        raise _bad("invalid_body", f"the body does not match {model.__name__}: {problems}"
                   ) from None


def _costs_a_token(endpoint: str) -> bool:
    """Every /v1 endpoint and status page a caller can reach before proving who it is costs
    its source a token of the rate limit (the OpenAPI document, /info and the page's script
    and style excepted)."""
    return endpoint.startswith(("/v1/", "/status")) and endpoint not in UNLIMITED


def _endpoint(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _bad(code: str, message: str, status: int = 400) -> RequestError:
    return RequestError(code, message, "see /v1/openapi.json for the request format", status)
