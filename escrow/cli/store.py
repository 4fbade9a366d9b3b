"""``escrow store``: where the escrow keeps its data; ``copy`` moves an SQLite escrow into
PostgreSQL (escrow.store.copy)."""

from __future__ import annotations

from pathlib import Path

import click
import tomli_w

from escrow import config
from escrow.cli.context import actor, data_dir_option, now
from escrow.core.timestamps import timestamp


@click.group()
def store() -> None:
    """The escrow's store: its SQLite file, or a PostgreSQL database (store.url)."""


@store.command("copy")
@data_dir_option
@click.option("--to", "url", required=True,
              help="The PostgreSQL database to copy into, empty: a libpq URL or conninfo "
                   "without a password.")
@click.option("--to-password-file", type=click.Path(path_type=Path, dir_okay=False),
              help="File holding its password, 0600 (without it: a systemd credential named "
                   "store-password, or libpq's ~/.pgpass).")
@click.option("--switch", is_flag=True,
              help="Afterwards set store.url (and store.password_file) in escrow.toml, so the "
                   "escrow starts on PostgreSQL.")
def copy(data_dir: Path, url: str, to_password_file: Path | None, switch: bool) -> None:
    """Copy this SQLite escrow into an empty PostgreSQL database, all or nothing.

    Every table is copied in one transaction, shares still wrapped by the same token; it
    commits only once every table read back matches and the copied audit chain verifies,
    then a store.copied record is added. The escrow must be stopped. escrow.db is left as it
    was (its schema brought up to date first, as by any command).

    \b
    Example:
      escrow store copy --to 'postgresql://escrow@db.example/escrow' \\
          --to-password-file /etc/escrow/store-password --switch
    """
    # psycopg and its pool are for PostgreSQL escrows only: loaded by this command, not by
    # every `escrow` start.
    from escrow.store.copy import copy_to_postgresql  # noqa: PLC0415

    settings = config.load(data_dir)
    password_file = to_password_file.absolute() if to_password_file is not None else None
    copied = copy_to_postgresql(settings, url, password_file, actor(),
                                lambda: timestamp(now()))
    rows = ", ".join(f"{table} {count}" for table, count in copied.rows.items())
    click.echo(f"copied {copied.source} to {copied.destination} in one transaction: {rows}")
    click.echo(f"audit chain verified in PostgreSQL before the commit, head {copied.audit_head}; "
               f"then record {copied.record.seq} ({copied.record.event}), head "
               f"{copied.record.hash}")
    settings_toml = {"url": url} | ({"password_file": str(password_file)}
                                    if password_file is not None else {})
    if switch:
        for key, value in settings_toml.items():
            config.update(settings.data_dir, "store", key, value)
        click.echo(f"{settings.data_dir / config.CONFIG_NAME} now names it (store.url"
                   f"{', store.password_file' if password_file is not None else ''}).")
        first = "next:"
    else:
        click.echo(f"next: put these lines in {settings.data_dir / config.CONFIG_NAME} (as "
                   "--switch would have):")
        click.echo(tomli_w.dumps({"store": settings_toml}).rstrip("\n"))
        first = "then"
    click.echo(f"{first} start the escrow (`systemctl start escrow`, or `escrow serve`): it "
               f"serves from PostgreSQL and no longer reads {copied.source.name}. Keep "
               f"{copied.source} until it does, as the way back, then delete it: it holds "
               "the same wrapped shares and records.")
