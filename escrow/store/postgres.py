"""PostgreSQL backend: the same queries as SQLite (escrow.store.sql) through psycopg 3 and its
connection pool, so several escrow replicas can share one database.

One writer at a time, as with SQLite's ``BEGIN IMMEDIATE``: every write transaction first takes
a transaction-scoped advisory lock. So the audit log stays one chain however many replicas
append to it, and a deposit numbers its version and inserts its shares under one lock. Reads
run on their own, each statement in its own snapshot, except inside ``audit_snapshot``, which
holds one REPEATABLE READ transaction for all of its reads. Marking a nonce used takes no lock:
its one INSERT decides. A custodian's decision is announced (NOTIFY) as it commits, and
``listen`` hears every replica's.

A connection that broke (the server restarted, a failover) is replaced by the pool on next use;
the request that met the break gets a StoreError (503), never a half-made change.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from escrow.audit import AuditEvent, AuditRecord
from escrow.core.errors import DiskFull, StoreError
from escrow.store import StoreKind
from escrow.store.sql import AUDIT_BATCH, Clock, Cursor, Db, NamedRow, SqlStore

# pg_advisory_xact_lock key every write transaction takes: b"escr" as an integer.
WRITE_LOCK = 0x65736372
# The channel a decision is announced on (NOTIFY), so that every replica's long polls of the
# request look again at once, whichever replica the custodian reached.
DECIDED = "escrow_decided"
CONNECT_TIMEOUT = 10.0
# Every connection's application_name: this prefix, then the host's name.
APPLICATION = "escrow@"
LISTEN_TICK = 1.0  # seconds between looks at whether the store is closing

_APPEND_ONLY = """
CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION '{message}'; END $$"""

# Forward migrations, as for SQLite (escrow.store.sqlite): entry i moves the schema from
# version i to i + 1. The first is SQLite's six in one, written out again rather than shared:
# a released migration never changes, and the dialects differ (BYTEA, BIGINT, plpgsql). Column
# order matches SQLite's, since some inserts name no columns.
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
        " slot INTEGER NOT NULL, holder TEXT NOT NULL, wrapped BYTEA NOT NULL,"
        " PRIMARY KEY (cluster_id, version, slot),"
        " FOREIGN KEY (cluster_id, version) REFERENCES key_versions(cluster_id, version)"
        " ON DELETE CASCADE)",
        # seq is given by the writer (escrow.store.sql), under the write lock: no sequence,
        # so a rolled-back append leaves no gap.
        "CREATE TABLE audit (seq BIGINT PRIMARY KEY, ts TEXT NOT NULL,"
        " event TEXT NOT NULL, actor TEXT NOT NULL, cluster_id TEXT NOT NULL,"
        " details TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)",
        "CREATE INDEX audit_by_actor ON audit (event, actor, ts)",
        "CREATE TABLE audit_checkpoints (seq BIGINT PRIMARY KEY, hash TEXT NOT NULL,"
        " first_seq BIGINT NOT NULL, records BIGINT NOT NULL, archive_name TEXT NOT NULL,"
        " archive_sha256 TEXT NOT NULL, created_at TEXT NOT NULL)",
        # Append-only against mistakes and casual edits, as in SQLite; the hash chain catches
        # anyone who drops the triggers.
        _APPEND_ONLY.format(name="audit_append_only", message="the audit log is append-only"),
        "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit"
        " FOR EACH ROW EXECUTE FUNCTION audit_append_only()",
        "CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit"
        " FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()",
        """CREATE FUNCTION audit_delete_archived() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NOT EXISTS (SELECT 1 FROM audit_checkpoints WHERE seq >= OLD.seq) THEN
            RAISE EXCEPTION 'the audit log is append-only: only records an archive checkpoint'
              ' covers can be deleted (escrow audit archive)';
          END IF;
          RETURN OLD;
        END $$""",
        "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit"
        " FOR EACH ROW EXECUTE FUNCTION audit_delete_archived()",
        """CREATE FUNCTION audit_checkpoint_names_a_record() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
          IF NOT EXISTS (SELECT 1 FROM audit WHERE seq = NEW.seq AND hash = NEW.hash)
             OR NEW.seq <= (SELECT COALESCE(MAX(seq), 0) FROM audit_checkpoints) THEN
            RAISE EXCEPTION 'an audit checkpoint names a record in the log, newer than the'
              ' last checkpoint';
          END IF;
          RETURN NEW;
        END $$""",
        "CREATE TRIGGER audit_checkpoints_name_a_record BEFORE INSERT ON audit_checkpoints"
        " FOR EACH ROW EXECUTE FUNCTION audit_checkpoint_names_a_record()",
        _APPEND_ONLY.format(name="audit_checkpoints_append_only",
                            message="audit checkpoints are append-only"),
        "CREATE TRIGGER audit_checkpoints_no_change BEFORE UPDATE OR DELETE ON audit_checkpoints"
        " FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_append_only()",
        "CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints"
        " FOR EACH STATEMENT EXECUTE FUNCTION audit_checkpoints_append_only()",
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value BYTEA NOT NULL)",
        "CREATE TABLE nodes (cluster_id TEXT NOT NULL REFERENCES clusters(cluster_id),"
        " node_id TEXT NOT NULL, agent_public_key_pem TEXT NOT NULL, hostname TEXT NOT NULL,"
        " enrolled_at TEXT NOT NULL, status TEXT NOT NULL, PRIMARY KEY (cluster_id, node_id))",
        "CREATE TABLE requests (request_id TEXT PRIMARY KEY, cluster_id TEXT NOT NULL,"
        " node_id TEXT NOT NULL, hostname TEXT NOT NULL, boot_id TEXT NOT NULL,"
        " source TEXT NOT NULL, cert_pem TEXT NOT NULL, ephemeral_key BYTEA NOT NULL,"
        " kek_version TEXT NOT NULL, created_at TEXT NOT NULL, expires_at TEXT NOT NULL,"
        " state TEXT NOT NULL, reason TEXT NOT NULL, held_until TEXT NOT NULL DEFAULT '')",
        "CREATE INDEX requests_by_node ON requests (cluster_id, node_id, created_at)",
        "CREATE INDEX requests_by_state ON requests (state)",
        "CREATE TABLE approvals (request_id TEXT NOT NULL REFERENCES requests(request_id),"
        " custodian TEXT NOT NULL, decision TEXT NOT NULL, signature TEXT NOT NULL,"
        " reason TEXT NOT NULL, created_at TEXT NOT NULL, PRIMARY KEY (request_id, custodian))",
        "CREATE TABLE releases (request_id TEXT NOT NULL REFERENCES requests(request_id),"
        " version INTEGER NOT NULL, slot INTEGER NOT NULL, holder TEXT NOT NULL,"
        " released_at TEXT NOT NULL, PRIMARY KEY (request_id, version, slot))",
        "CREATE TABLE results (request_id TEXT NOT NULL REFERENCES requests(request_id),"
        " version INTEGER NOT NULL, outcome TEXT NOT NULL, reported_at TEXT NOT NULL,"
        " PRIMARY KEY (request_id, version))",
        "CREATE TABLE heartbeats (cluster_id TEXT NOT NULL, node_id TEXT NOT NULL,"
        " boot_id TEXT NOT NULL, first_at TEXT NOT NULL, last_at TEXT NOT NULL,"
        " lock_state TEXT NOT NULL, kek_version TEXT NOT NULL, agent_version TEXT NOT NULL,"
        " uptime_seconds BIGINT NOT NULL, interval_seconds BIGINT NOT NULL,"
        " goodbye INTEGER NOT NULL, source TEXT NOT NULL,"
        " PRIMARY KEY (cluster_id, node_id, boot_id),"
        " FOREIGN KEY (cluster_id, node_id) REFERENCES nodes(cluster_id, node_id))",
        "CREATE INDEX heartbeats_by_time ON heartbeats (cluster_id, node_id, last_at)",
    ),
    (
        "CREATE TABLE used_once (key BYTEA PRIMARY KEY, expires_at BIGINT NOT NULL)",
        "CREATE INDEX used_once_by_expiry ON used_once (expires_at)",
    ),
    (
        "CREATE TABLE viewers (name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE,"
        " created_at TEXT NOT NULL)",
    ),
    (
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


def _pg(sql: str) -> str:
    """The shared SQL's ``?`` placeholders in psycopg's spelling (its ``%`` escaped). The
    statements are the code's own constants; no value is ever spliced into them."""
    return sql.replace("%", "%%").replace("?", "%s")


