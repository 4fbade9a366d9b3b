"""``escrow recover``: rebuild an unlock key from paper shares, with no server, database or HSM.

Mnemonics are read one per line from standard input, or prompted for without echo on a
terminal until enough have been typed. The key is printed on standard output and nowhere else,
or, with --unlock, handed straight to the local dockerd's API and not shown at all.
"""

from __future__ import annotations

import getpass
import sys

import click
import docker
import docker.errors
import requests

from escrow.core import shares
from escrow.core.errors import RecoveryError
from escrow.core.unlockkey import UnlockKey


def _from_terminal() -> shares.ShareSet:
    state = shares.ShareSet()
    number = 0
    click.echo("Type each share's words separated by spaces; they are not shown. An empty "
               "share stops.", err=True)
    while not state.complete:
        number += 1
        text = getpass.getpass(f"Share {number} ({state.missing()}): ")
        if not text.strip():
            raise RecoveryError(f"stopped with {state.count} share(s); still missing "
                                f"{state.missing()}", "run `escrow recover` again")
        try:
            state.add(shares.parse_share(text, f"share {number}"))
        except RecoveryError as exc:
            click.echo(exc.diagnostics(), err=True)  # let the custodian retype that share
    return state


def _from_stdin() -> shares.ShareSet:
    state = shares.ShareSet()
    for number, line in enumerate(sys.stdin, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            state.add(shares.parse_share(line, f"line {number}"))
    return state


def _unlock(key: UnlockKey, docker_host: str) -> None:
    try:
        docker.APIClient(base_url=docker_host, version="1.41", timeout=60).unlock_swarm(
            key.swmkey())
    except docker.errors.APIError as exc:
        if exc.status_code == 401 or "invalid key" in str(exc.explanation):
            raise RecoveryError("the rebuilt key does not unlock this manager",
                                "these shares belong to another key version or cluster; try "
                                "the shares of an older version") from None
        raise RecoveryError(f"dockerd refused the unlock: {exc.explanation}",
                            "is this node a locked manager? (`docker info`)") from None
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise RecoveryError(f"cannot reach dockerd at {docker_host}: {type(exc).__name__}",
                            "is docker running? give --docker-host") from None


@click.command()
@click.option("--unlock", is_flag=True,
              help="Unlock the local manager with the rebuilt key instead of printing it.")
@click.option("--docker-host", default="unix:///var/run/docker.sock", show_default=True,
              help="dockerd's API socket, for --unlock.")
def recover(unlock: bool, docker_host: str) -> None:
    """Rebuild the SWMKEY-1-... key from SLIP-39 shares (offline disaster recovery).

    \b
    Example:
      escrow recover                              # prompts for shares without echo
      escrow recover --unlock                     # on the locked manager; the key is not shown
    """
    state = _from_terminal() if sys.stdin.isatty() else _from_stdin()
    key = state.key()
    if unlock:
        _unlock(key, docker_host)
        click.echo("the manager accepted the rebuilt key and is unlocking; rotate the key once "
                   "the escrow is back (`unseal-agent rotate`)", err=True)
        return
    click.echo(key.swmkey())
    click.echo("unlock with `docker swarm unlock` and paste the key at its prompt; then rotate "
               "the key, since it has been on screen", err=True)
