"""A request and the shares an automatic policy releases to it at once are one transaction on
both stores (the `store` fixture): both are written, or neither is."""

from __future__ import annotations

import pytest

from escrow.audit import AuditEvent
from escrow.core.errors import StoreError
from escrow.core.states import RequestState
from escrow.store import RequestRecord
from escrow.store.sql import SqlStore


def _request(request_id: str) -> RequestRecord:
    return RequestRecord(request_id, "c" * 25, "n" * 25, "host", "boot", "127.0.0.1", "pem",
                         b"k" * 32, "", "2026-12-02T00:00:00Z", "2026-12-02T00:05:00Z",
                         RequestState.PENDING)


def _release(request_id: str) -> AuditEvent:
    return AuditEvent("unseal.release", "escrow", "c" * 25, {"request_id": request_id})


def test_a_request_is_written_with_the_shares_released_to_it_at_once(store: SqlStore) -> None:
    store.create_request(_request("r-1"), AuditEvent("unseal.request", "node:n", "c" * 25),
                         [(1, 1, "auto"), (1, 2, "auto")], _release("r-1"))
    assert store.list_releases("r-1") == [(1, 1, "auto"), (1, 2, "auto")]
    assert [r.event for r in store.iter_audit()] == ["unseal.request", "unseal.release"]
    # A poll that finds them released writes nothing more.
    assert store.record_releases("r-1", [(1, 1, "auto"), (1, 2, "auto")], _release("r-1")) == 0


def test_a_release_that_cannot_be_written_leaves_no_request_behind(store: SqlStore) -> None:
    with pytest.raises(StoreError):  # the same share twice breaks the releases' primary key
        store.create_request(_request("r-1"), AuditEvent("unseal.request", "node:n", "c" * 25),
                             [(1, 1, "auto"), (1, 1, "auto")], _release("r-1"))
    assert store.get_request("r-1") is None
    assert store.list_releases("r-1") == []
    assert list(store.iter_audit()) == []
