"""SQLite backend: one file in the data directory, WAL journal, ``synchronous=FULL``.

Writes take the database lock up front (``BEGIN IMMEDIATE``), so a deposit computes its version
number and inserts every share under one lock, and a process killed at any instant leaves the
whole version or none of it (tests/integration/test_crash_safety.py kills real processes).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from escrow import audit
from escrow.audit import AuditEvent, AuditRecord
from escrow.errors import Conflict, NotFound, StoreError
from escrow.policy import Policy
from escrow.store import (
    ClusterRecord,
    CustodianRecord,
    KeyVersionRecord,
    MakeShares,
    ShareRecord,
)

# Forward migrations: entry i moves the schema from version i to i + 1. Never edit a released
# entry; append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE custodians (name TEXT PRIMARY KEY, public_key_pem TEXT NOT NULL,"
        " created_at TEXT NOT NULL)",
        "CREATE TABLE clusters (cluster_id TEXT PRIMARY KEY, root_ca_pem TEXT NOT NULL,"
        " threshold INTEGER NOT NULL, slots TEXT NOT NULL, created_at TEXT NOT NULL)",
        "CREATE TABLE key_versions (cluster_id TEXT NOT NULL REFERENCES clusters(cluster_id),"
        " version INTEGER NOT NULL, fingerprint TEXT NOT NULL, threshold INTEGER NOT NULL,"
        " slots TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (cluster_id, version),"
        " UNIQUE (cluster_id, fingerprint))",
        "CREATE TABLE shares (cluster_id TEXT NOT NULL, version INTEGER NOT NULL,"
        " slot INTEGER NOT NULL, holder TEXT NOT NULL, sealed BLOB NOT NULL,"
        " PRIMARY KEY (cluster_id, version, slot),"
        " FOREIGN KEY (cluster_id, version) REFERENCES key_versions(cluster_id, version)"
        " ON DELETE CASCADE)",
        "CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL,"
        " event TEXT NOT NULL, actor TEXT NOT NULL, cluster_id TEXT NOT NULL,"
        " details TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)",
        # Append-only against mistakes and casual edits; someone with write access to the
        # file can drop triggers, which the hash chain then catches.
        "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit"
        " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
        "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit"
        " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

Clock = Callable[[], str]


def _policy(threshold: int, slots_json: str) -> Policy:
    return Policy(threshold, tuple(json.loads(slots_json)))


class SqliteStore:
    def __init__(self, db: sqlite3.Connection, now: Clock) -> None:
        self._db = db
        self._now = now

    @classmethod
    def open(cls, path: Path, now: Clock, *, create: bool = False) -> SqliteStore:
        if not create and not path.exists():
            raise StoreError(f"the database {path} does not exist",
                             "run `escrow init` for this data directory, or restore a backup")
        old_umask = os.umask(0o077)
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {path}: {exc}",
                             "check the data directory's permissions") from None
        finally:
            os.umask(old_umask)
        try:
            db.execute("PRAGMA busy_timeout = 10000")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{path} cannot use WAL (journal mode {mode})",
                                 "put the data directory on a local file system")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            store = cls(db, now)
            store._migrate(path)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StoreError(f"{path} is not a usable escrow database: {exc}",
                             "restore it from a backup") from None
        except StoreError:
            db.close()
            raise
        return store

    def _migrate(self, path: Path) -> None:
        current = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {current}; this escrow knows up to {SCHEMA_VERSION}",
                "upgrade the escrow package; never run an older escrow on a newer database",
            )
        for version in range(current, SCHEMA_VERSION):
            with self._write() as db:
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"the database is unavailable: {exc}",
                             "another process may hold it locked; try again") from None
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as exc:
            self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"the database refused the change: {exc}",
                                 "check free space and permissions of the data directory"
                                 ) from None
            raise

    def _append(self, db: sqlite3.Connection, event: AuditEvent) -> AuditRecord:
        last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        prev_hash = last[1] if last else audit.GENESIS
        record = audit.seal(event, self._now(), prev_hash, 0)
        cursor = db.execute(
            "INSERT INTO audit (ts, event, actor, cluster_id, details, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.timestamp, record.event, record.actor, record.cluster_id,
             record.details_json, record.prev_hash, record.hash),
        )
        return replace(record, seq=int(cursor.lastrowid or 0))

    # -- custodians -------------------------------------------------------------------------

    def add_custodian(self, record: CustodianRecord, event: AuditEvent) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM custodians WHERE name = ?", (record.name,)).fetchone():
                raise Conflict(f"custodian {record.name!r} already exists",
                               "remove it first, or choose another name")
            db.execute("INSERT INTO custodians VALUES (?, ?, ?)",
                       (record.name, record.public_key_pem, record.created_at))
            self._append(db, event)

    def remove_custodian(self, name: str, event: AuditEvent) -> None:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM custodians WHERE name = ?", (name,)).fetchone():
                raise NotFound(f"no custodian named {name!r}", "see `escrow custodian list`")
            users = [row[0] for row in db.execute("SELECT cluster_id, slots FROM clusters")
                     if name in json.loads(row[1])]
            if users:
                raise Conflict(
                    f"custodian {name!r} holds a slot in the policy of: {', '.join(users)}",
                    "give the slot to someone else with `escrow cluster set-policy`, rotate the "
                    "unlock key so new shares are made, then remove the custodian",
                )
            db.execute("DELETE FROM custodians WHERE name = ?", (name,))
            self._append(db, event)

    def get_custodian(self, name: str) -> CustodianRecord:
        row = self._db.execute("SELECT name, public_key_pem, created_at FROM custodians "
                               "WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no custodian named {name!r}", "see `escrow custodian list`")
        return CustodianRecord(*row)

    def list_custodians(self) -> list[CustodianRecord]:
        rows = self._db.execute("SELECT name, public_key_pem, created_at FROM custodians "
                                "ORDER BY name")
        return [CustodianRecord(*row) for row in rows]

    # -- clusters ---------------------------------------------------------------------------

    def add_cluster(self, record: ClusterRecord, event: AuditEvent) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM clusters WHERE cluster_id = ?",
                          (record.cluster_id,)).fetchone():
                raise Conflict(f"cluster {record.cluster_id} is already registered",
                               "see `escrow cluster show`; change its policy with "
                               "`escrow cluster set-policy`")
            db.execute("INSERT INTO clusters VALUES (?, ?, ?, ?, ?)",
                       (record.cluster_id, record.root_ca_pem, record.policy.threshold,
                        json.dumps(list(record.policy.slots)), record.created_at))
            self._append(db, event)

    def set_policy(self, cluster_id: str, policy: Policy, event: AuditEvent) -> None:
        with self._write() as db:
            cursor = db.execute("UPDATE clusters SET threshold = ?, slots = ? WHERE cluster_id = ?",
                                (policy.threshold, json.dumps(list(policy.slots)), cluster_id))
            if cursor.rowcount == 0:
                raise _no_cluster(cluster_id)
            self._append(db, event)

    def get_cluster(self, cluster_id: str) -> ClusterRecord:
        row = self._db.execute("SELECT cluster_id, root_ca_pem, threshold, slots, created_at "
                               "FROM clusters WHERE cluster_id = ?", (cluster_id,)).fetchone()
        if row is None:
            raise _no_cluster(cluster_id)
        return ClusterRecord(row[0], row[1], _policy(row[2], row[3]), row[4])

    def list_clusters(self) -> list[ClusterRecord]:
        rows = self._db.execute("SELECT cluster_id, root_ca_pem, threshold, slots, created_at "
                                "FROM clusters ORDER BY cluster_id")
        return [ClusterRecord(r[0], r[1], _policy(r[2], r[3]), r[4]) for r in rows]

    # -- key versions -----------------------------------------------------------------------

    def add_key_version(
        self, cluster_id: str, fingerprint: str, policy: Policy, make_shares: MakeShares,
        event: AuditEvent,
    ) -> tuple[KeyVersionRecord, bool]:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM clusters WHERE cluster_id = ?",
                              (cluster_id,)).fetchone():
                raise _no_cluster(cluster_id)
            existing = db.execute(
                "SELECT version FROM key_versions WHERE cluster_id = ? AND fingerprint = ?",
                (cluster_id, fingerprint),
            ).fetchone()
            if existing:
                return self._key_version(db, cluster_id, existing[0]), False
            newest = db.execute("SELECT MAX(version) FROM key_versions WHERE cluster_id = ?",
                                (cluster_id,)).fetchone()[0]
            version = (newest or 0) + 1
            shares = make_shares(version)
            if len(shares) != len(policy.slots):
                raise StoreError(f"expected {len(policy.slots)} shares, got {len(shares)}",
                                 "this is a bug; nothing was stored")
            record = KeyVersionRecord(cluster_id, version, fingerprint, policy, self._now())
            db.execute("INSERT INTO key_versions VALUES (?, ?, ?, ?, ?, ?)",
                       (cluster_id, version, fingerprint, policy.threshold,
                        json.dumps(list(policy.slots)), record.created_at))
            db.executemany("INSERT INTO shares VALUES (?, ?, ?, ?, ?)",
                           [(s.cluster_id, s.version, s.slot, s.holder, s.sealed)
                            for s in shares])
            self._append(db, replace(event, details={**event.details, "version": version}))
            return record, True

    def _key_version(self, db: sqlite3.Connection, cluster_id: str,
                     version: int) -> KeyVersionRecord:
        row = db.execute("SELECT cluster_id, version, fingerprint, threshold, slots, created_at "
                         "FROM key_versions WHERE cluster_id = ? AND version = ?",
                         (cluster_id, version)).fetchone()
        return KeyVersionRecord(row[0], row[1], row[2], _policy(row[3], row[4]), row[5])

    def list_key_versions(self, cluster_id: str) -> list[KeyVersionRecord]:
        self.get_cluster(cluster_id)
        rows = self._db.execute(
            "SELECT cluster_id, version, fingerprint, threshold, slots, created_at "
            "FROM key_versions WHERE cluster_id = ? ORDER BY version DESC", (cluster_id,))
        return [KeyVersionRecord(r[0], r[1], r[2], _policy(r[3], r[4]), r[5]) for r in rows]

    def get_shares(self, cluster_id: str, version: int) -> list[ShareRecord]:
        rows = self._db.execute("SELECT cluster_id, version, slot, holder, sealed FROM shares "
                                "WHERE cluster_id = ? AND version = ? ORDER BY slot",
                                (cluster_id, version))
        return [ShareRecord(r[0], r[1], r[2], r[3], bytes(r[4])) for r in rows]

    def delete_key_versions(
        self, cluster_id: str, versions: Sequence[int], event: AuditEvent
    ) -> None:
        with self._write() as db:
            newest = db.execute("SELECT MAX(version) FROM key_versions WHERE cluster_id = ?",
                                (cluster_id,)).fetchone()[0]
            if newest in versions:
                raise Conflict(f"refusing to destroy version {newest}, the newest key of "
                               f"{cluster_id}", "the newest version is never destroyed")
            for version in versions:
                db.execute("DELETE FROM key_versions WHERE cluster_id = ? AND version = ?",
                           (cluster_id, version))
            self._append(db, event)

    # -- audit ------------------------------------------------------------------------------

    def append_audit(self, event: AuditEvent) -> AuditRecord:
        with self._write() as db:
            return self._append(db, event)

    def audit_records(self) -> list[AuditRecord]:
        rows = self._db.execute("SELECT seq, ts, event, actor, cluster_id, details, prev_hash, "
                                "hash FROM audit ORDER BY seq")
        return [AuditRecord(*row) for row in rows]


def _no_cluster(cluster_id: str) -> NotFound:
    return NotFound(f"cluster {cluster_id} is not registered",
                    "see `escrow cluster list`, or register it with `escrow cluster add`")
