"""``escrow backup`` and ``escrow restore``: the data directory, without the token."""

from __future__ import annotations

from pathlib import Path

import click

from escrow import backup as backups
from escrow import config
from escrow.audit import AuditEvent
from escrow.cli.context import actor, data_dir_option, now, open_store


@click.command()
@data_dir_option
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Backup file to write (a new file; created readable by you only).")
def backup(data_dir: Path, out: Path) -> None:
    """Back up the data directory: a consistent database snapshot, config and TLS files.

    The token (the wrapping key) and its PIN are not included: back the token up apart from
    this file, as your HSM's documentation says. Safe while `escrow serve` runs.
    """
    settings = config.load(data_dir)
    store = open_store(settings)
    try:
        store.append_audit(AuditEvent("escrow.backup", actor(), "", {"file": str(out)}))
    finally:
        store.close()
    manifest = backups.create(settings.data_dir, out, now)
    click.echo(f"wrote {out}: {len(manifest.files)} files, audit log of "
               f"{manifest.audit_records} records ending {manifest.audit_head}")
    click.echo("it holds the TLS private keys: keep it as safe as the data directory; the token "
               "and its PIN are not in it: back them up separately", err=True)


@click.command()
@data_dir_option
@click.option("--from", "source", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              required=True, help="Backup file made by `escrow backup`.")
def restore(data_dir: Path, source: Path) -> None:
    """Recreate the data directory from a backup, all or nothing.

    The directory must not hold an escrow yet. Every file is checked against the backup's
    manifest and the audit chain is verified before anything is written. Bring the token back
    (same module, label and PIN in escrow.toml) before `escrow serve`.
    """
    manifest = backups.restore(source, data_dir.absolute(), now, actor())
    click.echo(f"restored {data_dir} from {source} (made {manifest.created_at}; audit log of "
               f"{manifest.audit_records} records ending {manifest.audit_head})")
    click.echo("now make the token available as escrow.toml names it, then start the escrow; "
               "/healthz checks that the wrapping key answers", err=True)
