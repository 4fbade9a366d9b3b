"""``escrow window ...``: maintenance windows, custodians' approval of named nodes' restarts
given ahead of time (escrow.service.windows). Each command is signed with the custodian's own
key, and a window with their signature over its facts (escrow.core.protocol.window_payload)."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from pydantic import TypeAdapter

from escrow.api_client import CustodianClient
from escrow.cli.approvals import connection_options, custodian_client
from escrow.cli.context import checked_text, json_option, print_json, table
from escrow.core import protocol
from escrow.core.durations import describe, parse_duration
from escrow.core.errors import InputError
from escrow.core.plaintext import plain
from escrow.core.protocol import (
    MAX_WINDOW_NODES,
    MAX_WINDOW_RESTARTS,
    WindowCloseRequest,
    WindowOpenRequest,
    WindowSignRequest,
    WindowView,
)
from escrow.core.timestamps import timestamp
from escrow.identity import validate_cluster_id

_WINDOWS = TypeAdapter(list[WindowView])
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_SWARM_ID = re.compile(r"[a-z0-9]{25}")
_yes = click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts).")


@click.group()
def window() -> None:
    """Maintenance windows: pre-approve restarts of named managers for a bounded time."""


def _facts(title: str, window_id: str, cluster_id: str, nodes: list[str], restarts: int,
           expires_at: str, reason: str, signers: list[str]) -> None:
    table(title, ["field", "value"], [
        ["window", window_id], ["cluster", cluster_id], ["nodes", "\n".join(sorted(nodes))],
        ["restarts", str(restarts)], ["expires", expires_at], ["reason", reason],
        ["signed by", ", ".join(signers) or "no one yet"],
    ])


def _shown(verb: str, shown: WindowView) -> None:
    """A stored window's facts, before a custodian acts on it."""
    _facts(f"About to {verb} window {shown.window_id} ({shown.state}, {shown.used} of "
           f"{shown.restarts} restart(s) used)", shown.window_id, shown.cluster_id,
           shown.nodes, shown.restarts, shown.expires_at, shown.reason, shown.signers)


def _ask(question: str, yes: bool) -> None:
    if not yes and not click.confirm(question, default=False):
        raise click.Abort


def _find(client: CustodianClient, window_id: str) -> WindowView:
    for shown in client.call("GET", "/v1/windows", _WINDOWS):
        if shown.window_id == window_id:
            return shown
    raise InputError(f"window {plain(window_id)} is not among the windows of the clusters "
                     "where you hold a slot", "see `escrow window list`")


@window.command(name="open")
@connection_options
@click.option("--cluster", "cluster_id", required=True, help="Swarm cluster id.")
@click.option("--node", "nodes", multiple=True, required=True,
              help="A node id the window approves (repeat for several).")
@click.option("--restarts", type=click.IntRange(1, MAX_WINDOW_RESTARTS), required=True,
              help="Unseal requests the window approves, in all.")
