"""Custodian commands that talk to a running escrow: ``escrow requests``, ``approve``, ``deny``
and ``share export``. Each request is signed with the custodian's own key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import TypeAdapter

from escrow import custodian_keys
from escrow.api_client import CustodianClient
from escrow.cli.context import age_of, checked_text, json_option, print_json, read_file, table
from escrow.cli.custodian import read_passphrase
from escrow.core import bursts, protocol
from escrow.core.errors import EscrowError, InputError
from escrow.core.plaintext import plain
from escrow.core.protocol import (
    MAX_BATCH,
    ApproveRequest,
    BatchApproval,
    BatchApproveRequest,
    BatchApproveResponse,
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
        click.option("--passphrase-file", envvar="ESCROW_PASSPHRASE_FILE", show_envvar=True,
                     type=click.Path(path_type=Path),
                     help="File holding your key's passphrase (default: prompt, no echo; "
                          "for scripts and drills, never a shared file)."),
    ]):
        func = option(func)
    return func


def custodian_client(url: str, ca: Path, key: Path, passphrase_file: Path | None
                     ) -> CustodianClient:
    """The escrow, as the custodian whose key file this is (passphrase prompted)."""
    private = custodian_keys.load_private(read_file(key, "private key"),
                                          read_passphrase(passphrase_file, confirm=False))
    return CustodianClient(url, str(ca), private)


def _approvals(p: PendingRequest) -> str:
    return (f"{len(p.approvals)}/{len(p.approvals) + p.needed}"
            + (f" ({_approvers(p)})" if p.approvals else "")
            + (f"; approved by default at {p.approves_by_default_at} unless denied"
               if p.approves_by_default_at else ""))


def _approvers(p: PendingRequest) -> str:
    """Who approved, an approval a maintenance window gave named as such."""
    return ", ".join(f"{name} (window {p.window_approvals[name]})"
                     if name in p.window_approvals else name for name in p.approvals)


@click.command()
@connection_options
@json_option
def requests(url: str, ca: Path, key: Path, passphrase_file: Path | None,
             as_json: bool) -> None:
    """Pending unseal requests, by cluster; says when several managers of one cluster locked
    together (a power cut), which `escrow approve --cluster C --all` approves at once.

    \b
    Example:
      escrow requests --url https://escrow.example:8443 --ca ca.pem --key alice.key
    """
    pending = custodian_client(url, ca, key, passphrase_file).call("GET", "/v1/requests", _PENDING)
    if as_json:
        print_json([p.model_dump() for p in pending])
        return
    if not pending:
        click.echo("no pending unseal requests in the clusters where you hold a share")
        return
    for group in bursts.by_cluster(pending):
        table(f"Cluster {group.cluster_id}: {len(group.requests)} pending",
              ["request", "node", "hostname", "source", "age", "approvals", "cert expiry",
               "yours"],
              [[p.request_id, p.node_id, p.hostname, p.source, age_of(p.created_at),
                _approvals(p), p.cert_not_after[:10], "yes" if p.eligible else "no"]
               for p in group.requests])
        if group.locked_together:
            minutes = max(1, round(group.span.total_seconds() / 60))
            click.echo(plain(f"{group.nodes} managers of {group.cluster_id} locked within "
                             f"{minutes} min of each other (a power cut?): approve them "
                             f"together with `escrow approve --cluster {group.cluster_id} "
                             "--all`"))


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
        ["node certificate serial", view.cert_serial],
        ["approvals so far", _approvers(view) or "none"],
        ["approved by default at", view.approves_by_default_at or "never (no deny window)"],
    ])
    if not yes and not click.confirm(f"{verb.capitalize()} this request?", default=False):
        raise click.Abort


def _approve_one(client: CustodianClient, request_id: str, yes: bool) -> None:
    view = _find(client, request_id)
    _confirm(view, "approve", yes)
    signature = protocol.sign(client.key, protocol.approval_payload(Decision.APPROVE, view))
    result = client.call("POST", f"/v1/requests/{request_id}/approve", DecisionResponse,
                         ApproveRequest(signature=signature))
    click.echo(plain(f"approved {request_id}: state {result.state}, approvals "
                     f"{', '.join(result.approvals)}"))


def _approve_cluster(client: CustodianClient, cluster_id: str, yes: bool) -> None:
    """Every pending request of the cluster you may approve and have not, shown in one table,
    confirmed once, then each signed over its own facts and sent in one batch."""
    listed = [p for p in client.call("GET", "/v1/requests", _PENDING)
              if p.cluster_id == cluster_id and p.eligible and not p.decided]
    if not listed:
        raise InputError(f"no pending request of cluster {plain(cluster_id)} awaits your "
                         "approval", "see `escrow requests`; requests you approved already "
                         "are not listed again")
    mine = bursts.by_cluster(listed)[0].requests[:MAX_BATCH]
    table(f"About to approve {len(mine)} request(s) of cluster {cluster_id}",
          ["request", "node", "hostname", "boot id", "age", "source", "cert serial",
           "approvals"],
          [[p.request_id, p.node_id, p.hostname, p.boot_id, age_of(p.created_at), p.source,
            p.cert_serial, _approvals(p)] for p in mine])
    if not yes and not click.confirm(f"Approve all {len(mine)} of them?", default=False):
        raise click.Abort
    answer = client.call("POST", "/v1/requests/approve", BatchApproveResponse,
                         BatchApproveRequest(cluster_id=cluster_id, approvals=[
                             BatchApproval(request_id=p.request_id, signature=protocol.sign(
                                 client.key, protocol.approval_payload(Decision.APPROVE, p)))
                             for p in mine]))
    refused = [r for r in answer.results if r.error]
    for result in answer.results:
        click.echo(plain(f"refused {result.request_id}: {result.message}" if result.error else
                         f"approved {result.request_id}: state {result.state}, approvals "
                         f"{', '.join(result.approvals)}"))
    click.echo(plain(f"batch {answer.batch_id}: {len(answer.results) - len(refused)} "
                     f"approved, {len(refused)} refused"))
    if refused:
        raise EscrowError(f"{len(refused)} of the {len(answer.results)} approvals were "
                          "refused (see above)", "see `escrow requests` for what is still "
                          "pending; a superseded request's node has asked again")


@click.command()
@connection_options
@click.argument("request_id", required=False)
@click.option("--cluster", "cluster_id", help="With --all: the cluster whose requests to "
              "approve.")
@click.option("--all", "every", is_flag=True, help="Approve every pending request of --cluster "
              "(after a power cut), each bound to its own request; asks once.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts).")
def approve(url: str, ca: Path, key: Path, passphrase_file: Path | None,
            request_id: str | None, cluster_id: str | None, every: bool, yes: bool) -> None:
    """Approve REQUEST_ID, or with --cluster C --all every pending request of C: releases your
    share of the key to those nodes.

    \b
    Example:
      escrow approve r-...                        # shows the request, asks, signs, releases
      escrow approve --cluster CLUSTER_ID --all   # after a power cut: every manager, asked once
    """
    if request_id is not None and (cluster_id or every):
        raise click.UsageError("give REQUEST_ID or --cluster C --all, not both")
    if request_id is None and not (cluster_id and every):
        raise click.UsageError("give REQUEST_ID, or --cluster C --all for every pending "
                               "request of cluster C")
    client = custodian_client(url, ca, key, passphrase_file)
    if request_id is not None:
        _approve_one(client, request_id, yes)
    elif cluster_id:
        _approve_cluster(client, cluster_id, yes)


@click.command()
@connection_options
@click.argument("request_id")
@click.option("--reason", required=True, help="Why, for the node's operators and the audit log.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (scripts).")
def deny(url: str, ca: Path, key: Path, passphrase_file: Path | None, request_id: str,
         reason: str, yes: bool) -> None:
    """Deny REQUEST_ID: the node gets nothing more for this request.

    \b
    Example:
      escrow deny r-... --reason "not a planned restart"
    """
    reason = checked_text(reason, "--reason", 500)
    client = custodian_client(url, ca, key, passphrase_file)
    view = _find(client, request_id)
    _confirm(view, "deny", yes)
    signature = protocol.sign(client.key, protocol.approval_payload(Decision.DENY, view, reason))
    result = client.call("POST", f"/v1/requests/{request_id}/deny", DecisionResponse,
                         DenyRequest(reason=reason, signature=signature))
    click.echo(plain(f"denied {request_id}: state {result.state}"))


@click.group()
def share() -> None:
    """Your own share: its paper backup, and drills proving the paper still matches."""


@share.command()
@connection_options
@click.option("--cluster", "cluster_id", required=True, help="Swarm cluster id.")
def export(url: str, ca: Path, key: Path, passphrase_file: Path | None, cluster_id: str) -> None:
    """Print your share of the newest key version as a SLIP-39 mnemonic: write it on paper.

    \b
    Example:
      escrow share export --cluster CLUSTER_ID    # then clear the terminal
    """
    client = custodian_client(url, ca, key, passphrase_file)
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
