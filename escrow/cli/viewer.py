"""``escrow viewer ...``: who may read the fleet's status (the page at /status, `escrow
status`). A token is written to a new file of mode 0600 once, never printed, never stored: the
store keeps its SHA-256 (escrow.service.viewing)."""

from __future__ import annotations

from pathlib import Path

import click

from escrow.audit import AuditEvent
from escrow.cli.context import (
    actor,
    checked_text,
    data_dir_option,
    json_option,
    now,
    open_vault,
    print_json,
    table,
)
from escrow.core import files
from escrow.core.errors import InputError
from escrow.core.timestamps import timestamp
from escrow.service.viewing import new_token, token_sha256
from escrow.store import ViewerRecord


@click.group()
def viewer() -> None:
    """Let people read the fleet's status: the page at /status and `escrow status`."""


@viewer.command()
@data_dir_option
@click.argument("name")
@click.option("--token-file", required=True, type=click.Path(path_type=Path),
              help="A new file to write the viewer's token to (mode 0600); give it to them "
                   "over a channel you trust.")
def add(data_dir: Path, name: str, token_file: Path) -> None:
    """Let viewer NAME read the status; their token goes to --token-file.

    \b
    Example:
      escrow viewer add oncall --token-file oncall.token   # give the file over a channel you trust
    """
    checked_text(name, "NAME", 100)
    if token_file.exists():
        raise InputError(f"{token_file} already exists", "choose another --token-file; a token "
                         "file is never overwritten")
    token = new_token()
    with open_vault(data_dir) as (_, vault):
        # Written first, so a token the store knows was never lost; a store that refuses the
        # name (taken) leaves an unknown token behind, removed here.
        with files.atomic_file(token_file, new=True) as handle:
            handle.write(token.encode("ascii") + b"\n")
        try:
            vault.store.add_viewer(
                ViewerRecord(name, token_sha256(token), timestamp(now())),
                AuditEvent("viewer.add", actor(), details={"name": name}))
        except BaseException:
            token_file.unlink(missing_ok=True)
            raise
    click.echo(f"viewer {name!r} added; their token is in {token_file}")


@viewer.command(name="list")
@data_dir_option
@json_option
def list_(data_dir: Path, as_json: bool) -> None:
    """List the viewers (names and when they were added, never their tokens).

    \b
    Example:
      escrow viewer list
    """
    with open_vault(data_dir) as (_, vault):
        rows = [{"name": v.name, "created_at": v.created_at} for v in vault.store.list_viewers()]
    if as_json:
        print_json(rows)
    else:
        table("Viewers", ["name", "added"], [[r["name"], r["created_at"]] for r in rows])


@viewer.command()
@data_dir_option
@click.argument("name")
def remove(data_dir: Path, name: str) -> None:
    """Take viewer NAME's token back: the page and `escrow status` refuse it at once.

    \b
    Example:
      escrow viewer remove oncall
    """
    with open_vault(data_dir) as (_, vault):
        vault.store.remove_viewer(name, AuditEvent("viewer.remove", actor(),
                                                   details={"name": name}))
    click.echo(f"viewer {name!r} removed")