@click.option("--for", "duration", required=True, help="How long it lasts, e.g. 2h or 90m.")
@click.option("--reason", required=True, help="Why, for the co-signers and the audit log.")
@_yes
def open_(url: str, ca: Path, key: Path, passphrase_file: Path | None, cluster_id: str,
          nodes: tuple[str, ...], restarts: int, duration: str, reason: str, yes: bool) -> None:
    """Open a window: your signature approves up to RESTARTS unseal requests of these nodes
    until it expires, as one approval of yours each.

    \b
    Example:
      escrow window open --cluster CLUSTER_ID --node NODE_1 --node NODE_2 --restarts 2 --for 2h \\
          --reason "kernel 6.18 patch night"      # shows what you sign, asks, signs
    """
    validate_cluster_id(cluster_id)
    reason = checked_text(reason, "--reason", 500)
    if not 1 <= len(set(nodes)) == len(nodes) <= MAX_WINDOW_NODES:
        raise InputError(f"a window names 1 to {MAX_WINDOW_NODES} different nodes",
                         "give each node once with --node NODE_ID")
    for node_id in nodes:
        if not _SWARM_ID.fullmatch(node_id):
            raise InputError(f"--node {plain(node_id)} is not a Swarm node id (25 lower-case "
                             "letters and digits)", "see `escrow status` for the node ids")
    seconds = parse_duration(duration, "--for")
    if seconds <= 0:
        raise InputError("--for must be longer than 0", "give it as 30m or 2h")
    window_id = "w-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))
    expires_at = timestamp(datetime.now(UTC) + timedelta(seconds=seconds))
    _facts(f"About to sign window {window_id} (for {describe(seconds)})", window_id,
           cluster_id, list(nodes), restarts, expires_at, reason, [])
    _ask("Each restart of these nodes until then counts as your approval. Sign?", yes)
    client = custodian_client(url, ca, key, passphrase_file)
    signature = protocol.sign(client.key, protocol.window_payload(
        window_id, cluster_id, nodes, restarts, expires_at, reason))
    opened = client.call("POST", "/v1/windows", WindowView, WindowOpenRequest(
        window_id=window_id, cluster_id=cluster_id, nodes=sorted(nodes), restarts=restarts,
        expires_at=expires_at, reason=reason, signature=signature))
    click.echo(plain(f"opened {opened.window_id} for {len(opened.nodes)} node(s) of "
                     f"{opened.cluster_id}, {opened.restarts} restart(s) until "
                     f"{opened.expires_at}, signed by {', '.join(opened.signers)}"))


@window.command()
@connection_options
@click.argument("window_id")
@_yes
def sign(url: str, ca: Path, key: Path, passphrase_file: Path | None, window_id: str,
         yes: bool) -> None:
    """Co-sign WINDOW_ID as it is shown: one more approval of each request it approves.

    \b
    Example:
      escrow window sign w-...                    # a second custodian: one more approval
    """
    client = custodian_client(url, ca, key, passphrase_file)
    shown = _find(client, window_id)
    _shown("co-sign", shown)
    _ask("Each restart of these nodes until then counts as your approval. Sign?", yes)
    signature = protocol.sign(client.key, protocol.window_payload(
        shown.window_id, shown.cluster_id, shown.nodes, shown.restarts, shown.expires_at,
        shown.reason))
    signed = client.call("POST", f"/v1/windows/{shown.window_id}/sign", WindowView,
                         WindowSignRequest(signature=signature))
    click.echo(plain(f"signed {signed.window_id}: signed by {', '.join(signed.signers)}"))


@window.command(name="list")
@connection_options
@click.option("--cluster", "cluster_id", default="", help="Only this cluster's windows.")
@json_option
def list_(url: str, ca: Path, key: Path, passphrase_file: Path | None, cluster_id: str,
          as_json: bool) -> None:
    """Windows of the clusters where you hold a slot, newest first.

    \b
    Example:
      escrow window list --cluster CLUSTER_ID
    """
    if cluster_id:
        validate_cluster_id(cluster_id)
    path = f"/v1/windows?cluster_id={cluster_id}" if cluster_id else "/v1/windows"
    shown = custodian_client(url, ca, key, passphrase_file).call("GET", path, _WINDOWS)
    if as_json:
        print_json([w.model_dump() for w in shown])
        return
    table("Maintenance windows",
          ["window", "cluster", "nodes", "restarts", "expires", "signed by", "state",
           "reason"],
          [[w.window_id, w.cluster_id, "\n".join(w.nodes), f"{w.used}/{w.restarts}",
            w.expires_at, ", ".join(w.signers),
            f"closed by {w.closed_by}" if w.closed_by else w.state, w.reason]
           for w in shown])


@window.command()
@connection_options
@click.argument("window_id")
@_yes
def close(url: str, ca: Path, key: Path, passphrase_file: Path | None, window_id: str,
          yes: bool) -> None:
    """Close WINDOW_ID: it approves nothing more.

    \b
    Example:
      escrow window close w-...                   # shows the window, asks, closes it
    """
    client = custodian_client(url, ca, key, passphrase_file)
    shown = _find(client, window_id)
    _shown("close", shown)
    _ask("Close it?", yes)
    closed = client.call("POST", f"/v1/windows/{shown.window_id}/close", WindowView,
                         WindowCloseRequest())
    click.echo(plain(f"closed {closed.window_id} after {closed.used} of {closed.restarts} "
                     "restart(s)"))
