"""Moving an SQLite escrow to PostgreSQL (`escrow store copy`): every durable table of the data
directory's escrow.db, row for row, into an empty PostgreSQL store, in one transaction. It
commits only once every table read back matches what was read, and the copied audit chain
verifies as `escrow audit verify` checks it (from its last archive checkpoint); a
``store.copied`` record, chained after the copied ones, says where the escrow came from.

Shares and the escrow's own secrets (in ``meta``) are copied as the bytes they are: still
wrapped by the same token, never unwrapped here. The source is held still and never written:
the data directory's lock keeps `escrow serve` away, SQLite's write lock every other command.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from escrow import audit
from escrow.audit import AuditEvent, AuditRecord
from escrow.config import Settings
from escrow.core.errors import AuditChainBroken, ConfigError, Conflict, StoreError
from escrow.lock import DataDirLock
from escrow.store import opening
from escrow.store.postgres import PostgresStore
from escrow.store.sql import AUDIT_BATCH, Clock
from escrow.store.sqlite import SqliteStore

# Every table an escrow keeps, parents before the rows that refer to them. The marks of used
# nonces and signed requests (used_once) go too, though they lapse within minutes: the nonce
# key goes with meta, so without them a request used just before the copy could be replayed
# at the escrow started on PostgreSQL.
DURABLE: tuple[str, ...] = (
    "custodians", "clusters", "key_versions", "shares", "meta", "nodes", "requests",
    "approvals", "releases", "results", "heartbeats", "audit", "audit_checkpoints", "used_once",
    "viewers", "windows", "window_signatures", "share_drills",
)
# PostgreSQL's rule that a new checkpoint names a record still in the log (escrow.store.postgres).
_CHECKPOINT_RULE = "audit_checkpoints_name_a_record"
EVENT = "store.copied"


@dataclass(frozen=True)
class Copied:
    source: Path
    destination: str  # the URL, which carries no password
    rows: dict[str, int]  # by table, in DURABLE's order
    audit_head: str  # the copied chain's, before the store.copied record
    record: AuditRecord  # the store.copied record


class _Tally:
    """The rows of a table as a count and an order-free digest (a sum of row hashes), so the
    copy is compared with its source without either side sorting or holding the rows."""

    def __init__(self) -> None:
        self.rows = 0
        self._digest = 0

    def add(self, row: Sequence[object]) -> None:
        # repr: int, str and bytes each spell out value and type, so a BLOB read back as
        # text (or a number as a string) counts as different.
        digest = hashlib.sha256(repr(tuple(row)).encode()).digest()
        self._digest = (self._digest + int.from_bytes(digest, "big")) % (1 << 256)
        self.rows += 1

    def summary(self) -> tuple[int, int]:
        return self.rows, self._digest


def copy_to_postgresql(settings: Settings, url: str, password_file: Path | None, actor: str,
                       now: Clock) -> Copied:
    """Copy the SQLite escrow of ``settings`` into the empty PostgreSQL store at ``url``, all
    or nothing; the escrow must be stopped (its data directory's lock is taken)."""
    opening.refuse_password_in(url, "--to", "a file named by --to-password-file (0600), or "
                                            "libpq's ~/.pgpass")
    if settings.store.url:
        raise ConfigError(
            f"the escrow in {settings.data_dir} keeps its data in PostgreSQL already "
            "(store.url)", "`escrow store copy` moves an SQLite escrow; a PostgreSQL one "
            "moves with pg_dump and pg_restore (README, \"Backing up and restoring a "
            "PostgreSQL escrow\")")
    with DataDirLock(settings.data_dir, "escrow store copy"):
        SqliteStore.open(settings.db_path, now).close()  # an escrow's, at the current schema
        destination = opening.open_url(url, password_file, now)
        try:
            if not isinstance(destination, PostgresStore):
                raise StoreError(f"{url} did not open a PostgreSQL store", "this is a bug")
            with _held_still(settings.db_path) as source:
                filling = _Filling(source, destination, settings.db_path, url, actor)
                record = destination.load(filling)
        finally:
            destination.close()
    return Copied(settings.db_path, url, filling.rows, filling.head, record)


@contextmanager
def _held_still(path: Path) -> Iterator[sqlite3.Connection]:
    """The SQLite database under its write lock, so that no command changes it while it is
    read; nothing is written (the transaction is rolled back)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        finally:
            db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path} for the copy: {exc}; nothing was copied",
                         "another command may hold it: run the copy again once it is done"
                         ) from None
    finally:
        db.close()


class _Filling:
    """What runs inside the destination's one write transaction (PostgresStore.load)."""

    def __init__(self, source: sqlite3.Connection, destination: PostgresStore, path: Path,
                 url: str, actor: str) -> None:
        self._source = source
        self._destination = destination
        self._path = path
        self._url = url
        self._actor = actor
        self._table = ""  # the one being written or checked, for messages
        self.rows: dict[str, int] = {}
        self.head = audit.GENESIS

    def __call__(self, connection: psycopg.Connection[Any]) -> AuditEvent:
        try:
            return self._fill(connection)
        except psycopg.Error as exc:
            # Only the server's primary message: its full text quotes the refused row.
            where = f" of {self._table}" if self._table else ""
            raise StoreError(f"PostgreSQL refused the copy{where}: "
                             f"{exc.diag.message_primary or type(exc).__name__}; nothing was "
                             "copied", "fix what PostgreSQL names and run the copy again: the "
                             "database holds the escrow's empty tables at most") from None

    def _fill(self, connection: psycopg.Connection[Any]) -> AuditEvent:
        self._refuse_a_used_store(connection)
        self._refuse_unknown_tables()
        columns = {table: self._columns(connection, table) for table in DURABLE}
        sent: dict[str, _Tally] = {}
        for table in DURABLE:
            self._table = table
            with self._loadable(connection, table):
                sent[table] = self._send(connection, table, columns[table])
        for table in DURABLE:
            self._table = table
            if _received(connection, table, columns[table]).summary() != sent[table].summary():
                raise StoreError(f"the copy of {table} differs from {self._path.name} after "
                                 "it was written; nothing was copied",
                                 "this is a bug (a type the two schemas store differently): "
                                 "report it with the table's name")
        self._table = ""
        chain = audit.verify_log(self._destination.audit_checkpoints(),
                                 self._destination.iter_audit())
        if chain.problems:
            raise AuditChainBroken(
                f"refusing the copy: its audit log has {len(chain.problems)} problem(s), "
                f"first {chain.problems[0].message}; nothing was copied",
                f"run `escrow audit verify` on this escrow (still {self._path.name}) and "
                "treat it as tampered with until that is explained")
        self.rows = {table: tally.rows for table, tally in sent.items()}
        self.head = chain.head
        return AuditEvent(EVENT, self._actor, "", {
            "source": str(self._path), "destination": self._url, "rows": self.rows,
            "audit_head": chain.head})

    def _refuse_a_used_store(self, connection: psycopg.Connection[Any]) -> None:
        # Under the store's write lock, so no escrow writes its first row meanwhile.
        used = [table for table in DURABLE if _first(connection.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table))))]
        if used:
            raise Conflict(f"the PostgreSQL store at --to already holds an escrow's data "
                           f"(rows in {', '.join(used)}); nothing was copied",
                           "if it is this escrow's earlier copy, point store.url at it; "
                           "otherwise copy into a new, empty database (CREATE DATABASE ... "
                           "OWNER the escrow's role)")

    def _refuse_unknown_tables(self) -> None:
        """A table added to the schema and not to DURABLE would be left behind unnoticed."""
        tables = {name for (name,) in self._source.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")}
        unknown = sorted(tables - set(DURABLE))
        if unknown:
            raise StoreError(f"{self._path.name} has tables the copy does not know: "
                             f"{', '.join(unknown)}; nothing was copied",
                             "this is a bug: escrow.store.copy must learn them (DURABLE)")

    def _columns(self, connection: psycopg.Connection[Any], table: str) -> list[str]:
        """The table's columns, in order, which must be the same in both stores."""
        ours = [name for (name,) in self._source.execute(
            "SELECT name FROM pragma_table_info(?) ORDER BY cid", (table,))]
        theirs = [str(name) for (name,) in connection.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema ="
            " current_schema() AND table_name = %s ORDER BY ordinal_position", (table,))]
        if ours != theirs:
            raise StoreError(f"the table {table} has the columns ({', '.join(ours)}) in "
                             f"{self._path.name} and ({', '.join(theirs)}) in PostgreSQL; "
                             "nothing was copied",
                             "this is a bug: the two stores' schemas must match (same escrow "
                             "version on both)")
        return ours

    @contextmanager
    def _loadable(self, connection: psycopg.Connection[Any], table: str) -> Iterator[None]:
        """Copied checkpoints name records archived long ago, in archive files and no longer
        in the log, which PostgreSQL's rule for a new checkpoint refuses: the rule is off for
        that one COPY, inside the transaction (no one else sees it off; were the copy to fail,
        the rollback would restore it), and on again before the commit."""
        if table != "audit_checkpoints" or not _first(self._source.execute(
                "SELECT EXISTS (SELECT 1 FROM audit_checkpoints)")):
            yield
            return
        rule = sql.Identifier(_CHECKPOINT_RULE)
        connection.execute(sql.SQL("ALTER TABLE audit_checkpoints DISABLE TRIGGER {}")
                           .format(rule))
        yield
        connection.execute(sql.SQL("ALTER TABLE audit_checkpoints ENABLE TRIGGER {}")
                           .format(rule))

    def _send(self, connection: psycopg.Connection[Any], table: str,
              columns: list[str]) -> _Tally:
        tally = _Tally()
        # Names from the escrow's own schema, checked equal on both sides above.
        rows: Iterable[Sequence[object]] = self._source.execute(
            f"SELECT {', '.join(columns)} FROM {table}")  # noqa: S608
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)))
        with connection.cursor().copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
                tally.add(row)
        return tally


def _received(connection: psycopg.Connection[Any], table: str, columns: list[str]) -> _Tally:
    """The table as the destination's transaction holds it, read in batches."""
    tally = _Tally()
    with connection.cursor(name="escrow_copy_check") as cursor:
        cursor.itersize = AUDIT_BATCH
        cursor.execute(sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(table)))
        for row in cursor:
            tally.add(row)
    return tally


def _first(cursor: Iterable[Sequence[object]]) -> object:
    return next(iter(cursor))[0]
