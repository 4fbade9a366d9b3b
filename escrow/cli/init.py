"""``escrow init``: create a data directory, its database and the token's wrapping key."""

from __future__ import annotations

import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

import click

from escrow import config, softhsm
from escrow.audit import AuditEvent
from escrow.cli.context import actor, data_dir_option, open_store
from escrow.core import files, tls
from escrow.core.errors import ConfigError, EscrowError
from escrow.core.hsm import HsmSettings, read_pin_file
from escrow.store import Store, opening
from escrow.stored_secrets import WRAPPED_META, wrapped_secret
from escrow.vault import Vault
from escrow.wrapping import Token, resolve_pin

EMBEDDED_TOKEN = "escrow"  # noqa: S105 - a token label, not a password
EMBEDDED_PIN_FILE = "hsm-pin"


def _write_pin(data_dir: Path, pin: str) -> Path:
    """The token's PIN in a new file of the data directory, readable by its owner alone."""
    path = data_dir / EMBEDDED_PIN_FILE
    with files.atomic_file(path, new=True) as handle:
        handle.write(pin.encode() + b"\n")
    return path


def _embedded_hsm(data_dir: Path, key_label: str) -> HsmSettings:
    module = softhsm.default_module()
    pin = secrets.token_urlsafe(24)
    pin_path = _write_pin(data_dir, pin)
    conf = softhsm.create_token(data_dir / "softhsm", EMBEDDED_TOKEN, pin)
    return HsmSettings(module=module, token=EMBEDDED_TOKEN, key_label=key_label,
                       pin_file=pin_path, softhsm_conf=conf)


def _copied_hsm(data_dir: Path, source: Path, key_label: str,
                pin_file: Path | None) -> HsmSettings:
    """The first replica's SoftHSM token, copied into this data directory with its PIN."""
    pin_from = pin_file.absolute() if pin_file else source.parent / EMBEDDED_PIN_FILE
    if pin_file is None and not pin_from.exists():
        raise ConfigError(f"the token's PIN is not beside the copied token, at {pin_from}",
                          "copy the first replica's hsm-pin beside its softhsm directory, or "
                          "give --hsm-pin-file")
    # The copy's permissions are checked as the serving escrow checks its own.
    pin_path = _write_pin(data_dir, read_pin_file(pin_from, str(pin_from)).value)
    conf = softhsm.copy_token(source, data_dir / "softhsm")
    return HsmSettings(module=softhsm.default_module(), token=EMBEDDED_TOKEN,
                       key_label=key_label, pin_file=pin_path, softhsm_conf=conf)


def _hsm(data_dir: Path, module: str | None, token: str | None, pin_file: Path | None,
         key_label: str, token_from: Path | None) -> HsmSettings:
    if token_from is not None:
        return _copied_hsm(data_dir, token_from.absolute(), key_label, pin_file)
    if module is None:
        return _embedded_hsm(data_dir, key_label)
    return HsmSettings(module, str(token), key_label,
                       pin_file.absolute() if pin_file else None, None)


def _write_config(data_dir: Path, hsm: HsmSettings, retention_days: float,
                  store_url: str | None, store_password_file: Path | None) -> None:
    config.write(data_dir, hsm, retention_days)
    if store_url:
        config.update(data_dir, "store", "url", store_url)
    if store_password_file is not None:
        config.update(data_dir, "store", "password_file", str(store_password_file.absolute()))


def _check_options(hsm_module: str | None, hsm_token: str | None, hsm_pin_file: Path | None,
                   store_url: str | None, store_password_file: Path | None, join: bool,
                   token_from: Path | None) -> None:
    if hsm_module is None and hsm_token:
        raise click.UsageError("--hsm-token goes with --hsm-module")
    if hsm_module is None and token_from is None and hsm_pin_file:
        raise click.UsageError("--hsm-pin-file goes with --hsm-module, or with --token-from "
                               "(the copied token's PIN)")
    if hsm_module is not None and not hsm_token:
        raise click.UsageError("--hsm-module needs --hsm-token (the token's label)")
    if store_password_file is not None and not store_url:
        raise click.UsageError("--store-password-file goes with --store-url")
    if join and not store_url:
        raise click.UsageError("--join needs --store-url: the database the other replicas use")
    if token_from is not None and (not join or hsm_module is not None):
        raise click.UsageError("--token-from goes with --join, without --hsm-module")
    if join and hsm_module is None and token_from is None:
        raise click.UsageError("a replica must reach the same wrapping key: give --hsm-module "
                               "(a network HSM every replica logs into) or --token-from "
                               "(a copy of the first replica's DATA_DIR/softhsm)")


def _check_store(url: str, password_file: Path | None, join: bool) -> None:
    """Before anything is made: a store that holds an escrow's records is that escrow's, and
    only a replica joins it (a URL carrying a password is refused by opening it)."""
    store = opening.open_url(url, password_file, lambda: "")
    try:
        used = bool(store.latest_audit(1))
    finally:
        store.close()
    if used and not join:
        raise ConfigError("the PostgreSQL store at --store-url already holds an escrow's data",
                          "to add a replica of that escrow, run this again with --join; "
                          "otherwise give this escrow a database of its own")
    if join and not used:
        raise ConfigError("the PostgreSQL store at --store-url holds no escrow to join",
                          "initialise the first replica without --join")


