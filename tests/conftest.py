"""Shared fixtures: a real SoftHSM token, real stores (every test of the `store` fixture runs
on SQLite and on a PostgreSQL server of the session's own), swarm-like certificates, a running
escrow (the laboratory they come from is lab/; dockerd's fixtures are in tests/swarm).

python-pkcs11 loads the SoftHSM module once per process and SoftHSM reads its token directory
only then, so every in-process test uses one session token (each test gets a wrapping key of its
own). Tests of commands run the real `escrow` in subprocesses, which see tokens made later.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from escrow import config
from escrow.core.hsm import HsmSettings, Pin
from escrow.core.timestamps import timestamp
from escrow.softhsm import create_token, default_module
from escrow.store.postgres import PostgresStore
from escrow.store.sql import SqlStore
from escrow.store.sqlite import SqliteStore
from escrow.vault import Vault
from escrow.wrapping import Token
from lab import postgres as lab_postgres
from lab.certs import make_root_ca
from lab.server import EscrowProcess, make_escrow, make_replica

# Measured figures (systemd boxes, power cuts), printed at the end of the run and quoted in
# closing notes and runbooks. Under pytest-xdist each worker sends its own to the controller.
FIGURES: list[tuple[str, float, str]] = []


def record(what: str, value: float, unit: str = "s") -> None:
    FIGURES.append((what, value, unit))


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["figures"] = FIGURES


class _WorkersFigures:
    """pytest-xdist's hook, registered only where xdist runs (`-p no:xdist` has no such hook)."""

    @staticmethod
    def pytest_testnodedown(node: Any, error: object) -> None:
        FIGURES.extend(tuple(f) for f in node.workeroutput.get("figures", []))


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_WorkersFigures())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("measured figures")
        for what, value, unit in FIGURES:
            terminalreporter.write_line(f"{value:8.2f} {unit:2}  {what}")


SESSION_TOKEN = "tests"
SESSION_PIN = "test-pin-5521"


@dataclass
class SoftHsm:
    directory: Path
    conf: Path
    module: str
    pin_file: Path

    def settings(self, key_label: str) -> HsmSettings:
        return HsmSettings(self.module, SESSION_TOKEN, key_label, self.pin_file, self.conf)


@pytest.fixture(scope="session")
def softhsm() -> Iterator[SoftHsm]:
    directory = Path(tempfile.mkdtemp(prefix="escrow-test-hsm-"))
    try:
        conf = create_token(directory, SESSION_TOKEN, SESSION_PIN)
        pin_file = directory / "pin"
        pin_file.write_text(SESSION_PIN + "\n")
        pin_file.chmod(0o600)
        os.environ["SOFTHSM2_CONF"] = str(conf)
        yield SoftHsm(directory, conf, default_module(), pin_file)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def hsm_settings(softhsm: SoftHsm) -> HsmSettings:
    return softhsm.settings(f"wrap-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def token(hsm_settings: HsmSettings) -> Iterator[Token]:
    with Token(hsm_settings, Pin(SESSION_PIN, "test")) as opened:
        opened.create_wrapping_key()
        yield opened


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="session")
def postgres() -> Iterator[lab_postgres.Server]:
    with lab_postgres.running() as server:
        yield server


@dataclass(frozen=True)
class Backend:
    name: str
    open: Callable[[], SqlStore]  # another store on the same database, as a replica opens
    tamper: Callable[[str], None]  # run SQL on the database behind the escrow's back
    url: str = ""  # the PostgreSQL database's, without its password


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[Backend]:
    def now() -> str:
        return timestamp(clock())

    if request.param == "sqlite":
        path = tmp_path / "escrow.db"

        def tamper_file(statement: str) -> None:
            with contextlib.closing(sqlite3.connect(path)) as db:
                db.execute(statement)
                db.commit()
        yield Backend("sqlite", lambda: SqliteStore.open(path, now, create=True), tamper_file)
        return
    server: lab_postgres.Server = request.getfixturevalue("postgres")
    with server.database() as name:
        def tamper_database(statement: str) -> None:
            with server.connect(name) as db:
                db.execute(statement)
        yield Backend("postgresql",
                      lambda: PostgresStore.open(server.url(name), server.password, now),
                      tamper_database, server.url(name))


@pytest.fixture
def store(backend: Backend) -> Iterator[SqlStore]:
    opened = backend.open()
    yield opened
    opened.close()


@pytest.fixture
def vault(store: SqlStore, token: Token, clock: Clock) -> Vault:
    return Vault(store, token, clock, "test")


@pytest.fixture(scope="session")
def root_ca_pem() -> bytes:
    return make_root_ca().pem


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The output of a command that must have succeeded."""
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """The error output of a command that must have failed with ``code``, saying each of
    ``fragments``."""
    assert result.returncode == code, (result.stdout, result.stderr)
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


@pytest.fixture
def data_dir(tmp_path: Path, hsm_settings: HsmSettings, token: Token) -> Path:
    """A data directory whose config points at the session token (and this test's key), for
    running the real `escrow` command in subprocesses while the test inspects in-process."""
    directory = tmp_path / "data"
    directory.mkdir(mode=0o700)
    config.write(directory, hsm_settings, config.DEFAULT_RETENTION_DAYS)
    SqliteStore.open(directory / config.DB_NAME, lambda: "init", create=True).close()
    return directory


@pytest.fixture
def replicas(postgres: lab_postgres.Server, tmp_path: Path) -> Iterator[list[EscrowProcess]]:
    """Two running replicas of one escrow on a PostgreSQL database of this test's own, each
    with its own data directory and a copy of the first one's token; custodians alice and bob
    (their keys beside the first replica)."""
    with postgres.database() as name:
        url, password = postgres.url(name), str(postgres.password_file)
        first = make_escrow(tmp_path / "a", "--store-url", url, "--store-password-file", password)
        for custodian in ("alice", "bob"):
            first.custodian(custodian)
        second = make_replica(first, tmp_path / "b", url, postgres.password_file)
        running: list[EscrowProcess] = []
        try:
            for replica in (first, second):
                replica.start()
                running.append(replica)
            yield running
        finally:
            for replica in running:
                replica.stop()


@pytest.fixture
def escrow(tmp_path: Path) -> Iterator[EscrowProcess]:
    """A running `escrow serve` of this test's own, with custodians alice and bob."""
    server = make_escrow(tmp_path / "escrow")
    for name in ("alice", "bob"):
        server.custodian(name)
    server.start()
    yield server
    server.stop()
