"""The OpenAPI 3.1 document of /v1, generated from the protocol's pydantic models."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from escrow.core import protocol as p
from escrow.core.fleet import FleetStatus

# A custodian's request is signed: all four headers together (custodian_http_payload).
_CUSTODIAN_HEADERS = ("custodianKeyId", "custodianDate", "custodianNonce", "custodianSignature")
_CUSTODIAN: list[dict[str, list[str]]] = [{name: [] for name in _CUSTODIAN_HEADERS}]
_VIEWER: list[dict[str, list[str]]] = [{"viewerToken": []}]


def _header(name: str, description: str) -> dict[str, str]:
    return {"type": "apiKey", "in": "header", "name": name, "description": description}


_SECURITY_SCHEMES = {
    "custodianKeyId": _header(
        "X-Escrow-Key-Id", "the SHA-256 (64 lower-case hex digits) of the custodian's public "
        "key (DER), as registered with `escrow custodian add`"),
    "custodianDate": _header(
        "X-Escrow-Date", "the custodian's time, Unix seconds (decimal); refused more than 5 "
        "minutes off the escrow's"),
    "custodianNonce": _header(
        "X-Escrow-Nonce", "16 to 64 random letters or digits of the custodian's, never reused: "
        "a signed request is taken once, at any replica"),
    "custodianSignature": _header(
        "X-Escrow-Signature", "ECDSA P-256 (SHA-256, DER, base64) by the custodian's key over "
        "custodian_http_payload(method, path and query, X-Escrow-Date, X-Escrow-Nonce, body) "
        "of escrow/core/protocol.py"),
    "viewerToken": {
        "type": "http", "scheme": "bearer",
        "description": "a viewer's token, from `escrow viewer add` (Authorization: Bearer)"},
}

# Every error answer is a problem (RFC 9457); one shared response per status. Which
# operations can send which is said at each operation below, from what its handler and the
# middleware do (escrow/server/app.py).
_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "malformed request: the body, a field, a query parameter"),
    401: ("Unauthenticated", "the caller's proof failed: signature, nonce, custodian headers, "
                             "viewer token"),
    403: ("Forbidden", "refused by identity or policy checks (revoked, not a custodian of "
                       "the cluster, a certificate not of this node, ...)"),
    404: ("NotFound", "an unknown cluster, request, window or key version"),
    408: ("RequestTimeout", "the body did not arrive within server.body_timeout_seconds"),
    409: ("Conflict", "conflicting state: decided already, not pending, quarantined, ..."),
    413: ("TooLarge", "the body is larger than server.max_body_bytes"),
    429: ("RateLimited", "too many requests, from this source (server.source_rate) or of "
                         "this node; Retry-After says when to try again"),
    500: ("Internal", "a bug: the escrow's log has the traceback"),
    503: ("Unavailable", "the HSM or the database is unavailable, or the escrow is starting "
                         "or shutting down"),
    507: ("DiskFull", "the data directory's file system (or the database's) is full: new "
                      "keys and enrollments are refused first, releases go on in the reserve "
                      "kept for them (server.disk_reserve_bytes)"),
}
_RESPONSES: dict[str, dict[str, Any]] = {
    name: {"description": text, "content": _PROBLEM} for name, text in _ERRORS.values()}
_RESPONSES["RateLimited"]["headers"] = {"Retry-After": {
    "required": True, "description": "seconds to wait before trying again",
    "schema": {"type": "integer", "minimum": 1}}}
# What any operation can answer: a bug; and, but for /metrics, 503 while shutting down.
_ALWAYS = (500, 503)
# A request body: unparsable or not of the model, too slow, too large.
_BODY_ERRORS = (400, 408, 413)
# A signed custodian request: the signature may fail, and the request's mark (taken once) is
# written, which a full disk refuses.
_CUSTODIAN_ERRORS = (401, 507)
# A node's signed request: its signature or nonce may fail (401), the node or its certificate
# be refused (403), its cluster unknown (404), the node quarantined or its state not allow it
# (409); the nonce's use is written.
_NODE_ERRORS = (401, 403, 404, 409, 507)


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"$ref": f"#/components/responses/{_ERRORS[code][0]}"}
            for code in sorted(set(codes))}


def _op(summary: str, response: type[BaseModel], body: type[BaseModel] | None = None,
        *, status: str | dict[str, str] = "200", custodian: bool = False,
        viewer: bool = False, array: bool = False, counted: bool = True,
        errors: tuple[int, ...] = (),
        params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An operation answering ``response`` with ``status`` (or each of several, by what each
    means) and the problems ``errors``, besides those its kind brings: every operation's
    (_ALWAYS), a body's, a custodian's or viewer's, and 429 for one ``counted`` against its
    source's rate (every /v1 path but /v1/info and the document)."""
    schema: dict[str, Any] = {"type": "array", "items": _ref(response)} if array \
        else _ref(response)
    statuses = {status: "success"} if isinstance(status, str) else status
    codes = [*_ALWAYS, *errors, *([429] if counted else []),
             *(_BODY_ERRORS if body is not None else ()),
             *(_CUSTODIAN_ERRORS if custodian else ()), *((401,) if viewer else ())]
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {**{code: {"description": text,
                                "content": {"application/json": {"schema": schema}}}
                         for code, text in statuses.items()},
                      **_errors(*codes)},
    }
    if body is not None:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": _ref(body)}}}
    if custodian:
        operation["security"] = _CUSTODIAN
    if viewer:
        operation["security"] = _VIEWER
    if params:
        operation["parameters"] = params
    return operation


