"""The OpenAPI document says what the server serves: every route it registers, each with an
operationId and a tag, and the document is valid OpenAPI 3.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from escrow.config import Settings
from escrow.core.hsm import HsmSettings, Pin
from escrow.server.app import EscrowServer
from escrow.server.openapi import openapi_document

# The status page is HTML for browsers (README, "See the fleet"), not part of the API.
BROWSER_PAGES = "/status"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EscrowServer]:
    # Making the app opens no token: the HSM is looked for only once it serves.
    settings = Settings(data_dir=tmp_path, retention_days=90,
                        hsm=HsmSettings(str(tmp_path / "no-module.so"), "token"))
    made = EscrowServer(settings, Pin("unused", "test"))
    yield made
    made.pool.shutdown()


def test_every_route_the_server_registers_is_in_the_document_and_nothing_else(
        server: EscrowServer) -> None:
    served = {(route.method.lower(), route.resource.canonical)
              for route in server.app().router.routes()
              if route.method != "HEAD" and route.resource is not None
              and not route.resource.canonical.startswith(BROWSER_PAGES)}
    documented = {(method, path) for path, operations in openapi_document()["paths"].items()
                  for method in operations}
    assert served == documented


def test_the_document_is_valid_openapi_and_every_operation_is_named_once() -> None:
    document = openapi_document()
    validate(document)
    operations = [op for ops in document["paths"].values() for op in ops.values()]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids))
    assert all(op["tags"][0] in {"node", "custodian", "viewer", "operations"}
               for op in operations)
