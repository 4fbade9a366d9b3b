"""``escrow node ...``: enrolled managers, and revoking or re-admitting them."""

from __future__ import annotations

from pathlib import Path

import click

from escrow.audit import AuditEvent
from escrow.cli.context import (
    checked_text,
    data_dir_option,
    json_option,
    open_vault,
    print_json,
    table,
)
from escrow.core.plaintext import plain
from escrow.core.states import NodeStatus
from escrow.service.liveness import liveness

_cluster = click.option("--cluster", "cluster_id", required=True, help="Swarm cluster id.")


@click.group()
def node() -> None:
    """Enrolled manager nodes."""


@node.command(name="list")
@data_dir_option
@json_option
def list_(data_dir: Path, as_json: bool) -> None:
    """List enrolled nodes, with what their heartbeats say: unlocked, locked, or unreachable
    (no beat for three of the node's intervals, or its agent said goodbye).

    \b
    Example:
      escrow node list --json
    """
    with open_vault(data_dir) as (_, vault):
        nodes = vault.store.list_nodes()
        beats = vault.store.latest_heartbeats()
        now = vault.clock()
    rows = []
    for n in nodes:
        beat = beats.get((n.cluster_id, n.node_id))
        rows.append({"cluster_id": n.cluster_id, "node_id": n.node_id, "hostname": n.hostname,
                     "status": n.status, "liveness": liveness(beat, now),
                     "last_heartbeat": beat.last_at if beat else "",
                     "boot_id": beat.boot_id if beat else "",
                     "agent_version": beat.agent_version if beat else "",
                     "enrolled_at": n.enrolled_at})
    if as_json:
        print_json(rows)
    else:
        table("Nodes", ["cluster", "node", "hostname", "status", "liveness", "last heartbeat",
                        "boot id", "agent", "enrolled"],
              [list(r.values()) for r in rows])


def _set(data_dir: Path, cluster_id: str, node_id: str, status: NodeStatus,
         reason: str) -> None:
    if reason:
        checked_text(reason, "--reason", 500)
    with open_vault(data_dir) as (_, vault):
        event = "node.revoke" if status == NodeStatus.REVOKED else "node.allow"
        vault.store.set_node_status(cluster_id, node_id, status, AuditEvent(
            event, vault.actor, cluster_id, {"node_id": node_id, "reason": reason}))


@node.command()
@data_dir_option
@_cluster
@click.argument("node_id")
@click.option("--reason", default="", help="Why, for the audit log.")
def revoke(data_dir: Path, cluster_id: str, node_id: str, reason: str) -> None:
    """Revoke NODE_ID: it gets nothing, and its pending requests end.

    \b
    Example:
      escrow node revoke --cluster CLUSTER_ID NODE_ID --reason "disk stolen"
    """
    _set(data_dir, cluster_id, node_id, NodeStatus.REVOKED, reason)
    click.echo(f"node {plain(node_id)} revoked; rotate the unlock key if the node may be "
               "compromised")


@node.command()
@data_dir_option
@_cluster
@click.argument("node_id")
@click.option("--reason", default="", help="Why, for the audit log.")
def allow(data_dir: Path, cluster_id: str, node_id: str, reason: str) -> None:
    """Re-admit a revoked or quarantined NODE_ID (shut a suspected copy down first).

    \b
    Example:
      escrow node allow --cluster CLUSTER_ID NODE_ID --reason "the copy was shut down"
    """
    _set(data_dir, cluster_id, node_id, NodeStatus.ACTIVE, reason)
    click.echo(f"node {plain(node_id)} re-admitted")
