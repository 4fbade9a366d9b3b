"""SQLite backend: one file in the data directory, WAL journal, ``synchronous=FULL``.

Writes take the database lock up front (``BEGIN IMMEDIATE``), so a deposit computes its version
number and inserts every share under one lock, and a process killed at any instant leaves the
whole version or none of it (tests/integration/test_crash_safety.py kills real processes). The
queries themselves are escrow.store.sql's, shared with PostgreSQL.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from escrow.core.errors import DiskFull, StoreError
from escrow.store import StoreKind
from escrow.store.sql import AUDIT_BATCH, Clock, NamedRow, SqlStore

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
    (
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
        "CREATE TABLE nodes (cluster_id TEXT NOT NULL REFERENCES clusters(cluster_id),"
        " node_id TEXT NOT NULL, agent_public_key_pem TEXT NOT NULL, hostname TEXT NOT NULL,"
        " enrolled_at TEXT NOT NULL, status TEXT NOT NULL, PRIMARY KEY (cluster_id, node_id))",
        "CREATE TABLE requests (request_id TEXT PRIMARY KEY, cluster_id TEXT NOT NULL,"
        " node_id TEXT NOT NULL, hostname TEXT NOT NULL, boot_id TEXT NOT NULL,"
        " source TEXT NOT NULL, cert_pem TEXT NOT NULL, ephemeral_key BLOB NOT NULL,"
        " kek_version TEXT NOT NULL, created_at TEXT NOT NULL, expires_at TEXT NOT NULL,"
        " state TEXT NOT NULL, reason TEXT NOT NULL)",
        "CREATE INDEX requests_by_node ON requests (cluster_id, node_id, created_at)",
        "CREATE INDEX requests_by_state ON requests (state)",
        "CREATE TABLE approvals (request_id TEXT NOT NULL REFERENCES requests(request_id),"
        " custodian TEXT NOT NULL, decision TEXT NOT NULL, signature TEXT NOT NULL,"
        " reason TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (request_id, custodian))",
        "CREATE TABLE releases (request_id TEXT NOT NULL REFERENCES requests(request_id),"
        " version INTEGER NOT NULL, slot INTEGER NOT NULL, holder TEXT NOT NULL,"
        " released_at TEXT NOT NULL, PRIMARY KEY (request_id, version, slot))",
    ),
    (
        # One outcome per version per request: a replayed or repeated report changes nothing.
        "CREATE TABLE results (request_id TEXT NOT NULL REFERENCES requests(request_id),"
        " version INTEGER NOT NULL, outcome TEXT NOT NULL, reported_at TEXT NOT NULL,"
        " PRIMARY KEY (request_id, version))",
        "CREATE INDEX audit_by_actor ON audit (event, actor, ts)",
    ),
    (
        # Audit archiving (`escrow audit archive`): one row per archive, append-only, each
        # naming a record still in the log when it is made, newer than the last checkpoint.
        "CREATE TABLE audit_checkpoints (seq INTEGER PRIMARY KEY, hash TEXT NOT NULL,"
        " first_seq INTEGER NOT NULL, records INTEGER NOT NULL, archive_name TEXT NOT NULL,"
        " archive_sha256 TEXT NOT NULL, created_at TEXT NOT NULL)",
        "CREATE TRIGGER audit_checkpoints_name_a_record BEFORE INSERT ON audit_checkpoints"
        " WHEN NOT EXISTS (SELECT 1 FROM audit WHERE seq = NEW.seq AND hash = NEW.hash)"
        " OR NEW.seq <= (SELECT COALESCE(MAX(seq), 0) FROM audit_checkpoints)"
        " BEGIN SELECT RAISE(ABORT, 'an audit checkpoint names a record in the log, newer"
        " than the last checkpoint'); END",
        "CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints"
        " BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END",
        "CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints"
        " BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END",
        # The audit log stays append-only, except for records a checkpoint covers: those are
        # in an archive file, written and synced before the checkpoint was made.
        "DROP TRIGGER audit_no_delete",
        "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit"
        " WHEN NOT EXISTS (SELECT 1 FROM audit_checkpoints WHERE seq >= OLD.seq)"
        " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: only records an archive"
        " checkpoint covers can be deleted (escrow audit archive)'); END",
    ),
    (
        # One word for the token's AES-GCM: a share is *wrapped* (encrypting to an agent is
        # HPKE's, chaining is the audit log's).
        "ALTER TABLE shares RENAME COLUMN sealed TO wrapped",
    ),
    (
        # Heartbeats: a row per recent boot of a node, updated in place by each beat.
        "CREATE TABLE heartbeats (cluster_id TEXT NOT NULL, node_id TEXT NOT NULL,"
        " boot_id TEXT NOT NULL, first_at TEXT NOT NULL, last_at TEXT NOT NULL,"
        " lock_state TEXT NOT NULL, kek_version TEXT NOT NULL, agent_version TEXT NOT NULL,"
        " uptime_seconds INTEGER NOT NULL, interval_seconds INTEGER NOT NULL,"
        " goodbye INTEGER NOT NULL, source TEXT NOT NULL,"
        " PRIMARY KEY (cluster_id, node_id, boot_id),"
        " FOREIGN KEY (cluster_id, node_id) REFERENCES nodes(cluster_id, node_id))",
        "CREATE INDEX heartbeats_by_time ON heartbeats (cluster_id, node_id, last_at)",
        "ALTER TABLE requests ADD COLUMN held_until TEXT NOT NULL DEFAULT ''",
    ),
    (
        # Single use of nonces and signed custodian requests (escrow.nonces), kept until
        # they expire.
        "CREATE TABLE used_once (key BLOB PRIMARY KEY, expires_at INTEGER NOT NULL)",
        "CREATE INDEX used_once_by_expiry ON used_once (expires_at)",
    ),
    (
        # Viewers of the status page and `escrow status`: a name and the SHA-256 of a random
        # token, never the token.
        "CREATE TABLE viewers (name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE,"
        " created_at TEXT NOT NULL)",
    ),
    (
        # Custodians' workflows: maintenance windows (pre-approved restarts of named nodes,
        # each signature one custodian's approval), the approvals given on a window's
        # authority, a cluster's deny window, and each share's last successful drill.
        "CREATE TABLE windows (window_id TEXT PRIMARY KEY,"
        " cluster_id TEXT NOT NULL REFERENCES clusters(cluster_id), nodes TEXT NOT NULL,"
        " restarts INTEGER NOT NULL, used INTEGER NOT NULL, expires_at TEXT NOT NULL,"
        " reason TEXT NOT NULL, created_at TEXT NOT NULL, closed_at TEXT NOT NULL,"
        " closed_by TEXT NOT NULL)",
        "CREATE TABLE window_signatures (window_id TEXT NOT NULL"
        " REFERENCES windows(window_id), custodian TEXT NOT NULL, signature TEXT NOT NULL,"
        " created_at TEXT NOT NULL, PRIMARY KEY (window_id, custodian))",
        "ALTER TABLE approvals ADD COLUMN window_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE clusters ADD COLUMN approve_after_seconds INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE share_drills (cluster_id TEXT NOT NULL, version INTEGER NOT NULL,"
        " slot INTEGER NOT NULL, custodian TEXT NOT NULL, last_ok_at TEXT NOT NULL,"
        " PRIMARY KEY (cluster_id, version, slot))",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class SqliteStore(SqlStore):
    kind: StoreKind = "sqlite"

    def __init__(self, db: sqlite3.Connection, now: Clock, path: Path) -> None:
        super().__init__(db, now)
        self._sqlite = db
        self._path = path

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
            store = cls(db, now, path)
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
        current = int(self._sqlite.execute("PRAGMA user_version").fetchone()[0])
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
        self._sqlite.close()

    def replicas(self) -> list[str]:
        """None: one process serves an SQLite store."""
        return []

    def check_writable(self) -> StoreKind:
        try:
            self._sqlite.execute("SELECT 1 FROM meta LIMIT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"the database {self._path} does not answer: {exc}",
                             "restore it from a backup") from None
        if not os.access(self._path, os.W_OK) or not os.access(self._path.parent, os.W_OK):
            raise StoreError(f"the database {self._path} is read-only",
                             "give the escrow's user write access to its data directory")
        return "sqlite"

    def _named(self, sql: str, params: Sequence[object] = ()) -> list[NamedRow]:
        cursor = self._sqlite.cursor()
        cursor.row_factory = sqlite3.Row
        rows: list[NamedRow] = cursor.execute(sql, params).fetchall()
        return rows

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            self._sqlite.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"the database is unavailable: {exc}",
                             "another process may hold it locked; try again") from None
        try:
            yield self._sqlite
            self._sqlite.execute("COMMIT")
        except BaseException as exc:
            self._forget_uncommitted()
            # SQLite may already have rolled back by itself (after SQLITE_FULL, for one).
            if self._sqlite.in_transaction:
                self._sqlite.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                    raise DiskFull("the escrow's data directory is full: the change was not "
                                   "made", "free space on its file system; see "
                                   "docs/runbooks/escrow-down.md, Disk full") from None
                raise StoreError(f"the database refused the change: {exc}",
                                 "check free space and permissions of the data directory"
                                 ) from None
            raise
        self._journal_committed()

    def _stream(self, sql: str, params: Sequence[object]) -> Iterator[tuple[Any, ...]]:
        cursor = self._sqlite.execute(sql, params)
        try:
            while batch := cursor.fetchmany(AUDIT_BATCH):
                yield from batch
        finally:
            cursor.close()

    @contextmanager
    def audit_snapshot(self) -> Iterator[None]:
        """Reads inside see one state of the database: the checkpoints and the records agree
        even if an archive commits meanwhile (WAL: nobody else waits for this reader)."""
        if self._sqlite.in_transaction:
            yield
            return
        self._sqlite.execute("BEGIN")
        try:
            self._sqlite.execute("SELECT COUNT(*) FROM audit_checkpoints").fetchone()  # snapshot
            yield
        finally:
            if self._sqlite.in_transaction:
                self._sqlite.execute("COMMIT")

    def compact(self) -> None:
        """Give the space of deleted rows back to the file system (VACUUM). Holds the write
        lock while it copies the whole database: only while no escrow serves."""
        try:
            self._sqlite.execute("VACUUM")
            self._sqlite.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise StoreError(f"compacting the database failed: {exc}",
                             "VACUUM needs free space about the size of the database; the "
                             "archive itself is complete") from None


