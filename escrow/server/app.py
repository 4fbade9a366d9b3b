"""The HTTPS API (aiohttp). Thin: parses, authenticates transport-level things, and hands every
piece of work to :class:`escrow.service.Escrow` on the one thread that owns the token and the
database, so neither ever blocks the event loop and PKCS#11 is never used from two threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ValidationError

from escrow import protocol
from escrow.config import Settings
from escrow.diskspace import Reserve
from escrow.errors import (
    Conflict,
    DiskFull,
    EscrowError,
    HsmError,
    InputError,
    NotFound,
    PolicyError,
    RequestError,
    StoreError,
    WrongPin,
)
from escrow.hsm import Pin
from escrow.protocol import (
    ApproveRequest,
    DecisionResponse,
    DepositRequest,
    DepositResponse,
    EnrollRequest,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    NonceResponse,
    RequestStatus,
    ResultReport,
    ResultResponse,
    ShareExportRequest,
    UnsealRequest,
)
from escrow.server.hsmlink import HsmLink, opener
from escrow.server.openapi import openapi_document
from escrow.service import Escrow
from escrow.store.sqlite import SqliteStore
from escrow.vault import Vault, timestamp

log = logging.getLogger("escrow.server")
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
MAX_WAIT = 60.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("escrow_requests_total", "API requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=self.registry)
        self.released = Counter("escrow_shares_released_total",
                                "Shares released (each encrypted to a requester)",
                                registry=self.registry)
        self.pending = Gauge("escrow_pending_approvals",
                             "Live unseal requests still waiting for custodian approvals",
                             registry=self.registry)
        self.free = Gauge("escrow_data_dir_free_bytes",
                          "Free space on the data directory's file system",
                          registry=self.registry)
        self.hsm = Histogram("escrow_hsm_seconds", "Latency of token operations",
                             buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
                             registry=self.registry)


def _status_of(error: EscrowError) -> int:
    explicit = getattr(error, "status", None)
    if isinstance(explicit, int):
        return explicit
    for kind, status in ((NotFound, 404), (Conflict, 409), (PolicyError, 409),
                         (InputError, 400), (HsmError, 503), (StoreError, 503)):
        if isinstance(error, kind):
            return status
    return 500


def _error(status: int, code: str, message: str, hint: str = "") -> web.Response:
    body = ErrorResponse(error=code, message=message, hint=hint).model_dump_json()
    return web.Response(status=status, text=body, content_type="application/json")


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
        self._waiters: dict[str, asyncio.Event] = {}
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()
        self.escrow: Escrow | None = None
        self._hsm = HsmLink(opener(settings.hsm, pin), settings.hsm.token, self.metrics.hsm)
        self._reserve = Reserve(settings.data_dir, settings.server.disk_reserve_bytes)
        self._store: SqliteStore | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def _open(self) -> None:
        self._store = SqliteStore.open(self.settings.db_path,
                                       lambda: timestamp(datetime.now(UTC)))
        self._reserve.make()
        try:
            self._service()
        except WrongPin:
            raise
        except HsmError:
            pass  # logged by the link; the API answers 503 until the token is back

    def _service(self) -> Escrow:
        """The service, made once the token answers (it unwraps the deposit key)."""
        if self.escrow is None:
            if self._store is None:
                raise StoreError("the escrow is starting", "retry in a moment")
            vault = Vault(self._store, self._hsm, lambda: datetime.now(UTC), "escrow")
            self.escrow = Escrow(vault, self.settings.server, self.metrics.released.inc,
                                 self._reserve.check_room)
        return self.escrow

    def _close(self) -> None:
        self._hsm.close()
        if self._store is not None:
            self._store.close()

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    async def start(self, app: web.Application) -> None:
        await self.run(self._open)

    async def shutdown(self, app: web.Application) -> None:
        self._closing = True
        for event in self._waiters.values():
            event.set()  # long polls answer with the current state at once

    async def cleanup(self, app: web.Application) -> None:
        for task in list(self._background):
            task.cancel()
        await self.run(self._close)
        self.pool.shutdown(wait=True)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.server.max_body_bytes,
                              middlewares=[self._middleware])
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
        app.router.add_get("/v1/requests", self.requests)
        app.router.add_post("/v1/requests/{request_id}/approve", self.approve)
        app.router.add_post("/v1/requests/{request_id}/deny", self.deny)
        app.router.add_post("/v1/shares/export", self.export)
        return app

    # -- plumbing ---------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        endpoint = request.match_info.route.resource.canonical if (
            request.match_info.route.resource is not None) else "unmatched"
        if self._closing and endpoint not in ("/healthz", "/metrics"):
            response: web.StreamResponse = _error(503, "shutting_down",
                                                  "the escrow is shutting down",
                                                  "retry in a few seconds")
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
            except EscrowError as exc:
                if isinstance(exc, DiskFull):
                    self._reserve.release()  # so the next release finds room
                reason = getattr(exc, "reason", type(exc).__name__)
                response = _error(_status_of(exc), reason, exc.message, exc.hint)
            except Exception:
                log.exception("unexpected error in %s", endpoint)
                response = _error(500, "internal", "internal error; see the escrow's log")
        self.metrics.requests.labels(endpoint, str(response.status)).inc()
        return response

    async def _body(self, request: web.Request, model: type[M]) -> tuple[M, bytes]:
        raw = await request.read()
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            raise _bad("malformed_json", "the body is not JSON") from None
        try:
            return model.model_validate(data), raw
        except ValidationError as exc:
            # Unknown fields first: they name what the sender got wrong most directly.
            errors = sorted(exc.errors(include_input=False, include_url=False),
                            key=lambda e: e["type"] != "extra_forbidden")
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                                 for e in errors[:6])
            raise _bad("invalid_body", f"the body does not match {model.__name__}: {problems}"
                       ) from None

    def _source(self, request: web.Request) -> str:
        return request.remote or "unknown"

    async def _custodian(self, request: web.Request, body: bytes) -> str:
        escrow = await self._ready()
        key_id = request.headers.get("X-Escrow-Key-Id", "")
        date = request.headers.get("X-Escrow-Date", "")
        signature = request.headers.get("X-Escrow-Signature", "")
        if not (key_id and date and signature):
            raise _bad("unauthenticated", "custodian requests need X-Escrow-Key-Id, "
                       "X-Escrow-Date and X-Escrow-Signature", status=401)
        return await self.run(lambda: escrow.authenticate_custodian(
            key_id, date, signature, request.method, request.path_qs, body))

    async def _ready(self) -> Escrow:
        if self.escrow is not None:
            return self.escrow
        return await self.run(self._service)

    def _wake(self, request_id: str) -> None:
        event = self._waiters.pop(request_id, None)
        if event is not None:
            event.set()

    # -- public endpoints -------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            escrow = await self._ready()
            await self.run(escrow.check_health)
        except EscrowError as exc:
            return _error(503, "unhealthy", exc.message, exc.hint)
        return _json(HealthResponse(status="ok"))

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        escrow = await self._ready()
        pending = await self.run(lambda: sum(1 for r in escrow.pending("") if r.needed > 0))
        self.metrics.pending.set(pending)
        self.metrics.free.set(self._reserve.free_bytes())
        return web.Response(body=generate_latest(self.metrics.registry),
                            content_type="text/plain", charset="utf-8")

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
        version, created, fingerprint = await self.run(lambda: escrow.deposit(body, source))
        return _json(DepositResponse(version=version, created=created, fingerprint=fingerprint),
                     201 if created else 200)

    async def unseal(self, request: web.Request) -> web.Response:
        body, _ = await self._body(request, UnsealRequest)
        escrow, source = await self._ready(), self._source(request)
        # While the token is known to be away, a request would only be recorded to fail, and
        # count against the node's rate limit.
        await self.run(self._hsm.token)
        status = await self.run(lambda: escrow.unseal(body, source))
        if status.needed > 0 and self.settings.server.webhook_url:
            task = asyncio.create_task(self._webhook(status.request_id, body.hostname,
                                                     status.needed, status.expires_at,
                                                     status.cluster_id, status.node_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return _json(status, 201)

    async def unseal_status(self, request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        try:
            wait = min(MAX_WAIT, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            raise _bad("bad_wait", "wait must be a number of seconds") from None
        escrow = await self._ready()
        # Registered before the first look, so an approval in between still wakes us.
        event = self._waiters.setdefault(request_id, asyncio.Event())
        status: RequestStatus | None = None
        try:
            status = await self.run(lambda: escrow.status(request_id))
            if status.state == "pending" and wait > 0 and not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout=wait)
                status = await self.run(lambda: escrow.status(request_id))
        finally:
            # Unknown ids (anyone can poll any id) and finished requests keep no entry.
            if status is None or status.state != "pending":
                self._waiters.pop(request_id, None)
        return _json(status)

    async def result(self, request: web.Request) -> web.Response:
        request_id = request.match_info["request_id"]
        body, _ = await self._body(request, ResultReport)
        escrow = await self._ready()
        await self.run(lambda: escrow.report(request_id, body))
        return _json(ResultResponse(recorded=True))

    # -- custodian endpoints ----------------------------------------------------------------

    async def requests(self, request: web.Request) -> web.Response:
        custodian = await self._custodian(request, await request.read())
        escrow = await self._ready()
        return _json(await self.run(lambda: escrow.pending(custodian)))

    async def _decide(self, request: web.Request, decision: str) -> web.Response:
        request_id = request.match_info["request_id"]
        model: type[ApproveRequest] | type[protocol.DenyRequest] = (
            ApproveRequest if decision == "approve" else protocol.DenyRequest)
        body, raw = await self._body(request, model)
        custodian = await self._custodian(request, raw)
        reason = getattr(body, "reason", "")
        escrow = await self._ready()
        status = await self.run(lambda: escrow.decide(custodian, request_id, decision,
                                                      body.signature, reason))
        self._wake(request_id)
        return _json(DecisionResponse(request_id=request_id, state=status.state,
                                      approvals=status.approvals))

    async def approve(self, request: web.Request) -> web.Response:
        return await self._decide(request, "approve")

    async def deny(self, request: web.Request) -> web.Response:
        return await self._decide(request, "deny")

    async def export(self, request: web.Request) -> web.Response:
        body, raw = await self._body(request, ShareExportRequest)
        custodian = await self._custodian(request, raw)
        escrow = await self._ready()
        share = await self.run(lambda: escrow.export_share(custodian, body.cluster_id,
                                                           body.ephemeral_public_key))
        return _json(share)

    # -- webhook ----------------------------------------------------------------------------

    async def _webhook(self, request_id: str, hostname: str, needed: int, expires_at: str,
                       cluster_id: str, node_id: str) -> None:
        payload = {
            "text": f"Swarm manager {hostname} is locked and waits for {needed} custodian "
                    f"approval(s): escrow approve {request_id}",
            "request_id": request_id, "cluster_id": cluster_id, "node_id": node_id,
            "hostname": hostname, "needed": needed, "expires_at": expires_at,
        }
        started = time.monotonic()
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with aiohttp.ClientSession(timeout=timeout) as session, \
                    session.post(self.settings.server.webhook_url, json=payload) as response:
                log.info("webhook for %s answered %s in %.2f s", request_id, response.status,
                         time.monotonic() - started)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("webhook for %s failed: %s", request_id, type(exc).__name__)


def _bad(code: str, message: str, status: int = 400) -> EscrowError:
    return RequestError(code, message, "see /v1/openapi.json for the request format", status)
