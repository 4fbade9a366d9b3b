"""``escrow deposit`` and ``escrow key ...``: key versions of a cluster."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click

from escrow.cli.context import (
    data_dir_option,
    json_option,
    open_vault,
    print_json,
    read_secret_line,
    table,
)
from escrow.core import unlockkey
from escrow.core.errors import InputError
from escrow.core.timestamps import timestamp

_cluster = click.option("--cluster", "cluster_id", required=True, help="Swarm cluster id.")


@click.command()
@data_dir_option
@_cluster
def deposit(data_dir: Path, cluster_id: str) -> None:
    """Escrow an unlock key read from standard input (`docker swarm unlock-key -q | ...`).

    \b
    Example:
      docker swarm unlock-key -q | escrow deposit --cluster CLUSTER_ID
    """
    with open_vault(data_dir) as (_, vault):
        vault.store.get_cluster(cluster_id)
        try:
            key = unlockkey.parse(read_secret_line("Unlock key (SWMKEY-1-...)"))
        except InputError as error:
            vault.reject_deposit(cluster_id, error)
            raise
        result = vault.deposit(cluster_id, key)
        del key
    if result.created:
        click.echo(f"stored as version {result.version} of {cluster_id} "
                   f"(fingerprint {result.fingerprint[:16]})")
    else:
        click.echo(f"already stored as version {result.version} of {cluster_id}: nothing added")


@click.group()
def key() -> None:
    """Key versions: history and pruning."""


@key.command(name="list")
@data_dir_option
@json_option
@_cluster
def list_(data_dir: Path, as_json: bool, cluster_id: str) -> None:
    """Key versions of a cluster, newest first.

    \b
    Example:
      escrow key list --cluster CLUSTER_ID
    """
    with open_vault(data_dir) as (settings, vault):
        history = vault.history(cluster_id, timedelta(days=settings.retention_days))
    rows = [{
        "version": info.record.version,
        "created_at": info.record.created_at,
        "fingerprint": info.fingerprint_prefix,
        "threshold": info.record.policy.threshold,
        "slots": list(info.record.policy.slots),
        "superseded_at": timestamp(info.superseded_at) if info.superseded_at else None,
        "destroy_after": timestamp(info.destroy_after) if info.destroy_after else None,
    } for info in history]
    if as_json:
        print_json(rows)
        return
    table(f"Key versions of {cluster_id} (newest first)",
          ["version", "created", "fingerprint", "policy", "status"],
          [[info.record.version, info.record.created_at, info.fingerprint_prefix,
            info.record.policy.describe(),
            "current" if info.destroy_after is None
            else f"superseded, destroyable after {timestamp(info.destroy_after)}"]
           for info in history])


@key.command()
@data_dir_option
@_cluster
@click.option("--retention-days", type=click.FloatRange(min=0),
              help="Override keys.retention_days from escrow.toml.")
@click.option("--dry-run", is_flag=True, help="Say what would be destroyed; destroy nothing.")
def prune(data_dir: Path, cluster_id: str, retention_days: float | None, dry_run: bool) -> None:
    """Destroy key versions superseded longer ago than the retention period.

    The newest version is never destroyed, nor a version that an enrolled node last unlocked
    with. A manager that was down during a rotation needs the version it was locked with: keep
    the retention longer than any planned outage.

    \b
    Example:
      escrow key prune --cluster CLUSTER_ID --dry-run    # say what would go; destroy nothing
    """
    with open_vault(data_dir) as (settings, vault):
        days = settings.retention_days if retention_days is None else retention_days
        pruned = vault.prune(cluster_id, timedelta(days=days), dry_run=dry_run)
    for version, nodes in sorted(pruned.kept.items()):
        click.echo(f"kept version {version} past retention: node(s) {', '.join(sorted(nodes))} "
                   "last unlocked with it")
    if not pruned.destroyed:
        click.echo(f"nothing to prune in {cluster_id} (retention {days:g} days)")
    else:
        verb = "would destroy" if dry_run else "destroyed"
        click.echo(f"{verb} version(s) {', '.join(map(str, pruned.destroyed))} of {cluster_id}")
