"""The OpenAPI 3.1 document of /v1, generated from the protocol's pydantic models."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from escrow.core import protocol as p
from escrow.core.fleet import FleetStatus

_CUSTODIAN: list[dict[str, list[str]]] = [{"custodianSignature": []}]
_VIEWER: list[dict[str, list[str]]] = [{"viewerToken": []}]
_ERRORS = {str(code): {"description": text, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for code, text in ((400, "malformed request"), (401, "authentication failed"),
                       (403, "refused by identity or policy checks"), (404, "unknown"),
                       (409, "conflicting state"), (413, "body too large"),
                       (429, "rate limited"), (503, "HSM or database unavailable"))}


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _op(summary: str, response: type[BaseModel] | None, body: type[BaseModel] | None = None,
        *, status: str = "200", custodian: bool = False, viewer: bool = False,
        array: bool = False,
        params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = (
        {"type": "array", "items": _ref(response)} if array and response
        else _ref(response) if response else {"type": "object"})
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {status: {"description": "success",
                               "content": {"application/json": {"schema": schema}}},
                      **_ERRORS},
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
                                "the encodings in escrow/core/protocol.py, never the JSON."},
        "paths": {
            "/healthz": {"get": _op("HSM reachable and the database writable (503 if not)",
                                    p.HealthResponse)},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (OpenMetrics text when asked for it); served "
                           "while the HSM or the store is down",
                "responses": {"200": {"description": "success", "content": {
                    "text/plain": {"schema": {"type": "string"}},
                    "application/openmetrics-text": {"schema": {"type": "string"}}}}}}},
            "/v1/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": {"description": "success", "content": {
                    "application/json": {"schema": {"type": "object"}}}}}}},
            "/v1/info": {"get": _op("Server facts and the deposit key", p.InfoResponse)},
            "/v1/nonce": {"post": _op("A fresh single-use nonce", p.NonceResponse)},
            "/v1/enroll": {"post": _op("Enroll a manager's agent", p.EnrollResponse,
                                       p.EnrollRequest)},
            "/v1/deposit": {"post": _op("Deposit an unlock key", p.DepositResponse,
                                        p.DepositRequest, status="201")},
            "/v1/unseal": {"post": _op("Request shares for a locked manager", p.RequestStatus,
                                       p.UnsealRequest, status="201")},
            "/v1/unseal/{request_id}": {"get": _op(
                "Long-poll a request", p.RequestStatus, params=[_REQUEST_ID, _WAIT])},
            "/v1/unseal/{request_id}/result": {"post": _op(
                "Report the unlock result", p.ResultResponse, p.ResultReport,
                params=[_REQUEST_ID])},
            "/v1/heartbeat": {"post": _op("A node's periodic word that it is up",
                                          p.HeartbeatResponse, p.HeartbeatRequest)},
            "/v1/requests": {"get": _op("Pending requests", p.PendingRequest, custodian=True,
                                        array=True)},
            "/v1/requests/{request_id}/approve": {"post": _op(
                "Approve a request", p.DecisionResponse, p.ApproveRequest, custodian=True,
                params=[_REQUEST_ID])},
            "/v1/requests/approve": {"post": _op(
                "Approve several requests of one cluster at once (a power cut), each signed "
                "over its own request's facts; one refused leaves the others approved",
                p.BatchApproveResponse, p.BatchApproveRequest, custodian=True)},
            "/v1/requests/{request_id}/deny": {"post": _op(
                "Deny a request", p.DecisionResponse, p.DenyRequest, custodian=True,
                params=[_REQUEST_ID])},
            "/v1/shares/export": {"post": _op("Export one's own share for paper backup",
                                              p.ReleasedShare, p.ShareExportRequest,
                                              custodian=True)},
            "/v1/shares/verify": {"post": _op(
                "Prove one's paper share matches the escrow's copy, without sending it: an "
                "HMAC over a fresh nonce keyed from the share (escrow/core/drill.py), per "
                "version", p.ShareVerifyResponse, p.ShareVerifyRequest, custodian=True)},
            "/v1/shares/drills": {"get": _op(
                "Every custodian slot of a cluster's retained versions and its last "
                "successful drill (for a custodian holding one)", p.ShareDrills,
                custodian=True, params=[_CLUSTER_ID])},
            "/v1/windows": {
                "get": _op("Maintenance windows of the clusters where one holds a slot, newest "
                           "first", p.WindowView, custodian=True, array=True,
                           params=[_OF_CLUSTER]),
                "post": _op("Open a maintenance window: the signer's approval of up to N "
                            "restarts of the named nodes until it expires (window_payload)",
                            p.WindowView, p.WindowOpenRequest, status="201", custodian=True)},
            "/v1/windows/{window_id}/sign": {"post": _op(
                "Co-sign a window as it is shown: one more approval of its requests",
                p.WindowView, p.WindowSignRequest, custodian=True, params=[_WINDOW_ID])},
            "/v1/windows/{window_id}/close": {"post": _op(
                "Close a window: it approves nothing more", p.WindowView, p.WindowCloseRequest,
                custodian=True, params=[_WINDOW_ID])},
            "/v1/status": {"get": _op("The fleet: every manager's state, the requests waiting "
                                      "for custodians, the escrow's health (for viewers; "
                                      "answers while the HSM is down)", FleetStatus,
                                      viewer=True)},
        },
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {"custodianSignature": {
                "type": "apiKey", "in": "header", "name": "X-Escrow-Signature",
                "description": "ECDSA P-256 signature over custodian_http_payload(method, path, "
                               "X-Escrow-Date, X-Escrow-Nonce, body), with X-Escrow-Key-Id "
                               "the SHA-256 of the custodian's public key (DER) and "
                               "X-Escrow-Nonce 16 to 64 random letters or digits, never "
                               "reused"},
                "viewerToken": {
                    "type": "http", "scheme": "bearer",
                    "description": "a viewer's token, from `escrow viewer add`"}},
        },
    })
