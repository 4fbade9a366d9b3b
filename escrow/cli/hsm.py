"""``escrow hsm ...``: the token's wrapping keys. See docs/runbooks/rotate-wrapping-key.md."""

from __future__ import annotations

import os
from pathlib import Path

import click

from escrow import config
from escrow.cli.context import actor, data_dir_option, now, open_store
from escrow.core.errors import ConfigError, Conflict, InputError, ShareAuthFailed
from escrow.lock import DataDirLock
from escrow.stored_secrets import WRAPPED_META
from escrow.vault import Vault
from escrow.wrapping import Token, resolve_pin


@click.group()
def hsm() -> None:
    """The token's wrapping keys: re-wrap every share under a new one, destroy an old one."""


@hsm.command()
@data_dir_option
@click.option("--to-label", required=True, help="Label of the new wrapping key (created in "
              "the token unless it exists).")
def rewrap(data_dir: Path, to_label: str) -> None:
    """Re-wrap every share under a new wrapping key, all or nothing, and make escrow.toml name
    it. The escrow must be stopped. The old key stays in the token until `escrow hsm
    destroy-key`.

    \b
    Example:
      escrow hsm rewrap --to-label escrow-wrap-202612    # with the escrow stopped
    """
    settings = config.load(data_dir)
    override = config.env_override("hsm", "key_label")
    if override:
        raise ConfigError(f"{override} is set and would override the label this command "
                          "writes to escrow.toml",
                          f"unset {override} (here and in the unit's environment) and run "
                          "the command again")
    old = settings.hsm.key_label
    if not to_label.strip() or to_label == old:
        raise InputError(f"the new label {to_label!r} must differ from the current one "
                         f"({old!r}) and not be empty", "choose a new label, e.g. "
                         f"{old}-{now():%Y%m}")
    with DataDirLock(data_dir, "escrow hsm rewrap"), \
            Token(settings.hsm, resolve_pin(None, settings.hsm.pin_file, os.environ)) as token:
        created = token.create_wrapping_key(to_label)
        store = open_store(settings)
        try:
            vault = Vault(store, token.wrapping_key(old), now, actor())
            count = vault.rewrap(token.wrapping_key(to_label), WRAPPED_META,
                                 from_label=old, to_label=to_label, key_created=created)
        finally:
            store.close()
        # After the database: a crash in between leaves shares that only the new key opens,
        # and running the command again finds them moved and only writes the config.
        config.update(data_dir, "hsm", "key_label", to_label)
    click.echo(f"re-wrapped {count} share(s) and the deposit key from {old!r} to {to_label!r}; "
               f"{config.CONFIG_NAME} now names {to_label!r}.")
    click.echo(f"Start the escrow, take a new backup (`escrow backup`), then destroy the old "
               f"key: escrow hsm destroy-key {old}")


@hsm.command(name="destroy-key")
@data_dir_option
@click.argument("label")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def destroy_key(data_dir: Path, label: str, yes: bool) -> None:
    """Destroy a wrapping key that no share needs any more. Irreversible: backups taken before
    the re-wrap can no longer be opened.

    \b
    Example:
      escrow hsm destroy-key escrow-wrap          # the old label, after a backup of the re-wrap
    """
    settings = config.load(data_dir)
    if label == settings.hsm.key_label:
        raise Conflict(f"{label!r} is the wrapping key the escrow uses now",
                       "re-wrap to a new key first: escrow hsm rewrap --to-label NEW")
    with Token(settings.hsm, resolve_pin(None, settings.hsm.pin_file, os.environ)) as token:
        store = open_store(settings)
        try:
            vault = Vault(store, token.wrapping_key(), now, actor())
            try:
                vault.check_all_unwrap(WRAPPED_META)
            except ShareAuthFailed as exc:
                raise Conflict(f"not every share opens with the current key "
                               f"{settings.hsm.key_label!r}: {exc.message}",
                               "nothing was destroyed; run `escrow hsm rewrap` again, or "
                               "restore the database") from None
            token.wrapping_key(label)  # names a missing key before asking
            if not yes:
                click.confirm(f"Destroy the wrapping key {label!r} for ever? Backups taken "
                              "before the re-wrap become useless", abort=True)
            token.destroy_wrapping_key(label)
            vault.record("hsm.destroy_key", label=label)
        finally:
            store.close()
    click.echo(f"destroyed the wrapping key {label!r}")
