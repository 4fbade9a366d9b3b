"""Custodian commands that talk to a running escrow: ``escrow requests``, ``approve``, ``deny``
and ``share export``. Each request is signed with the custodian's own key."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import TypeAdapter

from escrow import custodian_keys
from escrow.api_client import CustodianClient
from escrow.cli.context import checked_text, json_option, print_json, read_file, table
from escrow.cli.custodian import read_passphrase
from escrow.core import protocol
from escrow.core.errors import EscrowError, InputError
from escrow.core.plaintext import plain
from escrow.core.protocol import (
    ApproveRequest,
    DecisionResponse,
    DenyRequest,
    PendingRequest,
    ReleasedShare,
    ShareExportRequest,
)
from escrow.core.states import Decision

F = TypeVar("F", bound=Callable[..., Any])
_PENDING = TypeAdapter(list[PendingRequest])


def connection_options(func: F) -> F:
    for option in reversed([
        click.option("--url", envvar="ESCROW_URL", required=True, show_envvar=True,
                     help="The escrow, e.g. https://escrow.example:8443; its replicas "
                          "separated by commas, in order of preference."),
        click.option("--ca", envvar="ESCROW_CA", required=True, show_envvar=True,
                     type=click.Path(path_type=Path), help="The escrow's CA (tls/ca.pem)."),
        click.option("--key", envvar="ESCROW_KEY", required=True, show_envvar=True,
                     type=click.Path(path_type=Path), help="Your private key file."),
        click.option("--passphrase-file", type=click.Path(path_type=Path),
                     help="File holding your key's passphrase (default: prompt, no echo)."),
    ]):
        func = option(func)
    return func


def _client(url: str, ca: Path, key: Path, passphrase_file: Path | None) -> CustodianClient:
    private = custodian_keys.load_private(read_file(key, "private key"),
                                          read_passphrase(passphrase_file, confirm=False))
    return CustodianClient(url, str(ca), private)


def _age(created_at: str) -> str:
    try:
        seconds = int((datetime.now(UTC) - datetime.fromisoformat(created_at)).total_seconds())
    except (ValueError, TypeError):  # not what this escrow writes: show the row all the same
        return "?"
    return f"{seconds // 60}m{seconds % 60:02d}s"


@click.command()
@connection_options
@json_option
def requests(url: str, ca: Path, key: Path, passphrase_file: Path | None,
             as_json: bool) -> None:
    """Pending unseal requests."""
    pending = _client(url, ca, key, passphrase_file).call("GET", "/v1/requests", _PENDING)
    if as_json:
        print_json([p.model_dump() for p in pending])
        return
    table("Pending unseal requests",
          ["request", "cluster", "node", "hostname", "source", "age", "approvals", "cert expiry",
           "yours"],
          [[p.request_id, p.cluster_id, p.node_id, p.hostname, p.source, _age(p.created_at),
            f"{len(p.approvals)}/{len(p.approvals) + p.needed}"
            + (f" ({', '.join(p.approvals)})" if p.approvals else ""),
            p.cert_not_after[:10], "yes" if p.eligible else "no"] for p in pending])


def _find(client: CustodianClient, request_id: str) -> PendingRequest:
    for pending in client.call("GET", "/v1/requests", _PENDING):
        if pending.request_id == request_id:
            return pending
    raise InputError(f"request {plain(request_id)} is not among the pending requests of the "
                     "clusters where you hold a share",
                     "it may have expired, been decided or completed, or be of a cluster where "
                     "you hold no share; see `escrow requests`")


def _confirm(view: PendingRequest, verb: str, yes: bool) -> None:
    table(f"About to {verb} {view.request_id}", ["field", "value"], [
        ["cluster", view.cluster_id], ["node", view.node_id], ["hostname", view.hostname],
        ["source address", view.source], ["boot id", view.boot_id],
        ["requested", view.created_at], ["expires", view.expires_at],
        ["node certificate sha256", view.cert_sha256],
        ["approvals so far", ", ".join(view.approvals) or "none"],
    ])
    if not yes and not click.confirm(f"{verb.capitalize()} this request?", default=False):
        raise click.Abort


@click.command()
@connection_options
@click.argument("request_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts).")
def approve(url: str, ca: Path, key: Path, passphrase_file: Path | None, request_id: str,
            yes: bool) -> None:
    """Approve REQUEST_ID: releases your share of the key to that node."""
    client = _client(url, ca, key, passphrase_file)
    view = _find(client, request_id)
    _confirm(view, "approve", yes)
    signature = protocol.sign(client.key, protocol.approval_payload(Decision.APPROVE, view))
    result = client.call("POST", f"/v1/requests/{request_id}/approve", DecisionResponse,
                         ApproveRequest(signature=signature))
    click.echo(plain(f"approved {request_id}: state {result.state}, approvals "
                     f"{', '.join(result.approvals)}"))


@click.command()
@connection_options
@click.argument("request_id")
@click.option("--reason", required=True, help="Why, for the node's operators and the audit log.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts).")
def deny(url: str, ca: Path, key: Path, passphrase_file: Path | None, request_id: str,
         reason: str, yes: bool) -> None:
    """Deny REQUEST_ID: the node gets nothing more for this request."""
    reason = checked_text(reason, "--reason", 500)
    client = _client(url, ca, key, passphrase_file)
    view = _find(client, request_id)
    _confirm(view, "deny", yes)
    signature = protocol.sign(client.key, protocol.approval_payload(Decision.DENY, view, reason))
    result = client.call("POST", f"/v1/requests/{request_id}/deny", DecisionResponse,
                         DenyRequest(reason=reason, signature=signature))
    click.echo(plain(f"denied {request_id}: state {result.state}"))


@click.group()
def share() -> None:
    """Your own share, for a paper backup."""


@share.command()
@connection_options
@click.option("--cluster", "cluster_id", required=True, help="Swarm cluster id.")
def export(url: str, ca: Path, key: Path, passphrase_file: Path | None, cluster_id: str) -> None:
    """Print your share of the newest key version as a SLIP-39 mnemonic: write it on paper."""
    client = _client(url, ca, key, passphrase_file)
    ephemeral = X25519PrivateKey.generate()
    released = client.call("POST", "/v1/shares/export", ReleasedShare, ShareExportRequest(
        cluster_id=cluster_id,
        ephemeral_public_key=protocol.b64e(ephemeral.public_key().public_bytes_raw())))
    info = protocol.share_info("export", cluster_id, released.version, released.slot)
    try:
        mnemonic = protocol.HPKE.decrypt(protocol.b64d(released.sealed_share), ephemeral,
                                         info=info).decode("ascii")
    except (InvalidTag, ValueError):
        raise EscrowError("the exported share did not decrypt",
                          "the answer was altered in transit; try again") from None
    click.echo(plain(mnemonic))
    click.echo(plain(f"share of version {released.version} (fingerprint "
                     f"{released.fingerprint[:16]}) of {cluster_id}: write it down, keep it "
                     "offline, and clear this terminal"), err=True)