_REQUEST_ID = {"name": "request_id", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": "^r-[a-z0-9]{20}$"}}
_CLUSTER_ID = {"name": "cluster_id", "in": "query", "required": True,
               "schema": {"type": "string", "pattern": "^[a-z0-9]{25}$"}}
_WINDOW_ID = {"name": "window_id", "in": "path", "required": True,
              "schema": {"type": "string", "pattern": p.WINDOW_ID_PATTERN}}
_OF_CLUSTER = {"name": "cluster_id", "in": "query", "required": False,
               "schema": {"type": "string", "pattern": "^[a-z0-9]{25}$"}}
_WAIT = {"name": "wait", "in": "query", "required": False,
         "schema": {"type": "number", "minimum": 0, "maximum": 60}}


# Who calls each path, for the document's tags; custodians' and viewers' paths are told by
# their security.
_NODE_PATHS = ("/v1/nonce", "/v1/enroll", "/v1/deposit", "/v1/unseal", "/v1/heartbeat")


def _named(document: dict[str, Any]) -> dict[str, Any]:
    """Every operation gets a stable operationId from its method and path
    (``postV1RequestsRequestIdApprove``) and a tag naming who calls it."""
    for path, operations in document["paths"].items():
        words = [w.strip("{}") for w in path.strip("/").replace(".", "_").split("/")]
        for method, operation in operations.items():
            operation["operationId"] = method + "".join(
                part.capitalize() for word in words for part in word.split("_"))
            security = operation.get("security")
            operation["tags"] = ["custodian" if security == _CUSTODIAN else
                                 "viewer" if security == _VIEWER else
                                 "node" if path.startswith(_NODE_PATHS) else "operations"]
    return document


@cache
def openapi_document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        p.NonceResponse, p.HealthResponse, p.InfoResponse, p.EnrollRequest, p.EnrollResponse,
        p.DepositRequest, p.DepositResponse, p.UnsealRequest, p.RequestStatus, p.ReleasedShare,
        p.ResultReport, p.ResultResponse, p.HeartbeatRequest, p.HeartbeatResponse, p.PendingRequest,
        p.ApproveRequest, p.BatchApproveRequest, p.BatchApproveResponse, p.DenyRequest,
        p.DecisionResponse, p.ShareExportRequest, p.ShareVerifyRequest, p.ShareVerifyResponse,
        p.ShareDrills, p.ErrorResponse, FleetStatus,
        p.WindowOpenRequest, p.WindowSignRequest, p.WindowCloseRequest, p.WindowView]
    _, schemas = models_json_schema([(m, "validation") for m in models],
                                    ref_template="#/components/schemas/{model}")
    return _named({
        "openapi": "3.1.0",
        "info": {"title": "swarm-unseal escrow", "version": p.API_VERSION,
                 "description": "Unlock-key escrow for Docker Swarm managers. Signatures cover "
                                "the encodings in escrow/core/protocol.py, never the JSON. "
                                "Every error is an RFC 9457 problem (application/problem+json) "
                                f"whose type is {p.PROBLEM_TYPES}<error>, never resolved: "
                                "`error`, `message` and `hint` are its extension members."},
        "paths": {
            "/healthz": {"get": _op("HSM reachable and the database writable (503 if not)",
                                    p.HealthResponse, counted=False)},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (OpenMetrics text when asked for it); served "
                           "while the HSM or the store is down, and while shutting down",
                "responses": {"200": {"description": "success", "content": {
                    "text/plain": {"schema": {"type": "string"}},
                    "application/openmetrics-text": {"schema": {"type": "string"}}}},
                    **_errors(500)}}},
            "/v1/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": {"description": "success", "content": {
                    "application/json": {"schema": {"type": "object"}}}},
                    **_errors(*_ALWAYS)}}},
            "/v1/info": {"get": _op("Server facts and the deposit key", p.InfoResponse,
                                    counted=False)},
            "/v1/nonce": {"post": _op("A fresh single-use nonce", p.NonceResponse)},
            "/v1/enroll": {"post": _op("Enroll a manager's agent", p.EnrollResponse,
                                       p.EnrollRequest, errors=_NODE_ERRORS)},
            "/v1/deposit": {"post": _op(
                "Deposit an unlock key", p.DepositResponse, p.DepositRequest,
                status={"201": "a new key version (created)",
                        "200": "this key was deposited before: nothing changed"},
                errors=_NODE_ERRORS)},
            "/v1/unseal": {"post": _op("Request shares for a locked manager", p.RequestStatus,
                                       p.UnsealRequest, status="201", errors=_NODE_ERRORS)},
            "/v1/unseal/{request_id}": {"get": _op(
                "Long-poll a request", p.RequestStatus, params=[_REQUEST_ID, _WAIT],
                errors=(400, 404, 507))},
            "/v1/unseal/{request_id}/result": {"post": _op(
                "Report the unlock result", p.ResultResponse, p.ResultReport,
                params=[_REQUEST_ID], errors=_NODE_ERRORS)},
            "/v1/heartbeat": {"post": _op("A node's periodic word that it is up",
                                          p.HeartbeatResponse, p.HeartbeatRequest,
                                          errors=(401, 403, 404, 507))},
            "/v1/requests": {"get": _op("Pending requests", p.PendingRequest, custodian=True,
                                        array=True)},
            "/v1/requests/{request_id}/approve": {"post": _op(
                "Approve a request", p.DecisionResponse, p.ApproveRequest, custodian=True,
                params=[_REQUEST_ID], errors=(403, 404, 409))},
            "/v1/requests/approve": {"post": _op(
                "Approve several requests of one cluster at once (a power cut), each signed "
                "over its own request's facts; one refused leaves the others approved (and is "
                "named in the answer)",
                p.BatchApproveResponse, p.BatchApproveRequest, custodian=True)},
            "/v1/requests/{request_id}/deny": {"post": _op(
                "Deny a request", p.DecisionResponse, p.DenyRequest, custodian=True,
                params=[_REQUEST_ID], errors=(403, 404, 409))},
            "/v1/shares/export": {"post": _op("Export one's own share for paper backup",
                                              p.ReleasedShare, p.ShareExportRequest,
                                              custodian=True, errors=(403, 404))},
            "/v1/shares/verify": {"post": _op(
                "Prove one's paper share matches the escrow's copy, without sending it: an "
                "HMAC over a fresh nonce keyed from the share (escrow/core/drill.py), per "
                "version", p.ShareVerifyResponse, p.ShareVerifyRequest, custodian=True,
                errors=(403, 404))},
            "/v1/shares/drills": {"get": _op(
                "Every custodian slot of a cluster's retained versions and its last "
                "successful drill (for a custodian holding one)", p.ShareDrills,
                custodian=True, params=[_CLUSTER_ID], errors=(400, 403, 404))},
            "/v1/windows": {
                "get": _op("Maintenance windows of the clusters where one holds a slot, newest "
                           "first", p.WindowView, custodian=True, array=True,
                           params=[_OF_CLUSTER], errors=(400, 404)),
                "post": _op("Open a maintenance window: the signer's approval of up to N "
                            "restarts of the named nodes until it expires (window_payload)",
                            p.WindowView, p.WindowOpenRequest, status="201", custodian=True,
                            errors=(403, 404, 409))},
            "/v1/windows/{window_id}/sign": {"post": _op(
                "Co-sign a window as it is shown: one more approval of its requests",
                p.WindowView, p.WindowSignRequest, custodian=True, params=[_WINDOW_ID],
                errors=(403, 404, 409))},
            "/v1/windows/{window_id}/close": {"post": _op(
                "Close a window: it approves nothing more", p.WindowView, p.WindowCloseRequest,
                custodian=True, params=[_WINDOW_ID], errors=(403, 404, 409))},
            "/v1/status": {"get": _op("The fleet: every manager's state, the requests waiting "
                                      "for custodians, the escrow's health (for viewers; "
                                      "answers while the HSM is down)", FleetStatus,
                                      viewer=True)},
        },
        "components": {
            "schemas": schemas["$defs"],
            "responses": _RESPONSES,
            "securitySchemes": _SECURITY_SCHEMES,
        },
    })