@dataclass(frozen=True)
class _Rows:
    """A result read in full, so its connection went back to the pool at once."""

    rows: list[Any]
    rowcount: int

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[Any]:
        return self.rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


class _Transaction:
    """The Db of one write transaction, on the connection that holds the write lock."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        return self._connection.execute(_pg(sql), parameters or None)

    def executemany(self, sql: str, parameters: Iterator[Sequence[Any]] | list[Any], /
                    ) -> Cursor:
        cursor = self._connection.cursor()
        cursor.executemany(_pg(sql), list(parameters))
        return cursor


class _Reads:
    """The Db outside write transactions: each statement on a pooled connection, or on the
    one ``audit_snapshot`` holds."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        with self._store._connection() as connection:
            cursor = connection.execute(_pg(sql), parameters or None)
            return _Rows(cursor.fetchall() if cursor.description else [], cursor.rowcount)

    def executemany(self, sql: str, parameters: Iterator[Sequence[Any]] | list[Any], /
                    ) -> Cursor:
        raise StoreError("a change outside a write transaction", "this is a bug")


def _unavailable(exc: BaseException) -> StoreError:
    return StoreError(f"the database is unavailable: {str(exc).strip() or type(exc).__name__}",
                      "check that PostgreSQL is running and reachable (store.url); the escrow "
                      "reconnects by itself")


