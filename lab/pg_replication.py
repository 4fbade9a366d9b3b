"""A PostgreSQL primary with a streaming standby of its own, for the failover drill: the standby
made by `pg_basebackup -R`, each on a unix socket in a temporary directory of its own, commits
synchronous (a commit returns once the standby has it). Both stopped and removed on exit."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lab import postgres
from lab.postgres import PORT, USER, Server, bindir


@dataclass(frozen=True)
class Pair:
    primary: Server
    standby: Server

    def url(self, database: str) -> str:
        """Both hosts, and libpq picks the one that takes writes (what README advises)."""
        return (f"postgresql://{USER}@/{database}?host={self.primary.directory},"
                f"{self.standby.directory}&port={PORT}&target_session_attrs=read-write")

    def lose_primary(self) -> None:
        """The primary's machine dies: `pg_ctl stop -m immediate`, no clean shutdown."""
        postgres.stop(self.primary.data)

    def promote(self) -> None:
        promoted = postgres.as_postgres(bindir() / "pg_ctl", "-D", self.standby.data, "-w",
                                        "-t", "60", "promote")
        if promoted.returncode:
            raise RuntimeError(f"pg_ctl promote failed: {promoted.stderr}")


@contextlib.contextmanager
def primary_and_standby() -> Iterator[Pair]:
    with postgres.running(extra="-c wal_level=replica -c synchronous_commit=on"
                                " -c synchronous_standby_names='*'") as primary:
        root = Path(tempfile.mkdtemp(prefix="escrow-pg-standby-"))
        data = root / "data"
        try:
            shutil.chown(root, USER)
            root.chmod(0o700)
            # The password travels in the environment of the one command, never on argv.
            copied = subprocess.run(
                [str(bindir() / "pg_basebackup"), "-D", str(data), "-R", "-X", "stream",
                 "-h", str(primary.directory), "-p", str(PORT), "-U", USER],
                user=USER, capture_output=True, text=True, check=False, timeout=120,
                env={**os.environ, "PGPASSWORD": primary.password})
            if copied.returncode:
                raise RuntimeError(f"pg_basebackup failed: {copied.stderr}")
            standby = postgres.start(root, data, f"-c listen_addresses='' -k {root} -p {PORT}")
            try:
                yield Pair(primary, Server(root, primary.password_file, standby))
            finally:
                postgres.stop(data)
        finally:
            shutil.rmtree(root, ignore_errors=True)
