"""What every CLI command shares: the data directory, opening the vault, output helpers."""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from escrow import config
from escrow.config import Settings
from escrow.core import plaintext
from escrow.core.errors import InputError
from escrow.core.timestamps import parse_timestamp, timestamp
from escrow.store import opening
from escrow.store.sql import SqlStore
from escrow.vault import Vault
from escrow.wrapping import Token, resolve_pin

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_DATA_DIR = Path("/var/lib/escrow")


def data_dir_option(func: F) -> F:
    return click.option(
        "--data-dir", type=click.Path(path_type=Path), envvar=config.DATA_DIR_ENV,
        default=DEFAULT_DATA_DIR, show_default=True, show_envvar=True,
        help="Escrow data directory (config, database, embedded token).",
    )(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        func)


def now() -> datetime:
    return datetime.now(UTC)


def actor() -> str:
    return f"cli:{getpass.getuser()}@{socket.gethostname()}"


def open_store(settings: Settings, *, create: bool = False) -> SqlStore:
    return opening.open_store(settings, lambda: timestamp(now()), create=create)


class LazyToken:
    """Opens the token on first use, so commands that never touch a share need no PIN."""

    def __init__(self, settings: Settings, pin_file: Path | None = None) -> None:
        self._settings = settings
        self._pin_file = pin_file
        self._token: Token | None = None

    @property
    def token(self) -> Token:
        if self._token is None:
            pin = resolve_pin(self._pin_file, self._settings.hsm.pin_file, os.environ)
            self._token = Token(self._settings.hsm, pin)
        return self._token

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        return self.token.wrap(plaintext, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        return self.token.unwrap(wrapped, aad)

    def close(self) -> None:
        if self._token is not None:
            self._token.close()


@contextmanager
def open_vault(data_dir: Path) -> Iterator[tuple[Settings, Vault]]:
    settings = config.load(data_dir)
    store = open_store(settings)
    token = LazyToken(settings)
    try:
        yield settings, Vault(store, token, now, actor())
    finally:
        token.close()
        store.close()


def read_secret_line(prompt: str) -> str:
    """One line from stdin, or a prompt without echo on a terminal. Never from argv."""
    if sys.stdin.isatty():
        return getpass.getpass(prompt + ": ")
    line = sys.stdin.readline()
    if not line:
        raise InputError("nothing was given on standard input",
                         "pipe the value in, e.g. `docker swarm unlock-key -q | escrow ...`")
    return line


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the {what} {path}: {exc.strerror}",
                         "check the path and its permissions") from None


def checked_text(value: str, what: str, max_length: int, *, min_length: int = 1) -> str:
    """An operator's free text (a reason, a name) for the audit log and other people's
    terminals: plain text of bounded length, or an InputError naming the option."""
    if not min_length <= len(value) <= max_length:
        raise InputError(f"{what} must have {min_length}-{max_length} characters, not "
                         f"{len(value)}", f"give a {what} of that length")
    try:
        return plaintext.check_plain_text(value)
    except ValueError as exc:
        raise InputError(f"{what} {exc}", f"give {what} as one line of printable text"
                         ) from None


# Piped output is read by scripts and grep: do not fold it to a guessed 80 columns. Nothing
# printed is ever read as markup, emoji codes or highlighted: much of it comes from nodes.
_console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200, markup=False,
                   highlight=False, emoji=False)


def _text(value: object) -> Text:
    return Text(plaintext.plain(value))


def grid(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """Every cell, header and the title as plain text (escrow.core.plaintext.plain), never as rich
    markup: hostnames, reasons and audit details are node- or custodian-supplied."""
    made = Table(title=_text(title), title_justify="left", header_style="bold")
    for column in columns:
        made.add_column(_text(column), overflow="fold")
    for row in rows:
        made.add_row(*(_text(cell) for cell in row))
    return made


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    _console.print(grid(title, columns, rows))


def console() -> Console:
    """The console every table is printed on (see above)."""
    return _console


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def seconds_since(moment: str, now: datetime) -> float | None:
    """Seconds from ``moment`` (an escrow timestamp) to ``now``; None for what this escrow
    does not write, so the row is shown all the same."""
    try:
        return (now - parse_timestamp(moment)).total_seconds()
    except (ValueError, TypeError):
        return None


def age(seconds: float) -> str:
    """An age as on-call reads it: 4m05s, 2h10m, 3d04h."""
    whole = max(0, int(seconds))
    if whole >= 86400:
        return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 60}m{whole % 60:02d}s"


def age_of(moment: str) -> str:
    """How long ago ``moment`` was, or "?"."""
    seconds = seconds_since(moment, datetime.now(UTC))
    return "?" if seconds is None else age(seconds)
