"""A PostgreSQL escrow backed up and restored with exactly README's commands (pg_dump, `escrow
backup`; a new database, pg_restore, `escrow restore`, `escrow audit verify`), read from README
and run by a shell against the session's PostgreSQL server, as a role that is no superuser."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from lab import api
from lab import postgres as lab_postgres
from lab.commands import readme_scripts, run_script
from lab.server import make_escrow

pytestmark = pytest.mark.slow
SECTION = "Backing up and restoring a PostgreSQL escrow"
TRIGGERS = ("SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger"
            " WHERE NOT tgisinternal ORDER BY 1, 2")


@dataclass(frozen=True)
class Database:
    """The escrow's database, owned by its role, and what PostgreSQL's commands need to reach
    it as README runs them."""

    server: lab_postgres.Server
    role: lab_postgres.Role
    name: str
    shell: dict[str, str]  # PATH to the server's own pg_dump, and a PGPASSFILE

    @property
    def url(self) -> str:
        return self.server.url(self.name, self.role.name)


@pytest.fixture
def database(postgres: lab_postgres.Server, tmp_path: Path) -> Iterator[Database]:
    (tmp_path / "role").mkdir()
    with lab_postgres.role(postgres, tmp_path / "role") as role:
        try:
            with postgres.database(owner=role.name) as name:
                pgpass = tmp_path / "pgpass"
                pgpass.write_text(f"*:*:*:{role.name}:{role.password}\n"
                                  f"*:*:*:{lab_postgres.USER}:{postgres.password}\n")
                pgpass.chmod(0o600)
                yield Database(postgres, role, name, {
                    "PGPASSFILE": str(pgpass),
                    "PATH": f"{lab_postgres.bindir()}:{os.environ.get('PATH', '')}"})
        finally:
            # README's restore renames the old database aside, away from Server.database().
            with postgres.connect() as admin:
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(f"{name}_old")))


def bring_back(kept: Path, data_dir: Path) -> None:
    """What README leaves to the operator after a restore: the token and the TLS key, which
    were kept apart from the backups."""
    shutil.copytree(kept / "softhsm", data_dir / "softhsm")
    shutil.copy2(kept / "hsm-pin", data_dir / "hsm-pin")
    shutil.copy2(kept / "tls" / "server.key", data_dir / "tls" / "server.key")


def test_a_postgresql_escrow_restored_as_readme_says_serves_the_same_key_and_its_chain(
        database: Database, tmp_path: Path) -> None:
    role, name, postgres = database.role, database.name, database.server
    escrow = make_escrow(tmp_path / "escrow", "--store-url", database.url,
                         "--store-password-file", str(role.password_file))
    for custodian in ("alice", "bob"):
        escrow.custodian(custodian)
    backups = tmp_path / "backups"
    backups.mkdir()
    back_up, restore = readme_scripts(SECTION, 4, {
        "postgresql://escrow@db.example/escrow": database.url,
        "postgresql://postgres@db.example/postgres": postgres.url("postgres"),
        "DATABASE escrow RENAME TO escrow_broken": f"DATABASE {name} RENAME TO {name}_old",
        "CREATE DATABASE escrow OWNER escrow": f"CREATE DATABASE {name} OWNER {role.name}",
        "/var/lib/escrow": str(escrow.data_dir)})

    escrow.start()
    try:
        _, node, key = api.enrolled(escrow)
        assert api.run(api.unseal(escrow, node)) == [(1, key)]
        backed_up = run_script(back_up, backups, database.shell)  # while it serves
    finally:
        escrow.stop()
    assert backed_up.returncode == 0, backed_up.stderr
    assert "the PostgreSQL database (back it up with `pg_dump" in backed_up.stderr
    with postgres.connect(name) as db:
        triggers = db.execute(TRIGGERS).fetchall()
    assert len(triggers) >= 5

    # The host and the database are lost; the token and the TLS key were kept apart.
    kept = tmp_path / "kept"
    shutil.move(escrow.data_dir, kept)
    restored = run_script(restore, backups, database.shell)
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "audit log intact" in restored.stdout
    assert ("the database is not in this backup: restore it with pg_restore (if not done "
            "yet)") in " ".join(restored.stderr.split())
    said = restored.stdout + restored.stderr + backed_up.stdout + backed_up.stderr
    assert role.password not in said
    assert postgres.password not in said

    backup_head = re.search(r"ending ([0-9a-f]{64})", backed_up.stdout)
    assert backup_head is not None
    with postgres.connect(name) as db:
        assert db.execute(TRIGGERS).fetchall() == triggers
        # The dump was taken after the backup, whose head record it holds.
        assert db.execute("SELECT event FROM audit WHERE hash = %s",
                          (backup_head[1],)).fetchall() == [("escrow.backup",)]
    with psycopg.connect(database.url, password=role.password, autocommit=True) as db:
        for statement in ("UPDATE audit SET event = 'forged'", "DELETE FROM audit",
                          "TRUNCATE audit", "TRUNCATE audit_checkpoints"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                db.execute(statement)

    bring_back(kept, escrow.data_dir)
    escrow.start()
    try:
        assert api.run(api.unseal(escrow, node)) == [(1, key)]
    finally:
        escrow.stop()
    events = [event for event, _ in escrow.audit()]
    assert "escrow.backup" in events
    assert events.count("unseal.release") == 2
    assert "audit log intact" in escrow.cli("audit", "verify").stdout
