"""Which store an escrow opens: its data directory's SQLite file, or the PostgreSQL database
`store.url` names, with the password from the systemd credential `store-password` or
`store.password_file` (never from the URL, the command line or the environment: a URL that
carries one is refused)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from escrow.config import Settings
from escrow.core.errors import ConfigError
from escrow.core.hsm import credential_pin, read_pin_file
from escrow.store.sql import Clock, SqlStore
from escrow.store.sqlite import SqliteStore

PASSWORD_CREDENTIAL = "store-password"  # noqa: S105 (the credential's name, not a secret)
WHAT = "store password"


def open_store(settings: Settings, now: Clock, *, create: bool = False,
               env: Mapping[str, str] | None = None) -> SqlStore:
    if not settings.store.url:
        return SqliteStore.open(settings.db_path, now, create=create)
    return open_url(settings.store.url, settings.store.password_file, now, env)


def open_url(url: str, password_file: Path | None, now: Clock,
             env: Mapping[str, str] | None = None) -> SqlStore:
    """The PostgreSQL store at ``url``."""
    refuse_password_in(url)
    # Imported here: psycopg and its pool are for PostgreSQL escrows only.
    from escrow.store.postgres import PostgresStore  # noqa: PLC0415

    return PostgresStore.open(url, password(password_file, os.environ if env is None else env),
                              now)


def password(password_file: Path | None, env: Mapping[str, str]) -> str | None:
    """The store's password, or None to leave it to libpq (~/.pgpass, PGPASSFILE, peer)."""
    credential = credential_pin(env, PASSWORD_CREDENTIAL,
                                f"LoadCredential={PASSWORD_CREDENTIAL}:...", WHAT)
    if credential is not None:
        return credential.value
    if password_file is not None:
        return read_pin_file(password_file, "store.password_file", "store.password_file",
                             WHAT).value
    return None


def refuse_password_in(url: str, what: str = "store.url",
                       instead: str = "store.password_file (0600) or the systemd credential "
                                      f"{PASSWORD_CREDENTIAL}") -> None:
    """A password inside store.url would sit in escrow.toml or the environment in clear (and
    inside a command's URL, in `ps` and the shell's history): ``what`` names where the URL
    came from, ``instead`` where its password goes."""
    # libpq's own reading of the URL or conninfo, as PostgresStore will connect with it.
    from psycopg import ProgrammingError  # noqa: PLC0415
    from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415

    try:
        carries = "password" in conninfo_to_dict(url)
    except ProgrammingError:
        raise ConfigError(f"{what} is not a libpq URL or conninfo",
                          "write it as postgresql://user@host:5432/dbname") from None
    if carries:
        raise ConfigError(f"{what} carries a password; it would be kept in clear",
                          f"remove it from the URL and put it in {instead}")
