"""``escrow recover``: rebuild an unlock key from paper shares, with no server, database or HSM.

Mnemonics are read one per line from standard input, or prompted for without echo on a
terminal until enough have been typed. The key is printed on standard output and nowhere else.
"""

from __future__ import annotations

import getpass
import sys

import click

from escrow import shares
from escrow.errors import RecoveryError


def _from_terminal() -> shares.ShareSet:
    state = shares.ShareSet()
    number = 0
    while state.missing:
        number += 1
        wanted = f"{state.missing} more" if state.shares else "first"
        text = getpass.getpass(f"Share {number} ({wanted}; words separated by spaces): ")
        if not text.strip():
            raise RecoveryError(f"stopped with {len(state.shares)} share(s), "
                                f"{state.missing} more needed", "run `escrow recover` again")
        try:
            state = state.add(shares.parse_share(text, f"share {number}"))
        except RecoveryError as exc:
            click.echo(exc.diagnostics(), err=True)  # let the custodian retype that share
    return state


def _from_stdin() -> shares.ShareSet:
    state = shares.ShareSet()
    for number, line in enumerate(sys.stdin, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            state = state.add(shares.parse_share(line, f"line {number}"))
    return state


@click.command()
def recover() -> None:
    """Rebuild the SWMKEY-1-... key from SLIP-39 shares (offline disaster recovery)."""
    state = _from_terminal() if sys.stdin.isatty() else _from_stdin()
    key = shares.combine_set(state)
    click.echo(key.swmkey())
    click.echo("unlock with `docker swarm unlock` and paste the key at its prompt; then rotate "
               "the key, since it has been on screen", err=True)
