"""What only the PostgreSQL store has to prove, against a real PostgreSQL server: several
replicas writing one audit chain, a server restart under a live store, a password that never
shows, a schema from a newer escrow, and an audit table that cannot be truncated."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.errors import AgentError
from escrow import audit
from escrow.audit import AuditEvent
from escrow.core.errors import StoreError
from escrow.store.postgres import PostgresStore
from escrow.store.sql import SqlStore
from lab import api
from lab.commands import run_escrow
from lab.postgres import Server
from lab.server import make_escrow
from tests.conftest import Backend

ON_POSTGRESQL = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


@ON_POSTGRESQL
def test_two_replicas_appending_at_once_keep_one_audit_chain(backend: Backend) -> None:
    replicas = [backend.open(), backend.open()]
    errors: list[BaseException] = []

    def append(store: SqlStore, name: str) -> None:
        try:
            for index in range(150):
                store.append_audit(AuditEvent("test.append", name, details={"index": index}))
        except BaseException as exc:  # reported below, with the chain
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(store, f"replica-{i}"))
               for i, store in enumerate(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = list(replicas[0].iter_audit())
    for store in replicas:
        store.close()
    assert errors == []
    assert [r.seq for r in records] == list(range(1, 301))
    assert {r.actor for r in records} == {"replica-0", "replica-1"}
    assert audit.verify(records) == []


@ON_POSTGRESQL
def test_a_live_store_carries_on_after_postgresql_restarts(backend: Backend,
                                                          postgres: Server) -> None:
    store = backend.open()
    store.append_audit(AuditEvent("test.before", "test"))
    postgres.restart()
    store.append_audit(AuditEvent("test.after", "test"))
    records = list(store.iter_audit())
    store.close()
    assert [r.event for r in records] == ["test.before", "test.after"]
    assert audit.verify(records) == []


@ON_POSTGRESQL
def test_a_wrong_password_is_refused_by_name_and_never_shown(backend: Backend,
                                                            postgres: Server) -> None:
    wrong = "not-the-password-8c1f"
    with pytest.raises(StoreError) as refused:
        PostgresStore.open(postgres.url("postgres"), wrong, lambda: "t")
    shown = f"{refused.value.message} {refused.value.hint}"
    assert "password authentication failed" in shown
    assert "store-password" in shown
    assert wrong not in shown
    assert postgres.password not in shown


def test_a_password_in_the_url_is_not_repeated_in_the_error(postgres: Server) -> None:
    url = f"postgresql://postgres:hunter2-secret@/nosuchdb?host={postgres.directory}&port=5433"
    with pytest.raises(StoreError) as refused:
        PostgresStore.open(url, None, lambda: "t")
    assert "hunter2-secret" not in f"{refused.value.message} {refused.value.hint}"


@ON_POSTGRESQL
def test_a_store_from_a_newer_escrow_is_refused(backend: Backend) -> None:
    backend.open().close()
    backend.tamper("UPDATE schema_version SET version = version + 1")
    with pytest.raises(StoreError, match="this escrow knows up to"):
        backend.open()


@ON_POSTGRESQL
@pytest.mark.parametrize("statement", ["TRUNCATE audit", "TRUNCATE audit_checkpoints",
                                       "DELETE FROM audit"])
def test_the_audit_tables_cannot_be_truncated_or_emptied(backend: Backend,
                                                         statement: str) -> None:
    store = backend.open()
    store.append_audit(AuditEvent("test.kept", "test"))
    with pytest.raises(StoreError, match="append-only"):
        store._db.execute(statement)
    assert [r.event for r in store.iter_audit()] == ["test.kept"]
    store.close()


@ON_POSTGRESQL
def test_an_escrow_on_postgresql_enrolls_deposits_and_unseals_and_its_chain_verifies(
        backend: Backend, postgres: Server, tmp_path: Path) -> None:
    url = backend.url  # the test's own database
    escrow = make_escrow(tmp_path, "--store-url", url, "--store-password-file",
                         str(postgres.password_file))
    escrow.start()
    try:
        _, node, key = api.enrolled(escrow, slots="auto,auto")
        assert api.run(api.unseal(escrow, node)) == [(1, key)]
        # A second escrow on the same database is refused unless it joins as a replica.
        second = run_escrow("init", "--data-dir", str(tmp_path / "second"), "--store-url", url,
                            "--store-password-file", str(postgres.password_file))
        assert second.returncode != 0
        assert "already holds an escrow's data" in second.stderr
        assert "--join" in second.stderr
        assert not (tmp_path / "second").exists()
        verified = escrow.cli("audit", "verify")
        assert verified.returncode == 0, verified.stderr
        # Config and certificates only: the database is pg_dump's (test_postgres_backup.py).
        backed_up = escrow.cli("backup", "--out", str(tmp_path / "backup.tar"))
        assert backed_up.returncode == 0, backed_up.stderr
        assert "pg_dump" in backed_up.stderr
    finally:
        escrow.stop()
    assert not (escrow.data_dir / "escrow.db").exists()
    kept = (escrow.data_dir / "escrow.toml").read_text() + escrow.log()
    assert postgres.password not in kept
    store = backend.open()
    events = [r.event for r in store.iter_audit()]
    store.close()
    assert events[0] == "escrow.init"
    assert "unseal.release" in events


def test_a_store_url_that_carries_a_password_is_refused_at_init(tmp_path: Path) -> None:
    result = run_escrow("init", "--data-dir", str(tmp_path / "data"), "--store-url",
                        "postgresql://escrow:s3cret-in-url@db.example/escrow")
    assert result.returncode != 0
    assert "store.url carries a password" in result.stderr
    assert "s3cret-in-url" not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists()


@ON_POSTGRESQL
def test_postgresql_restarted_under_a_serving_escrow_costs_at_most_a_503(
        backend: Backend, postgres: Server, tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path, "--store-url", backend.url, "--store-password-file",
                         str(postgres.password_file))
    escrow.start()
    try:
        cluster, node, key = api.enrolled(escrow, slots="auto,auto")
        nodes = [node]
        for _ in range(5):
            extra = cluster.node()
            api.run(api.enroll(escrow, extra))
            nodes.append(extra)
        answers: list[str] = []
        stop = threading.Event()

        def unseal_until_stopped() -> None:
            while not stop.is_set():
                for each in nodes:
                    try:
                        rebuilt = api.run(api.unseal(escrow, each))
                        answers.append("ok" if rebuilt == [(1, key)] else f"wrong {rebuilt}")
                    except AgentError as exc:
                        answers.append(exc.message)

        worker = threading.Thread(target=unseal_until_stopped)
        worker.start()
        try:
            while len(answers) < 6:
                time.sleep(0.05)
            postgres.restart()
            seen = len(answers)
            while len(answers) < seen + 12:
                time.sleep(0.05)
        finally:
            stop.set()
            worker.join()
    finally:
        escrow.stop()
    failures = [a for a in answers if a != "ok"]
    assert all("(503)" in failure for failure in failures), failures
    assert answers[-6:] == ["ok"] * 6
    assert escrow.cli("audit", "verify").returncode == 0
