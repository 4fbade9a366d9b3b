"""A PostgreSQL server of the test's own: Debian's `postgresql` binaries, a data directory in a
temporary directory owned by the `postgres` user, listening only on a unix socket there, with
password (SCRAM) authentication. Stopped, by its own pid if `pg_ctl` cannot, and removed on
exit, even when a test fails."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

USER = "postgres"
PORT = 5433  # names the socket file only: the server listens on no TCP port


def bindir() -> Path:
    """The newest installed server's binaries (scripts/setup installs `postgresql`)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda path: int(path.parent.parent.name))
    if not found:
        raise RuntimeError("no PostgreSQL server is installed: run ./scripts/setup")
    return found[-1].parent


@dataclass(frozen=True)
class Server:
    directory: Path  # its socket lives here
    password_file: Path  # the superuser's password, 0600, readable by this process
    options: str  # the server's command-line settings

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every client connection is cut."""
        restarted = as_postgres(bindir() / "pg_ctl", "-D", self.data, "-o", self.options,
                                 "-l", self.directory / "server.log", "-m", "fast", "-w",
                                 "-t", "60", "restart")
        if restarted.returncode:
            raise RuntimeError(f"pg_ctl restart failed: {restarted.stderr}")

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def url(self, database: str, user: str = USER) -> str:
        """A libpq URL without the password (it is passed apart, as the escrow takes it)."""
        return f"postgresql://{user}@/{database}?host={self.directory}&port={PORT}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url(database), password=self.password, autocommit=True)

    @contextlib.contextmanager
    def database(self, owner: str = USER) -> Iterator[str]:
        """A fresh, empty database, dropped afterwards (its connections cut)."""
        name = f"escrow_test_{secrets.token_hex(6)}"
        with self.connect() as admin:
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(owner)))
        try:
            yield name
        finally:
            with self.connect() as admin:
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                    sql.Identifier(name)))


@dataclass(frozen=True)
class Role:
    """A login role that is no superuser, as an escrow's own role would be."""

    name: str
    password_file: Path  # 0600

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()


@contextlib.contextmanager
def role(server: Server, directory: Path) -> Iterator[Role]:
    """A role of its own on ``server``, its password in a file in ``directory``; dropped
    afterwards (drop the databases it owns first: :meth:`Server.database` inside this)."""
    made = Role(f"escrow_role_{secrets.token_hex(6)}", directory / "store-password")
    made.password_file.write_text(secrets.token_urlsafe(24) + "\n")
    made.password_file.chmod(0o600)
    with server.connect() as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(made.name), sql.Literal(made.password)))
    try:
        yield made
    finally:
        with server.connect() as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(made.name)))


def as_postgres(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], user=USER, capture_output=True, text=True,
                          check=False, timeout=120)


@contextlib.contextmanager
def running(extra: str = "") -> Iterator[Server]:
    """A fresh server; ``extra``: more of its command-line settings."""
    root = Path(tempfile.mkdtemp(prefix="escrow-pg-"))
    data = root / "data"
    try:
        shutil.chown(root, USER)
        root.chmod(0o700)
        secret = root / "superuser-password"
        secret.write_text(secrets.token_urlsafe(24))
        secret.chmod(0o600)
        shutil.chown(secret, USER)
        init = as_postgres(bindir() / "initdb", "-D", data, "-U", USER, "--auth=scram-sha-256",
                           f"--pwfile={secret}", "-E", "UTF8", "--locale=C.UTF-8")
        if init.returncode:
            raise RuntimeError(f"initdb failed: {init.stderr}")
        options = start(root, data, f"-c listen_addresses='' -k {root} -p {PORT} -c fsync=on "
                                    f"{extra}")
        try:
            # The tests run as root; the password file is read here, never passed on argv.
            yield Server(root, secret, options)
        finally:
            stop(data)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def start(root: Path, data: Path, options: str) -> str:
    """Start the server of ``data`` with ``options`` (returned), its log in ``root``."""
    started = as_postgres(bindir() / "pg_ctl", "-D", data, "-o", options, "-l",
                          root / "server.log", "-w", "-t", "60", "start")
    if started.returncode:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {started.stderr}\n{log[-2000:]}")
    return options


def stop(data: Path) -> None:
    stopped = as_postgres(bindir() / "pg_ctl", "-D", data, "-m", "immediate", "-w", "-t", "30",
                           "stop")
    pid_file = data / "postmaster.pid"
    if stopped.returncode and pid_file.exists():
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
