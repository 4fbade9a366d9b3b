"""``escrow audit ...``: read and verify the hash-chained audit log."""

from __future__ import annotations

from pathlib import Path

import click

from escrow import audit as chain
from escrow.cli.context import data_dir_option, json_option, open_vault, print_json, table
from escrow.errors import AuditChainBroken


@click.group()
def audit() -> None:
    """The append-only, hash-chained audit log."""


@audit.command()
@data_dir_option
@json_option
def verify(data_dir: Path, as_json: bool) -> None:
    """Check the whole chain; name every edited, deleted or reordered record."""
    with open_vault(data_dir) as (_, vault):
        records = vault.store.audit_records()
    problems = chain.verify(records)
    head = chain.head(records)
    if as_json:
        print_json({"records": len(records), "head": head, "ok": not problems,
                    "problems": [{"seq": p.seq, "kind": p.kind, "message": p.message}
                                 for p in problems]})
    if problems:
        for problem in problems:
            click.echo(f"problem: {problem.message}", err=True)
        raise AuditChainBroken(
            f"the audit log has {len(problems)} problem(s) in {len(records)} records",
            "treat the database as tampered with: compare with the journal copy and a backup",
        )
    if not as_json:
        click.echo(f"audit log intact: {len(records)} records, head {head}")
        click.echo("keep the head hash somewhere else: it proves later that no record was cut "
                   "off the end")


@audit.command()
@data_dir_option
@json_option
@click.option("--cluster", "cluster_id", help="Only records about this cluster.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Newest records to show.")
def show(data_dir: Path, as_json: bool, cluster_id: str | None, limit: int) -> None:
    """Show the newest audit records."""
    with open_vault(data_dir) as (_, vault):
        records = vault.store.audit_records()
    if cluster_id:
        records = [r for r in records if r.cluster_id == cluster_id]
    records = records[-limit:]
    if as_json:
        print_json([{"seq": r.seq, "time": r.timestamp, "event": r.event, "actor": r.actor,
                     "cluster_id": r.cluster_id, "details": r.details, "hash": r.hash}
                    for r in records])
        return
    table("Audit log", ["seq", "time", "event", "actor", "cluster", "details"],
          [[r.seq, r.timestamp, r.event, r.actor, r.cluster_id or "-", r.details_json]
           for r in records])
