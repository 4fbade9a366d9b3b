"""What replicas share through the store (the `store` fixture: SQLite and PostgreSQL): nonces and
signed custodian requests used once across replicas, the escrow's own secrets made once, and,
on PostgreSQL, decisions announced to every replica."""

from __future__ import annotations

import queue

import pytest

from escrow.audit import AuditEvent
from escrow.store.sql import PRUNE_EVERY, SqlStore
from tests.conftest import Backend

NOW = 1_800_000_000_000  # ms


def test_a_nonce_used_through_one_replica_is_refused_by_another(
        store: SqlStore, backend: Backend) -> None:
    replica = backend.open()
    try:
        assert store.use_once(b"n" * 32, NOW + 120_000, NOW)
        assert not replica.use_once(b"n" * 32, NOW + 120_000, NOW + 1)
        assert not store.use_once(b"n" * 32, NOW + 120_000, NOW + 2)
        assert replica.use_once(b"m" * 32, NOW + 120_000, NOW + 3)
    finally:
        replica.close()


def test_used_marks_survive_a_restart_of_the_escrow(store: SqlStore, backend: Backend) -> None:
    assert store.use_once(b"n" * 32, NOW + 120_000, NOW)
    store.close()
    reopened = backend.open()
    try:
        assert not reopened.use_once(b"n" * 32, NOW + 120_000, NOW + 1)
    finally:
        reopened.close()


def test_expired_marks_are_dropped_and_live_ones_are_kept(store: SqlStore) -> None:
    assert store.use_once(b"old" * 10, NOW + 1_000, NOW)
    assert store.use_once(b"live" * 8, NOW + 120_000, NOW)
    later = NOW + 5_000
    for index in range(PRUNE_EVERY):  # one of these sweeps what has expired
        assert store.use_once(index.to_bytes(32, "big"), later + 120_000, later)
    assert store.use_once(b"old" * 10, later + 120_000, later)  # gone, so new again
    assert not store.use_once(b"live" * 8, later + 120_000, later)


def test_two_replicas_making_the_same_secret_at_once_both_use_the_first(
        store: SqlStore, backend: Backend) -> None:
    replica = backend.open()
    try:
        first = store.add_meta("nonce-key", b"first", AuditEvent("escrow.nonce-key", "test"))
        second = replica.add_meta("nonce-key", b"second", AuditEvent("escrow.nonce-key", "test"))
        assert first == second == b"first"
        assert replica.get_meta("nonce-key") == b"first"
        assert [r.event for r in store.iter_audit()] == ["escrow.nonce-key"]
    finally:
        replica.close()


# One process serves an SQLite store, and wakes its own polls.
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_decision_announced_through_one_replica_wakes_the_listener_of_another(
        store: SqlStore, backend: Backend) -> None:
    heard: queue.Queue[str | None] = queue.Queue()
    replica = backend.open()
    try:
        replica.listen(heard.put)
        assert heard.get(timeout=10) is None  # listening now: whatever came before, look again
        backend.tamper("SELECT pg_notify('escrow_decided', 'request-1')")
        assert heard.get(timeout=2) == "request-1"
    finally:
        replica.close()
