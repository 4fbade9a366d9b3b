"""An approval is worth something only for the facts the custodian was shown."""

from __future__ import annotations

import pytest

from escrow.core import protocol
from escrow.core.protocol import PendingRequest

SHOWN = PendingRequest(
    request_id="r-" + "a" * 20, cluster_id="c" * 25, node_id="n" * 25, hostname="manager-1",
    boot_id="6a1f3c2e-4b5d-4e6f-8a7b-9c0d1e2f3a4b", source="192.0.2.10",
    created_at="2026-12-01T03:00:00.000+00:00", expires_at="2026-12-01T03:15:00.000+00:00",
    approvals=[], threshold=2, needed=1, cert_not_after="2027-03-01T00:00:00+00:00",
    cert_sha256="ab" * 32, ephemeral_public_key="A" * 44, eligible=True)


@pytest.mark.parametrize(("field", "other"), [
    ("request_id", "r-" + "b" * 20), ("cluster_id", "d" * 25), ("node_id", "m" * 25),
    ("hostname", "manager-2"), ("boot_id", "00000000-0000-4000-8000-000000000000"),
    ("source", "198.51.100.7"), ("cert_sha256", "cd" * 32), ("ephemeral_public_key", "B" * 44),
    ("expires_at", "2026-12-01T09:00:00.000+00:00"),
])
def test_an_approval_signed_for_one_fact_does_not_cover_another(field: str, other: str) -> None:
    moved = SHOWN.model_copy(update={field: other})
    assert protocol.approval_payload("approve", moved) != protocol.approval_payload(
        "approve", SHOWN)


def test_an_approval_is_not_a_denial_and_a_reason_is_covered() -> None:
    assert protocol.approval_payload("approve", SHOWN) != protocol.approval_payload("deny", SHOWN)
    assert protocol.approval_payload("deny", SHOWN, "a") != protocol.approval_payload(
        "deny", SHOWN, "b")