def _refused(exc: psycopg.Error) -> StoreError:
    if isinstance(exc, pg_errors.DiskFull):
        return DiskFull("the database's disk is full: the change was not made",
                        "free space on the PostgreSQL server; see "
                        "docs/runbooks/escrow-down.md, Disk full")
    if isinstance(exc, psycopg.OperationalError):
        return _unavailable(exc)
    return StoreError(f"the database refused the change: {str(exc).strip()}",
                      "check the database's state with `escrow audit verify`")


class PostgresStore(SqlStore):
    kind: StoreKind = "postgresql"

    def __init__(self, pool: ConnectionPool[psycopg.Connection[Any]], now: Clock, url: str,
                 connect_args: dict[str, Any]) -> None:
        self._pool = pool
        self._url = url  # and connect_args: how the listener connects beside the pool
        self._connect_args = connect_args
        self._pinned: psycopg.Connection[Any] | None = None  # inside audit_snapshot
        self._closed = threading.Event()
        self._listener: threading.Thread | None = None
        super().__init__(_Reads(self), now)

    @classmethod
    def open(cls, url: str, password: str | None, now: Clock) -> PostgresStore:
        """Connect to ``url`` (a libpq URL or conninfo: several hosts and
        ``target_session_attrs=read-write`` find a promoted standby) and bring the schema up
        to date. The password is passed apart from the URL, so it is never logged with it."""
        # Named by host, so the status can list the replicas connected (replicas()).
        extra: dict[str, Any] = {"autocommit": True, "connect_timeout": int(CONNECT_TIMEOUT),
                                 "application_name": f"{APPLICATION}{socket.gethostname()}"[:63]}
        if password is not None:
            extra["password"] = password
        try:
            # Once by hand, for libpq's own words on what is wrong (the pool would only time
            # out); the pool then keeps and replaces its connections.
            psycopg.connect(url, **extra).close()
            pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
                url, kwargs=extra, min_size=1, max_size=4, timeout=CONNECT_TIMEOUT,
                check=ConnectionPool.check_connection, name="escrow-store", open=True)
        except psycopg.Error as exc:
            raise StoreError("cannot connect to the PostgreSQL store "
                             f"({_describe(url)}): {str(exc).strip()}",
                             "check store.url, the password (store.password_file or the "
                             "credential store-password) and that the server accepts this "
                             "host") from None
        store = cls(pool, now, url, extra)
        try:
            store._migrate()
        except BaseException:
            pool.close()
            raise
        return store

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"the PostgreSQL store has schema version {current}; this escrow knows up "
                    f"to {SCHEMA_VERSION}",
                    "upgrade the escrow package; never run an older escrow on a newer database")
            for version in range(current, SCHEMA_VERSION):
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif current < SCHEMA_VERSION:
                db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.join()
        self._pool.close()

    def check_writable(self) -> StoreKind:
        """A standby (in recovery) or a read-only default takes no writes: this replica is
        then unhealthy, and clients go to another."""
        row = self._db.execute("SELECT pg_is_in_recovery(),"
                               " current_setting('default_transaction_read_only')").fetchone()
        if row[0] or row[1] == "on":
            raise StoreError(f"the PostgreSQL store ({_describe(self._url)}) is read-only: a "
                             "standby, or default_transaction_read_only is on",
                             "point store.url at the primary (several hosts with "
                             "target_session_attrs=read-write find it by themselves)")
        return "postgresql"

    def replicas(self) -> list[str]:
        """The hosts with an escrow connected to this database now."""
        rows = self._db.execute(
            "SELECT DISTINCT substr(application_name, ?) FROM pg_stat_activity"
            " WHERE datname = current_database() AND starts_with(application_name, ?)"
            " ORDER BY 1", (len(APPLICATION) + 1, APPLICATION))
        return [str(row[0]) for row in rows]

    def listen(self, on_decided: Callable[[str | None], None]) -> None:
        """LISTEN on a connection of its own, in a thread of its own, until closed."""
        self._listener = threading.Thread(target=self._listen, args=(on_decided,),
                                          name="escrow-store-listen", daemon=True)
        self._listener.start()

    def _listen(self, on_decided: Callable[[str | None], None]) -> None:
        while not self._closed.is_set():
            try:
                with psycopg.connect(self._url, **self._connect_args) as connection:
                    connection.execute(f"LISTEN {DECIDED}")
                    # Whatever was announced while this was not listening is lost: the
                    # polls of every request look again.
                    on_decided(None)
                    while not self._closed.is_set():
                        for notice in connection.notifies(timeout=LISTEN_TICK):
                            on_decided(notice.payload)
            except psycopg.Error:
                # The server restarted or failed over: polls still end by their own wait
                # until this is back.
                self._closed.wait(LISTEN_TICK)

    def _announce(self, db: Db, request_id: str) -> None:
        db.execute("SELECT pg_notify(?, ?)", (DECIDED, request_id))

    @contextmanager
    def _unaudited(self) -> Iterator[_Transaction]:
        with self._connection() as connection, connection.transaction():
            yield _Transaction(connection)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        if self._pinned is not None:
            yield self._pinned
            return
        try:
            with self._pool.connection() as connection:
                yield connection
        except PoolTimeout as exc:
            raise _unavailable(exc) from None
        except psycopg.Error as exc:
            raise _refused(exc) from None

    def _named(self, sql: str, params: Sequence[object] = ()) -> list[NamedRow]:
        with self._connection() as connection, connection.cursor(row_factory=dict_row) as cur:
            return list(cur.execute(_pg(sql), params or None).fetchall())

    def _stream(self, sql: str, params: Sequence[object]) -> Iterator[tuple[Any, ...]]:
        # A server-side cursor: the server keeps the result, this side holds one batch.
        with self._connection() as connection:
            transaction = (contextlib.nullcontext() if self._pinned is not None
                           else connection.transaction())
            with transaction, connection.cursor(name="escrow_stream") as cursor:
                cursor.itersize = AUDIT_BATCH
                cursor.execute(_pg(sql), params or None)
                yield from cursor

    @contextmanager
    def _write(self) -> Iterator[_Transaction]:
        try:
            with self._connection() as connection, connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                yield _Transaction(connection)
        except BaseException as exc:
            self._forget_uncommitted()
            if isinstance(exc, psycopg.Error):
                raise _refused(exc) from None
            raise
        self._journal_committed()

    def load(self, fill: Callable[[psycopg.Connection[Any]], AuditEvent]) -> AuditRecord:
        """Fill this store with a whole escrow in one write transaction (escrow.store.copy):
        ``fill`` writes on the transaction's connection (COPY, say), may read back through
        this store's own methods, which see its uncommitted rows meanwhile, and returns the
        event that records what it did. That event is chained after everything ``fill`` wrote,
        and all of it commits, or none of it."""
        with self._write() as db:
            self._pinned = db._connection
            try:
                event = fill(db._connection)
            finally:
                self._pinned = None
            return self._append(db, event)

    @contextmanager
    def audit_snapshot(self) -> Iterator[None]:
        """Reads inside see one state of the database, on one connection."""
        if self._pinned is not None:
            yield
            return
        with self._connection() as connection, connection.transaction():
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            self._pinned = connection
            try:
                yield
            finally:
                self._pinned = None

    def compact(self) -> None:
        """PostgreSQL reclaims deleted rows itself (autovacuum); a VACUUM now helps at once."""
        try:
            with self._pool.connection() as connection:
                connection.execute("VACUUM audit")
        except (PoolTimeout, psycopg.Error) as exc:
            raise StoreError(f"VACUUM failed: {exc}",
                             "autovacuum will reclaim the space; the archive itself is complete"
                             ) from None


def _describe(url: str) -> str:
    """The URL without any password it may carry, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unreadable store.url"
    info.pop("password", None)
    return " ".join(f"{key}={value}" for key, value in sorted(info.items()))

