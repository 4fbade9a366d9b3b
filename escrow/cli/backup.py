"""``escrow backup`` and ``escrow restore``: the data directory, without the token or any
private key."""

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
    """Back up the data directory: a consistent database snapshot, config and TLS certificates.

    The token (the wrapping key) and its PIN are not included: back the token up apart from
    this file, as your HSM's documentation says. Nor is the TLS private key: a stolen backup
    must not let anyone pass for the escrow; a restore issues a new one. For an escrow on
    PostgreSQL (store.url) the database is not included either: back it up with pg_dump
    (README). Safe while `escrow serve` runs.

    \b
    Example:
      escrow backup --out escrow.backup           # back the token and its PIN up apart
    """
    settings = config.load(data_dir)
    store = open_store(settings)
    try:
        store.append_audit(AuditEvent("escrow.backup", actor(), "", {"file": str(out)}))
    finally:
        store.close()
    manifest = backups.create(settings, out, now)
    on_postgresql = manifest.store == "postgresql"
    click.echo(f"wrote {out}: {len(manifest.files)} files, audit log of "
               f"{manifest.audit_records} records ending {manifest.audit_head}"
               f"{' (read from PostgreSQL)' if on_postgresql else ''}")
    tls = settings.data_dir / backups.TLS_DIR
    left_out = sorted(f"{backups.TLS_DIR}/{p.name}" for p in tls.glob("*")
                      if p.is_file() and f"{backups.TLS_DIR}/{p.name}" not in manifest.files)
    if on_postgresql:
        left_out.append("the PostgreSQL database (back it up with `pg_dump --format=custom`, "
                        "as README says)")
    click.echo(f"left out: {', '.join([*left_out, 'the token and its PIN'])} (a restore "
               "issues a new TLS key; back the token up separately); "
               f"{'the dump' if on_postgresql else 'it'} still holds the enrollments and the "
               "audit log: keep it private", err=True)


@click.command()
@data_dir_option
@click.option("--from", "source", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              required=True, help="Backup file made by `escrow backup`.")
def restore(data_dir: Path, source: Path) -> None:
    """Recreate the data directory from a backup, all or nothing.

    The directory must not hold an escrow yet. Every file is checked against the backup's
    manifest and the audit chain is verified before anything is written. Bring the token back
    (same module, label and PIN in escrow.toml) before `escrow serve`.

    \b
    Example:
      escrow restore --data-dir /var/lib/escrow --from escrow.backup
    """
    manifest = backups.restore(source, data_dir.absolute(), now, actor())
    click.echo(f"restored {data_dir} from {source} (made {manifest.created_at}; audit log of "
               f"{manifest.audit_records} records ending {manifest.audit_head})")
    if manifest.store == "postgresql":
        settings = config.load(data_dir.absolute())
        password = (f", with its password back in {settings.store.password_file}"
                    if settings.store.password_file is not None else "")
        click.echo(f"the database is not in this backup: restore it with pg_restore (if not "
                   f"done yet) into the database store.url names{password} (README, \"Backing "
                   "up and restoring a PostgreSQL escrow\"), then check it with `escrow audit "
                   "verify`", err=True)
    click.echo("now make the token available as escrow.toml names it, then start the escrow; "
               "/healthz checks that the wrapping key answers", err=True)
    _tls_key_advice(data_dir.absolute(), manifest)


def _tls_key_advice(data_dir: Path, manifest: backups.Manifest) -> None:
    """Say what to do about the TLS private key, which backups leave out."""
    key = config.load(data_dir).server.tls_key
    if key.exists():
        restored = [name for name in manifest.files if name.startswith(backups.TLS_DIR + "/")
                    and backups.holds_private_key(data_dir / name)]
        if restored:
            click.echo(f"warning: this backup holds a TLS private key ({', '.join(restored)}; "
                       "made before backups left it out): whoever has a copy of it can pass "
                       "for this escrow; issue a new key and certificate as "
                       "docs/runbooks/escrow-rebuilt.md says", err=True)
        return
    tls = data_dir / backups.TLS_DIR
    click.echo(
        f"the TLS private key was not in the backup ({key} does not exist): backups leave it "
        "out so that a stolen backup cannot pass for the escrow. Before starting the escrow, "
        "give it a server key and certificate: put back the key you keep apart from backups, "
        "or issue a new one from your CA (server.tls_key, server.tls_cert), or, with the "
        f"quickstart CA (its key was never kept), make a new CA and certificate: `mv {tls} "
        f"{tls}.from-backup && escrow init --data-dir {data_dir} --exist-ok`, then give the "
        f"new {tls / 'ca.pem'} to every agent (escrow_ca) and custodian (--ca)", err=True)
