"""Each ``[[webhooks]]`` receiver with its signing secret, read when the server starts: from a
file of its own (not readable by every user, as the HSM PIN's) or a systemd credential, never
from the command line, the environment or escrow.toml itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from escrow.core.errors import ConfigError
from escrow.core.hsm import Pin, credential_pin, read_pin_file
from escrow.notifications.events import EventKind
from escrow.notifications.settings import TABLE, WebhookSettings

# 128 bits as hex: shorter secrets are refused, so that a typo or a placeholder signs nothing.
MIN_SECRET_CHARACTERS = 32


@dataclass(frozen=True)
class Receiver:
    name: str
    url: str = field(repr=False)  # may carry the receiver's token
    events: frozenset[EventKind]
    secret: bytes = field(repr=False)

    def wants(self, kind: EventKind) -> bool:
        return kind in self.events


def open_receivers(webhooks: Sequence[WebhookSettings],
                   env: Mapping[str, str]) -> tuple[Receiver, ...]:
    return tuple(Receiver(w.name, w.url, w.events, _secret(w, env).value.encode())
                 for w in webhooks)


def _secret(webhook: WebhookSettings, env: Mapping[str, str]) -> Pin:
    what = f"webhook {webhook.name} secret"
    if webhook.secret_file is not None:
        secret = read_pin_file(webhook.secret_file, f"{TABLE} {webhook.name} secret_file",
                               f"secret_file of the [[{TABLE}]] table {webhook.name}", what)
    else:
        credential = webhook.secret_credential
        found = credential_pin(env, credential, f"LoadCredential={credential}:FILE", what)
        if found is None:
            raise ConfigError(f"the systemd credential {credential} ({what}) is not there",
                              f"add LoadCredential={credential}:/etc/escrow/{credential} to the "
                              "escrow's unit, or give the table a secret_file instead")
        secret = found
    if len(secret.value) < MIN_SECRET_CHARACTERS:
        raise ConfigError(f"the {what} ({secret.source}) is shorter than "
                          f"{MIN_SECRET_CHARACTERS} characters",
                          "make one with `openssl rand -hex 32`, and give the receiver the same")
    return secret