def _check_same_key(store: Store, token: Token) -> None:
    """The joining replica's token opens what the store holds wrapped: the same key."""
    try:
        Vault(store, token, lambda: datetime.now(UTC), actor()).check_all_unwrap(WRAPPED_META)
    except EscrowError as exc:
        raise ConfigError(f"this token's wrapping key does not open the store's data: "
                          f"{exc.message}", "a replica needs the first replica's token (or "
                          "the same network HSM token) and --hsm-key-label") from None


@click.command()
@data_dir_option
@click.option("--hsm-module", help="PKCS#11 module of a real HSM (default: embedded SoftHSM).")
@click.option("--hsm-token", help="Label of the token to use (with --hsm-module).")
@click.option("--hsm-pin-file", type=click.Path(path_type=Path),
              help="File holding the token's user PIN, 0600 (with --hsm-module, or the "
                   "PIN of the token --token-from copies; or ESCROW_HSM_PIN, or a systemd "
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
@click.option("--join", is_flag=True,
              help="Add a replica of the escrow whose PostgreSQL store --store-url names: no "
                   "new wrapping key, deposit key or nonce key, the store's data untouched.")
@click.option("--token-from", type=click.Path(path_type=Path, file_okay=False),
              help="With --join and the embedded SoftHSM: a copy of the first replica's "
                   "DATA_DIR/softhsm directory (with its hsm-pin beside it, or give "
                   "--hsm-pin-file).")
@click.option("--exist-ok", is_flag=True,
              help="Succeed without changing anything if DIR is already initialised.")
def init(data_dir: Path, hsm_module: str | None, hsm_token: str | None,
         hsm_pin_file: Path | None, hsm_key_label: str, retention_days: float,
         store_url: str | None, store_password_file: Path | None, join: bool,
         token_from: Path | None, exist_ok: bool) -> None:
    """Create the data directory, database and HSM wrapping key.

    Without --hsm-module a SoftHSM token is created inside the data directory, with its PIN
    in DATA_DIR/hsm-pin: fine for trying the escrow out, no protection against theft of the
    directory. Production uses a real HSM.

    With --join, the data directory of another replica of an escrow on PostgreSQL: its own
    config and TLS certificate, the same store and wrapping key.

    \b
    Example:
      escrow init --data-dir ./escrow-data        # embedded SoftHSM: for trying it out
      escrow init --hsm-module /usr/lib/your-hsm/pkcs11.so --hsm-token escrow --hsm-pin-file hsm-pin
    """
    data_dir = data_dir.absolute()
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"--data-dir {data_dir} exists and is not a directory",
                          "give a new path or an existing directory for the escrow's data")
    if (data_dir / config.CONFIG_NAME).exists():
        if exist_ok:
            if not (data_dir / "tls" / "ca.pem").exists():
                tls.make_quickstart_tls(data_dir / "tls", tls.default_names())
                click.echo(f"made quickstart TLS certificates in {data_dir / 'tls'}")
            click.echo(f"{data_dir} is already initialised")
            return
        raise ConfigError(f"{data_dir} is already initialised",
                          "use it as it is, or choose another --data-dir")
    _check_options(hsm_module, hsm_token, hsm_pin_file, store_url, store_password_file, join,
                   token_from)
    if store_url:
        _check_store(store_url, store_password_file, join)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    data_dir.chmod(0o700)

    hsm = _hsm(data_dir, hsm_module, hsm_token, hsm_pin_file, hsm_key_label, token_from)
    with Token(hsm, resolve_pin(None, hsm.pin_file, os.environ)) as token:
        created = False if join else token.create_wrapping_key()
        _write_config(data_dir, hsm, retention_days, store_url, store_password_file)
        store = open_store(config.load(data_dir), create=True)
        try:
            if join:
                _check_same_key(store, token)
            store.append_audit(AuditEvent("escrow.init", actor(), "", {
                "hsm_module": hsm.module, "token": hsm.token, "key_label": hsm.key_label,
                "wrapping_key": "joined" if join else "created" if created else "existing"}))
            if not join:
                # Made now, so that a replica joining later proves its token against them.
                for name in WRAPPED_META:
                    wrapped_secret(store, token, name)
        except BaseException:
            # A replica that cannot serve leaves no data directory that looks as if it could.
            (data_dir / config.CONFIG_NAME).unlink(missing_ok=True)
            raise
        finally:
            store.close()
    ca = tls.make_quickstart_tls(data_dir / "tls", tls.default_names())
    click.echo(f"{'joined' if join else 'initialised'} {data_dir}")
    click.echo(f"  TLS: self-signed CA {ca} (give it to agents and custodians), server "
               f"certificate for {', '.join(tls.default_names())}")
    click.echo(f"  token {hsm.token!r} in {hsm.module}, wrapping key {hsm.key_label!r} "
               f"({'created' if created else 'already present'})")
    if join:
        click.echo("  replica: agents and custodians trust every replica's CA; append "
                   f"{ca} to the ca.pem they have, and add this host to their escrow URLs")
    if hsm_module is None:
        click.echo("  embedded SoftHSM token: for trying the escrow out; use a real HSM in "
                   "production")
