"""Deposits, history and pruning over a real store (SQLite, PostgreSQL) and a real SoftHSM
token."""

from __future__ import annotations

import os
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from escrow.audit import AuditEvent
from escrow.core import shares
from escrow.core.errors import Conflict, NotFound, PolicyError, ShareAuthFailed, StoreError
from escrow.core.unlockkey import UnlockKey
from escrow.store.sql import SqlStore
from escrow.store.sqlite import SCHEMA_VERSION, SqliteStore
from escrow.vault import Vault
from escrow.wrapping import Token
from lab.custodians import public_key_pem
from tests.conftest import Backend, Clock

CLUSTER = "k" * 25


@pytest.fixture
def cluster(vault: Vault, root_ca_pem: bytes) -> str:
    for name in ("alice", "bob", "carol"):
        vault.add_custodian(name, public_key_pem())
    vault.add_cluster(CLUSTER, root_ca_pem, 2, ["auto", "auto", "alice", "bob", "carol"])
    return CLUSTER


def open_all(vault: Vault, cluster_id: str, version: int) -> list[str]:
    return [vault.unwrap_share(s) for s in vault.store.get_shares(cluster_id, version)]


def test_deposit_stores_one_version_with_a_wrapped_share_per_slot(vault: Vault,
                                                                  cluster: str) -> None:
    key = UnlockKey(os.urandom(32))
    result = vault.deposit(cluster, key)
    assert (result.version, result.created) == (1, True)
    stored = vault.store.get_shares(cluster, 1)
    assert [s.holder for s in stored] == ["auto", "auto", "alice", "bob", "carol"]
    mnemonics = open_all(vault, cluster, 1)
    assert all(m.encode() not in s.wrapped for m, s in zip(mnemonics, stored, strict=True))
    assert shares.combine([mnemonics[0], mnemonics[4]]) == key
    assert shares.combine(mnemonics[2:4]) == key
    (record,) = vault.store.list_key_versions(cluster)
    assert record.fingerprint == key.fingerprint(cluster)


def test_depositing_a_known_key_adds_nothing_but_is_audited(vault: Vault, cluster: str) -> None:
    key = UnlockKey(os.urandom(32))
    vault.deposit(cluster, key)
    again = vault.deposit(cluster, key)
    assert (again.version, again.created) == (1, False)
    assert len(vault.store.list_key_versions(cluster)) == 1
    assert len(vault.store.get_shares(cluster, 1)) == 5
    assert vault.store.latest_audit(1)[0].event == "key.deposit_existing"


def test_versions_are_listed_newest_first(vault: Vault, cluster: str, clock: Clock) -> None:
    for _ in range(3):
        vault.deposit(cluster, UnlockKey(os.urandom(32)))
        clock.advance(hours=1)
    assert [v.version for v in vault.store.list_key_versions(cluster)] == [3, 2, 1]


def test_a_share_row_copied_onto_another_row_fails_to_open(vault: Vault, cluster: str,
                                                          backend: Backend) -> None:
    vault.deposit(cluster, UnlockKey(os.urandom(32)))
    backend.tamper("UPDATE shares SET wrapped = (SELECT wrapped FROM shares WHERE slot = 0) "
                   "WHERE slot = 2")
    alice = vault.store.get_shares(cluster, 1)[2]
    with pytest.raises(ShareAuthFailed):
        vault.unwrap_share(alice)


def test_a_deposit_that_fails_half_way_stores_nothing(store: SqlStore, token: Token,
                                                      clock: Clock, root_ca_pem: bytes) -> None:
    class FailingOnThirdShare:
        calls = 0

        def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
            self.calls += 1
            if self.calls == 3:
                raise StoreError("simulated failure", "")
            return token.wrap(plaintext, aad)

        def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
            return token.unwrap(wrapped, aad)

    vault = Vault(store, FailingOnThirdShare(), clock, "test")
    vault.add_cluster(CLUSTER, root_ca_pem, 2, ["auto"] * 4, allow_no_paper=True)
    audit_before = sum(1 for _ in store.iter_audit())
    with pytest.raises(StoreError, match="simulated"):
        vault.deposit(CLUSTER, UnlockKey(os.urandom(32)))
    assert store.list_key_versions(CLUSTER) == []
    assert store.get_shares(CLUSTER, 1) == []
    assert sum(1 for _ in store.iter_audit()) == audit_before


