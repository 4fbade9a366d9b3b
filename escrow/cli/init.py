"""``escrow init``: create a data directory, its database and the token's wrapping key."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import click

from escrow import config, softhsm
from escrow.audit import AuditEvent
from escrow.cli.context import actor, data_dir_option, open_store
from escrow.core import tls
from escrow.core.errors import ConfigError
from escrow.core.hsm import HsmSettings
from escrow.store import opening
from escrow.wrapping import Token, resolve_pin

EMBEDDED_TOKEN = "escrow"  # noqa: S105 - a token label, not a password
EMBEDDED_PIN_FILE = "hsm-pin"


def _embedded_hsm(data_dir: Path, key_label: str) -> HsmSettings:
    module = softhsm.default_module()
    pin = secrets.token_urlsafe(24)
    pin_path = data_dir / EMBEDDED_PIN_FILE
    fd = os.open(pin_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(pin + "\n")
    conf = softhsm.create_token(data_dir / "softhsm", EMBEDDED_TOKEN, pin)
    return HsmSettings(module=module, token=EMBEDDED_TOKEN, key_label=key_label,
                       pin_file=pin_path, softhsm_conf=conf)


def _check_options(hsm_module: str | None, hsm_token: str | None, hsm_pin_file: Path | None,
                   store_url: str | None, store_password_file: Path | None) -> None:
    if hsm_module is None and (hsm_token or hsm_pin_file):
        raise click.UsageError("--hsm-token and --hsm-pin-file go with --hsm-module")
    if hsm_module is not None and not hsm_token:
        raise click.UsageError("--hsm-module needs --hsm-token (the token's label)")
    if store_password_file is not None and not store_url:
        raise click.UsageError("--store-password-file goes with --store-url")


def _refuse_a_used_store(url: str, password_file: Path | None) -> None:
    """Before anything is made: a store that holds an escrow's records is that escrow's (and
    a URL carrying a password is refused by opening it)."""
    store = opening.open_url(url, password_file, lambda: "")
    try:
        used = bool(store.latest_audit(1))
    finally:
        store.close()
    if used:
        raise ConfigError("the PostgreSQL store at --store-url already holds an escrow's data",
                          "several replicas on one database are not supported yet: give this "
                          "escrow a database of its own, or restore the other escrow's data "
                          "directory to serve that one")


@click.command()
@data_dir_option
@click.option("--hsm-module", help="PKCS#11 module of a real HSM (default: embedded SoftHSM).")
@click.option("--hsm-token", help="Label of the token to use (with --hsm-module).")
@click.option("--hsm-pin-file", type=click.Path(path_type=Path),
              help="File holding the token's user PIN (or ESCROW_HSM_PIN, or a systemd "
                   "credential named hsm-pin).")
@click.option("--hsm-key-label", default="escrow-wrap", show_default=True,
              help="Label of the AES wrapping key inside the token.")
@click.option("--retention-days", type=click.FloatRange(min=0),
              default=config.DEFAULT_RETENTION_DAYS, show_default=True,
              help="Days a superseded key version is kept before `escrow key prune` may "
                   "destroy it.")
@click.option("--store-url",
              help="A PostgreSQL database to keep the escrow's data in, instead of DATA_DIR/"
                   "escrow.db: a libpq URL without a password (store.url).")
@click.option("--store-password-file", type=click.Path(path_type=Path),
              help="File holding the database password, 0600 (store.password_file; or a "
                   "systemd credential named store-password).")
@click.option("--exist-ok", is_flag=True,
              help="Succeed without changing anything if DIR is already initialised.")
def init(data_dir: Path, hsm_module: str | None, hsm_token: str | None,
         hsm_pin_file: Path | None, hsm_key_label: str, retention_days: float,
         store_url: str | None, store_password_file: Path | None, exist_ok: bool) -> None:
    """Create the data directory, database and HSM wrapping key.

    Without --hsm-module a SoftHSM token is created inside the data directory, with its PIN
    in DATA_DIR/hsm-pin: fine for trying the escrow out, no protection against theft of the
    directory. Production uses a real HSM.
    """
    data_dir = data_dir.absolute()
    if (data_dir / config.CONFIG_NAME).exists():
        if exist_ok:
            if not (data_dir / "tls" / "ca.pem").exists():
                tls.make_quickstart_tls(data_dir / "tls", tls.default_names())
                click.echo(f"made quickstart TLS certificates in {data_dir / 'tls'}")
            click.echo(f"{data_dir} is already initialised")
            return
        raise ConfigError(f"{data_dir} is already initialised",
                          "use it as it is, or choose another --data-dir")
    _check_options(hsm_module, hsm_token, hsm_pin_file, store_url, store_password_file)
    if store_url:
        _refuse_a_used_store(store_url, store_password_file)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    data_dir.chmod(0o700)

    if hsm_module is None:
        hsm = _embedded_hsm(data_dir, hsm_key_label)
    else:
        pin_path = hsm_pin_file.absolute() if hsm_pin_file else None
        hsm = HsmSettings(hsm_module, str(hsm_token), hsm_key_label, pin_path, None)

    with Token(hsm, resolve_pin(None, hsm.pin_file, os.environ)) as token:
        created = token.create_wrapping_key()
    config.write(data_dir, hsm, retention_days)
    if store_url:
        config.update(data_dir, "store", "url", store_url)
    if store_password_file is not None:
        config.update(data_dir, "store", "password_file", str(store_password_file.absolute()))
    settings = config.load(data_dir)
    store = open_store(settings, create=True)
    try:
        store.append_audit(AuditEvent("escrow.init", actor(), "", {
            "hsm_module": hsm.module, "token": hsm.token, "key_label": hsm.key_label,
            "wrapping_key": "created" if created else "existing"}))
    finally:
        store.close()
    ca = tls.make_quickstart_tls(data_dir / "tls", tls.default_names())
    click.echo(f"initialised {data_dir}")
    click.echo(f"  TLS: self-signed CA {ca} (give it to agents and custodians), server "
               f"certificate for {', '.join(tls.default_names())}")
    click.echo(f"  token {hsm.token!r} in {hsm.module}, wrapping key {hsm.key_label!r} "
               f"({'created' if created else 'already present'})")
    if hsm_module is None:
        click.echo("  embedded SoftHSM token: for trying the escrow out; use a real HSM in "
                   "production")
