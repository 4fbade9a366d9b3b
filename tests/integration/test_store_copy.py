"""`escrow store copy`: a real SQLite escrow, made by `escrow init` and used through `escrow
serve`, copied into a database of the test's own on the session's PostgreSQL server, as a role
that is no superuser; the copy serves the same unlock key, and a copy that cannot be whole
leaves no row behind."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from escrow import config
from escrow.core.states import LockState
from escrow.store import HeartbeatRecord
from escrow.store.copy import DURABLE, EVENT
from escrow.store.postgres import PostgresStore
from escrow.store.sqlite import SqliteStore
from lab import api
from lab import postgres as lab_postgres
from lab.commands import readme_scripts, run_escrow, run_script
from lab.server import BOOT_ID, EscrowProcess, make_escrow
from tests.conftest import fails, ok
from tests.integration.test_audit_archive import days_ago, seed, spread

pytestmark = pytest.mark.slow

Rows = dict[str, list[tuple[object, ...]]]


@dataclass(frozen=True)
class Destination:
    """An empty database owned by a role of its own, and the superuser's view of it."""

    server: lab_postgres.Server
    role: lab_postgres.Role
    name: str

    @property
    def url(self) -> str:
        return self.server.url(self.name, self.role.name)

    def execute(self, statement: str) -> None:
        with self.server.connect(self.name) as db:
            db.execute(statement)

    def rows(self) -> Rows:
        """Every row of every durable table that exists, sorted."""
        with self.server.connect(self.name) as db:
            present = {name for (name,) in db.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public'")}
            return {table: sorted(db.execute(sql.SQL("SELECT * FROM {}").format(
                sql.Identifier(table))).fetchall(), key=repr)
                for table in DURABLE if table in present}

    def tables(self) -> list[str]:
        with self.server.connect(self.name) as db:
            return [str(name) for (name,) in db.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = 'public'")]


@pytest.fixture
def destination(postgres: lab_postgres.Server, tmp_path: Path) -> Iterator[Destination]:
    (tmp_path / "role").mkdir()
    with lab_postgres.role(postgres, tmp_path / "role") as role, \
            postgres.database(owner=role.name) as name:
        yield Destination(postgres, role, name)


def sqlite_rows(data_dir: Path) -> Rows:
    with contextlib.closing(sqlite3.connect(data_dir / config.DB_NAME)) as db:
        # The tables' names are the copy's own constants.
        return {table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(),  # noqa: S608
                              key=repr)
                for table in DURABLE}


def copy(escrow: EscrowProcess, to: Destination, *extra: str
         ) -> subprocess.CompletedProcess[str]:
    """`escrow store copy` into ``to``, whose password must never show."""
    result = escrow.cli("store", "copy", "--to", to.url, "--to-password-file",
                        str(to.role.password_file), *extra)
    assert to.role.password not in result.stdout + result.stderr
    return result


def nothing_copied(to: Destination) -> None:
    assert {table: rows for table, rows in to.rows().items() if rows} == {}


def test_an_sqlite_escrow_copied_to_postgresql_unseals_there_with_the_same_key(
        destination: Destination, tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path / "escrow")
    for name in ("alice", "bob"):
        escrow.custodian(name)
    escrow.start()
    try:
        _, node, key = api.enrolled(escrow)
        assert api.run(api.unseal(escrow, node)) == [(1, key)]
    finally:
        escrow.stop()
    store = SqliteStore.open(escrow.data_dir / config.DB_NAME, lambda: "2026-12-02T00:00:00Z")
    try:
        store.record_heartbeat(HeartbeatRecord(
            node.cluster_id, node.node_id, BOOT_ID, "2026-12-02T00:00:00Z",
            "2026-12-02T00:00:30Z", LockState.UNLOCKED, "kek-1", "0.1.0", 30, 30, False,
            "127.0.0.1"), None)
    finally:
        store.close()
    source = sqlite_rows(escrow.data_dir)
    assert all(source[table] for table in ("custodians", "clusters", "key_versions", "shares",
                                            "meta", "nodes", "requests", "releases",
                                            "heartbeats", "audit"))

    # README's command, against this test's database and data directory.
    [command] = readme_scripts("Moving an SQLite escrow to PostgreSQL", 4, {
        "/var/lib/escrow": str(escrow.data_dir),
        "postgresql://escrow@db.example/escrow": destination.url,
        "/etc/escrow/store-password": str(destination.role.password_file)})
    said = run_script(command, tmp_path)
    assert said.returncode == 0, said.stderr
    assert destination.role.password not in said.stdout + said.stderr
    assert "audit chain verified in PostgreSQL before the commit" in said.stdout
    assert "start the escrow" in said.stdout

    copied = destination.rows()
    assert sqlite_rows(escrow.data_dir) == source  # the source is not written
    *carried, record = sorted(copied["audit"])
    # Every row, shares byte for byte.
    assert {**copied, "audit": sorted(carried, key=repr)} == source
    assert record[2] == EVENT
    assert destination.role.password not in str(record)
    settings = config.load(escrow.data_dir)
    assert settings.store.url == destination.url
    assert settings.store.password_file == destination.role.password_file

    escrow.start()
    try:
        assert api.run(api.unseal(escrow, node)) == [(1, key)]
        listed = ok(escrow.cli("custodian", "list", "--json"))
    finally:
        escrow.stop()
    assert "alice" in listed
    assert "bob" in listed
    assert "audit log intact" in ok(escrow.cli("audit", "verify"))
    events = [event for event, _ in escrow.audit()]
    assert events[len(source["audit"])] == EVENT
    assert "unseal.release" in events[len(source["audit"]) + 1:]
    assert destination.role.password not in escrow.log()


def test_a_copy_into_a_store_that_holds_an_escrow_is_refused_and_writes_nothing(
        destination: Destination, tmp_path: Path) -> None:
    make_escrow(tmp_path / "other", "--store-url", destination.url, "--store-password-file",
                str(destination.role.password_file))
    held = destination.rows()
    assert held["audit"]
    escrow = make_escrow(tmp_path / "escrow")
    fails(copy(escrow, destination, "--switch"), 1, "already holds an escrow's data",
          "nothing was copied")
    assert destination.rows() == held
    assert config.load(escrow.data_dir).store.url == ""

    password = destination.role.password
    in_url = destination.url.replace(f"{destination.role.name}@",
                                     f"{destination.role.name}:{password}@")
    refused = escrow.cli("store", "copy", "--to", in_url)
    fails(refused, 1, "--to carries a password", "--to-password-file")
    assert password not in refused.stdout + refused.stderr
    assert destination.rows() == held


def test_a_row_postgresql_refuses_midway_leaves_no_row_and_the_copy_can_be_run_again(
        destination: Destination, tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path / "escrow")
    escrow.custodian("alice")
    escrow.cluster(1, "auto,alice")
    # The escrow's tables, made as its role makes them; then one audit row refused.
    PostgresStore.open(destination.url, destination.role.password, lambda: "t").close()
    destination.execute("CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$"
                        " BEGIN RAISE EXCEPTION 'refused by the test'; END $$")
    destination.execute("CREATE TRIGGER refuse_one BEFORE INSERT ON audit FOR EACH ROW"
                        " WHEN (NEW.seq = 3) EXECUTE FUNCTION refuse_one()")
    said = fails(copy(escrow, destination, "--switch"), 1,
                 "PostgreSQL refused the copy of audit: refused by the test", "nothing was copied")
    assert "CONTEXT" not in said  # PostgreSQL's, which quotes the refused row
    nothing_copied(destination)
    assert config.load(escrow.data_dir).store.url == ""

    destination.execute("DROP TRIGGER refuse_one ON audit")
    ok(copy(escrow, destination))
    assert len(destination.rows()["audit"]) == len(sqlite_rows(escrow.data_dir)["audit"]) + 1


def test_a_tampered_source_chain_is_refused_before_the_commit(destination: Destination,
                                                             tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path / "escrow")
    escrow.custodian("alice")
    with contextlib.closing(sqlite3.connect(escrow.data_dir / config.DB_NAME)) as db:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("""UPDATE audit SET details = '{"forged":true}' WHERE seq = 2""")
        db.commit()
    fails(copy(escrow, destination), 1, "refusing the copy: its audit log has 1 problem(s)",
          "record 2", "was edited", "nothing was copied")
    nothing_copied(destination)


def test_the_copy_refuses_to_run_beside_a_serving_escrow(destination: Destination,
                                                        tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path / "escrow")
    escrow.start()
    try:
        fails(copy(escrow, destination, "--switch"), 1, "in use by escrow serve",
              "stop the escrow first")
    finally:
        escrow.stop()
    assert destination.tables() == []  # not even connected to
    assert config.load(escrow.data_dir).store.url == ""


def test_an_archived_log_is_copied_with_its_checkpoint_and_still_verifies_with_its_archive(
        destination: Destination, tmp_path: Path) -> None:
    data = tmp_path / "data"
    ok(run_escrow("init", "--data-dir", str(data), env=days_ago(40)))
    seed(data / config.DB_NAME, spread(39, 8, 200))
    seed(data / config.DB_NAME, spread(3, 0, 20))
    archive = tmp_path / "audit-1.jsonl"
    ok(run_escrow("audit", "archive", "--keep-days", "7", "--out", str(archive),
                  data_dir=data))
    source = sqlite_rows(data)
    assert source["audit_checkpoints"]
    said = run_escrow("store", "copy", "--to", destination.url, "--to-password-file",
                      str(destination.role.password_file), "--switch", data_dir=data)
    ok(said)
    assert destination.rows()["audit_checkpoints"] == source["audit_checkpoints"]
    assert "starting from archive checkpoint" in ok(run_escrow("audit", "verify",
                                                               data_dir=data))
    assert "across 1 archive(s) and the database" in ok(run_escrow(
        "audit", "verify", "--archive", str(archive), data_dir=data))
    # The rule the copy lifted for its own transaction holds again.
    with pytest.raises(psycopg.errors.RaiseException, match="names a record in the log"), \
            psycopg.connect(destination.url, password=destination.role.password,
                            autocommit=True) as db:
        db.execute("INSERT INTO audit_checkpoints VALUES (100000, 'forged', 1, 1, 'x', 'y',"
                   " 'z')")