def test_prune_destroys_only_versions_past_retention_and_audits_it(
        vault: Vault, cluster: str, clock: Clock) -> None:
    for _ in range(3):
        vault.deposit(cluster, UnlockKey(os.urandom(32)))
        clock.advance(days=10)
    retention = timedelta(days=15)
    assert vault.prune(cluster, retention, dry_run=True).destroyed == [1]
    assert len(vault.store.list_key_versions(cluster)) == 3
    assert vault.prune(cluster, retention).destroyed == [1]
    assert [v.version for v in vault.store.list_key_versions(cluster)] == [3, 2]
    assert vault.store.get_shares(cluster, 1) == []
    last = vault.store.latest_audit(1)[0]
    assert (last.event, last.details["versions"]) == ("key.prune", [1])
    clock.advance(days=1000)
    assert vault.prune(cluster, timedelta(0)).destroyed == [2]
    assert [v.version for v in vault.store.list_key_versions(cluster)] == [3]


def test_the_store_refuses_to_destroy_the_newest_version(vault: Vault, cluster: str) -> None:
    vault.deposit(cluster, UnlockKey(os.urandom(32)))
    with pytest.raises(Conflict, match="refusing to destroy version 1, the newest"):
        vault.store.delete_key_versions(cluster, [1], AuditEvent("key.prune", "test", cluster))


def test_policy_rules_are_enforced_on_registration(vault: Vault, root_ca_pem: bytes) -> None:
    with pytest.raises(PolicyError, match="unknown custodian"):
        vault.add_cluster(CLUSTER, root_ca_pem, 2, ["auto", "zed"])
    with pytest.raises(PolicyError, match="cannot be rebuilt from paper"):
        vault.add_cluster(CLUSTER, root_ca_pem, 2, ["auto", "auto"])
    assert vault.store.list_clusters() == []
    vault.add_cluster(CLUSTER, root_ca_pem, 2, ["auto", "auto"], allow_no_paper=True)
    assert vault.store.latest_audit(1)[0].details["paper_recoverable"] is False


def test_a_custodian_in_a_policy_cannot_be_removed(vault: Vault, cluster: str) -> None:
    with pytest.raises(Conflict, match="holds a slot in the policy of"):
        vault.remove_custodian("alice")
    vault.set_policy(cluster, 2, ["auto", "auto", "bob", "carol"])
    vault.remove_custodian("alice")
    assert [c.name for c in vault.store.list_custodians()] == ["bob", "carol"]


def test_deposit_to_an_unknown_cluster_is_refused(vault: Vault) -> None:
    with pytest.raises(NotFound, match="is not registered"):
        vault.deposit("z" * 25, UnlockKey(os.urandom(32)))


def test_sqlite_uses_wal_full_sync_and_a_schema_version(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "escrow.db", lambda: "t", create=True)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.close()


def test_a_database_from_a_newer_escrow_is_refused(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "escrow.db"
    SqliteStore.open(path, lambda: "t", create=True).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="this escrow knows up to"):
        SqliteStore.open(path, lambda: "t")


def test_reopening_applies_no_migration_twice(backend: Backend, vault: Vault,
                                             cluster: str) -> None:
    reopened = backend.open()
    assert [c.cluster_id for c in reopened.list_clusters()] == [cluster]
    reopened.close()


def test_the_audit_table_refuses_updates_and_deletes(store: SqlStore) -> None:
    store.append_audit(AuditEvent("x", "test"))
    for statement in ("UPDATE audit SET actor = 'me'", "DELETE FROM audit"):
        # SQLite's own error; PostgreSQL's as the store words it
        with pytest.raises((sqlite3.IntegrityError, StoreError), match="append-only"):
            store._db.execute(statement)
