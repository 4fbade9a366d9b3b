"""``escrow cluster ...``: swarms, their pinned root CA and their Shamir policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from escrow import identity
from escrow.cli.context import (
    checked_text,
    data_dir_option,
    json_option,
    open_vault,
    print_json,
    read_file,
    table,
)
from escrow.core.durations import describe, parse_duration
from escrow.core.timestamps import timestamp
from escrow.policy import parse_slots
from escrow.store import ClusterRecord

_no_paper = click.option(
    "--allow-no-paper-recovery", is_flag=True,
    help="Accept a policy in which custodians alone cannot reach the threshold: if the escrow "
         "or its HSM is lost, the key cannot be rebuilt from paper shares.")
_threshold = click.option("--threshold", "-t", required=True, type=int,
                          help="Shares needed to rebuild the key.")
_slots = click.option("--slots", required=True,
                      help="Comma-separated share slots: 'auto' or a custodian name, e.g. "
                           "auto,auto,alice,bob,carol.")


@click.group()
def cluster() -> None:
    """Register swarms and set their policies."""


def _describe(record: ClusterRecord) -> dict[str, Any]:
    root = identity.parse_root_ca(record.root_ca_pem.encode("ascii"))
    return {
        "cluster_id": record.cluster_id,
        "threshold": record.policy.threshold,
        "slots": list(record.policy.slots),
        "paper_recoverable": record.policy.paper_recoverable,
        "root_ca_subject": root.subject.rfc4514_string(),
        "root_ca_not_after": timestamp(root.not_valid_after_utc),
        "created_at": record.created_at,
        "approve_after_seconds": record.approve_after_seconds,
    }


def _deny_window(seconds: int) -> str:
    return f"approves after {describe(seconds)} unless denied" if seconds else "off"


@cluster.command()
@data_dir_option
@click.argument("cluster_id")
@click.option("--root-ca", required=True, type=click.Path(path_type=Path),
              help="The cluster's swarm-root-ca.crt, pinned for node identity checks.")
@_threshold
@_slots
@_no_paper
def add(data_dir: Path, cluster_id: str, root_ca: Path, threshold: int, slots: str,
        allow_no_paper_recovery: bool) -> None:
    """Register swarm CLUSTER_ID with its root CA and policy.

    \b
    Example:
      escrow cluster add CLUSTER_ID --root-ca /srv/swarm-root-ca.crt \\
          --threshold 2 --slots auto,auto,alice,bob,carol   # auto unseal; any two recover
    """
    # The id's own rule (escrow.identity) comes next; this one also refuses a trailing newline.
    checked_text(cluster_id, "CLUSTER_ID", 1000, min_length=0)
    checked_text(slots, "--slots", 4096, min_length=0)
    with open_vault(data_dir) as (_, vault):
        record = vault.add_cluster(cluster_id, read_file(root_ca, "root CA file"), threshold,
                                   parse_slots(slots), allow_no_paper=allow_no_paper_recovery)
    click.echo(f"cluster {cluster_id} added: {record.policy.describe()}")
    if not record.policy.paper_recoverable:
        click.echo("warning: custodians alone cannot rebuild this key from paper", err=True)


@cluster.command(name="set-policy")
@data_dir_option
@click.argument("cluster_id")
@_threshold
@_slots
@_no_paper
def set_policy(data_dir: Path, cluster_id: str, threshold: int, slots: str,
               allow_no_paper_recovery: bool) -> None:
    """Change the policy for key versions deposited from now on.

    Existing versions keep the shares they were split into: rotate the unlock key to re-split.

    \b
    Example:
      escrow cluster set-policy CLUSTER_ID --threshold 3 --slots auto,auto,alice,bob,carol
      unseal-agent rotate                         # on a manager: re-split under the new policy
    """
    checked_text(slots, "--slots", 4096, min_length=0)
    with open_vault(data_dir) as (_, vault):
        policy = vault.set_policy(cluster_id, threshold, parse_slots(slots),
                                  allow_no_paper=allow_no_paper_recovery)
    click.echo(f"cluster {cluster_id}: new policy {policy.describe()}")
    click.echo("existing key versions keep their old shares: rotate the unlock key "
               "(`unseal-agent rotate` or `docker swarm unlock-key --rotate`) to re-split")


@cluster.command(name="list")
@data_dir_option
@json_option
def list_(data_dir: Path, as_json: bool) -> None:
    """List registered clusters.

    \b
    Example:
      escrow cluster list --json
    """
    with open_vault(data_dir) as (_, vault):
        rows = [_describe(r) for r in vault.store.list_clusters()]
    if as_json:
        print_json(rows)
    else:
        table("Clusters", ["cluster", "threshold", "slots", "paper recovery", "deny window",
                           "registered"],
              [[r["cluster_id"], r["threshold"], ",".join(r["slots"]),
                "yes" if r["paper_recoverable"] else "NO",
                _deny_window(r["approve_after_seconds"]), r["created_at"]] for r in rows])


@cluster.command()
@data_dir_option
@json_option
@click.argument("cluster_id")
def show(data_dir: Path, as_json: bool, cluster_id: str) -> None:
    """Show one cluster: policy, root CA and key versions.

    \b
    Example:
      escrow cluster show CLUSTER_ID
    """
    with open_vault(data_dir) as (_, vault):
        info = _describe(vault.store.get_cluster(cluster_id))
        info["key_versions"] = [v.version for v in vault.store.list_key_versions(cluster_id)]
    if as_json:
        print_json(info)
        return
    table(f"Cluster {cluster_id}", ["field", "value"], [
        ["policy", f"{info['threshold']} of {len(info['slots'])}: {','.join(info['slots'])}"],
        ["paper recovery", "yes" if info["paper_recoverable"] else "NO"],
        ["deny window", _deny_window(info["approve_after_seconds"])],
        ["root CA", info["root_ca_subject"]],
        ["root CA expires", info["root_ca_not_after"]],
        ["key versions", ", ".join(map(str, info["key_versions"])) or "none yet"],
        ["registered", info["created_at"]],
    ])


@cluster.command(name="set")
@data_dir_option
@click.argument("cluster_id")
@click.option("--approve-after", required=True,
              help="Deny window: requests that need custodians proceed this long after they "
                   "were made unless one denies them (1m to 24h), or 'off' (the default).")
def set_(data_dir: Path, cluster_id: str, approve_after: str) -> None:
    """Set CLUSTER_ID's deny window.

    With one, anyone holding a manager's identity who can wait out the delay while no
    custodian is watching unlocks it (docs/threat-model.md, "The deny window").

    \b
    Example:
      escrow cluster set CLUSTER_ID --approve-after 15m    # 1m to 24h, or off
    """
    checked_text(cluster_id, "CLUSTER_ID", 1000, min_length=0)
    seconds = (0 if approve_after.strip().lower() == "off"
               else parse_duration(approve_after, "--approve-after"))
    with open_vault(data_dir) as (_, vault):
        vault.set_approve_after(cluster_id, seconds)
    click.echo(f"cluster {cluster_id}: deny window {_deny_window(seconds)}")
    if seconds:
        click.echo("requests that need approvals now proceed after the delay unless a "
                   "custodian denies them (`escrow deny`)", err=True)
