"""``escrow custodian ...``: custodians' signing keys and their registration."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

import click

from escrow import custodian_keys
from escrow.cli.context import (
    checked_text,
    data_dir_option,
    json_option,
    open_vault,
    print_json,
    read_file,
    table,
)
from escrow.core.errors import InputError
from escrow.core.files import write_atomic


@click.group()
def custodian() -> None:
    """Register key custodians and make their signing keys."""


def read_passphrase(passphrase_file: Path | None, *, confirm: bool) -> bytes:
    if passphrase_file is not None:
        return read_file(passphrase_file, "passphrase file").rstrip(b"\r\n")
    if not sys.stdin.isatty():
        raise InputError("no passphrase: standard input is not a terminal",
                         "give --passphrase-file FILE")
    first = getpass.getpass("Passphrase: ")
    if confirm and getpass.getpass("Passphrase again: ") != first:
        raise InputError("the two passphrases differ", "run the command again")
    return first.encode("utf-8")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        write_atomic(path, data, mode, new=True)
    except FileExistsError:
        raise InputError(f"{path} already exists", "choose another --out; never overwrite a "
                         "key that may still be registered") from None


@custodian.command()
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Private key file to write (FILE.pub gets the public key).")
@click.option("--passphrase-file", type=click.Path(path_type=Path),
              help="File holding the passphrase, at least "
                   f"{custodian_keys.MIN_PASSPHRASE} characters (default: prompt without "
                   "echo).")
def keygen(out: Path, passphrase_file: Path | None) -> None:
    """Make a custodian signing key pair (run by the custodian, on their own machine).

    The private key is written encrypted under a passphrase of at least 12 characters.

    \b
    Example:
      escrow custodian keygen --out ~/alice.key    # then send ~/alice.key.pub to the admin
    """
    public_path = out.with_name(out.name + ".pub")
    if public_path.exists():
        raise InputError(f"{public_path} already exists", "choose another --out")
    private_pem, public_pem = custodian_keys.generate(
        read_passphrase(passphrase_file, confirm=True))
    _write_new(out, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    click.echo(f"wrote {out} (private, passphrase-protected) and {public_path}")
    click.echo(f"give {public_path} to the escrow admin: "
               f"escrow custodian add NAME --public-key {public_path.name}")


@custodian.command()
@data_dir_option
@click.argument("name")
@click.option("--public-key", required=True, type=click.Path(path_type=Path),
              help="The custodian's FILE.pub from `escrow custodian keygen`.")
def add(data_dir: Path, name: str, public_key: Path) -> None:
    """Register custodian NAME with their public key.

    \b
    Example:
      escrow custodian add alice --public-key alice.key.pub
    """
    # The name's own rule (escrow.policy) comes next; this one also refuses a trailing newline.
    checked_text(name, "NAME", 1000, min_length=0)
    with open_vault(data_dir) as (_, vault):
        vault.add_custodian(name, read_file(public_key, "public key"))
    click.echo(f"custodian {name!r} added")


@custodian.command(name="list")
@data_dir_option
@json_option
def list_(data_dir: Path, as_json: bool) -> None:
    """List registered custodians.

    \b
    Example:
      escrow custodian list
    """
    with open_vault(data_dir) as (_, vault):
        records = vault.store.list_custodians()
        clusters = vault.store.list_clusters()
    rows = [{"name": r.name, "created_at": r.created_at,
             "clusters": [c.cluster_id for c in clusters if r.name in c.policy.slots]}
            for r in records]
    if as_json:
        print_json(rows)
    else:
        table("Custodians", ["name", "registered", "holds a slot in"],
              [[r["name"], r["created_at"], ", ".join(r["clusters"]) or "-"] for r in rows])


@custodian.command()
@data_dir_option
@click.argument("name")
def remove(data_dir: Path, name: str) -> None:
    """Remove custodian NAME (refused while a cluster's policy names them).

    \b
    Example:
      escrow custodian remove alice               # refused while a policy names alice
    """
    with open_vault(data_dir) as (_, vault):
        vault.remove_custodian(name)
    click.echo(f"custodian {name!r} removed")
