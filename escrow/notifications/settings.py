"""``[[webhooks]]`` in escrow.toml: one table per receiver (pure; escrow.config reads the
file, escrow.notifications.receivers the secrets when the server starts).

    [[webhooks]]
    name = "oncall"                      # its name in /metrics and the log (never the URL)
    url = "https://chat.example/hooks/T0/B0/XXXX"
    events = ["requested", "expired"]    # what it hears of; default: every event
    secret_file = "webhook-oncall.secret"  # 0600; relative to the data directory or absolute
    # or, for a service: secret_credential = "webhook-oncall" (LoadCredential=)

The URL is the operator's and may carry the receiver's token: no message here quotes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from escrow.core.errors import ConfigError
from escrow.core.plaintext import UNSAFE
from escrow.notifications.events import EventKind

TABLE = "webhooks"
KEYS = ("name", "url", "events", "secret_file", "secret_credential")
# A metric label and a log word; a credential name is a file name in $CREDENTIALS_DIRECTORY.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
EXAMPLE = ('[[webhooks]] with name = "oncall", url = "https://chat.example/hooks/...", '
           'secret_file = "webhook-oncall.secret" (README, "Notifications")')
RETIRED_HINT = ("receivers are [[webhooks]] tables now, each with its own signing secret: "
                f"replace server.webhook_url with {EXAMPLE}")


@dataclass(frozen=True)
class WebhookSettings:
    name: str
    url: str = field(repr=False)  # may carry the receiver's token
    events: frozenset[EventKind] = frozenset(EventKind)
    secret_file: Path | None = None
    secret_credential: str = ""


def parse(raw: object, origin: str, data_dir: Path) -> tuple[WebhookSettings, ...]:
    """The receivers that ``raw`` (the file's ``webhooks`` value, None if absent) lists."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(entry, dict) for entry in raw):
        raise ConfigError(f"{origin}: {TABLE} must be a list of [[{TABLE}]] tables",
                          f"write each receiver as {EXAMPLE}")
    receivers = tuple(_receiver(entry, f"{origin}: {TABLE}[{n}]", data_dir)
                      for n, entry in enumerate(raw, 1))
    names = [r.name for r in receivers]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{origin}: two [[{TABLE}]] tables are named {name!r}",
                              "give each receiver a name of its own")
    return receivers


def _receiver(entry: dict[str, object], where: str, data_dir: Path) -> WebhookSettings:
    for key in entry:
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown setting {key!r}",
                              f"a [[{TABLE}]] table takes {', '.join(KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-'",
                          'for example name = "oncall" (it labels the receiver in /metrics)')
    where = f"{where} ({name})"
    url = entry.get("url")
    if not isinstance(url, str) or not _is_http_url(url):
        raise ConfigError(f"{where}: url must be an http:// or https:// URL with a host",
                          "set the receiver's final URL (redirects are not followed)")
    secret_file, credential = entry.get("secret_file"), entry.get("secret_credential")
    if (secret_file is None) == (credential is None):
        raise ConfigError(f"{where}: give one of secret_file and secret_credential",
                          f'secret_file = "webhook-{name}.secret" (a file of its own, 0600: '
                          f"`openssl rand -hex 32`), or for a service secret_credential = "
                          f'"webhook-{name}" with LoadCredential=webhook-{name}:FILE in its unit')
    if secret_file is not None and (not isinstance(secret_file, str) or not secret_file):
        raise ConfigError(f"{where}: secret_file must be a path",
                          f'for example secret_file = "webhook-{name}.secret"')
    if credential is not None and (not isinstance(credential, str)
                                   or not _NAME.fullmatch(credential)):
        raise ConfigError(f"{where}: secret_credential must be a credential's name: letters, "
                          "digits, '.', '_' or '-'", f'for example "webhook-{name}"')
    path = Path(secret_file) if isinstance(secret_file, str) else None
    return WebhookSettings(name, url, _events(entry.get("events"), where),
                           path if path is None or path.is_absolute() else data_dir / path,
                           credential if isinstance(credential, str) else "")


def _events(raw: object, where: str) -> frozenset[EventKind]:
    known = ", ".join(EventKind)
    if raw is None:
        return frozenset(EventKind)
    if not isinstance(raw, list) or not raw or not all(isinstance(e, str) for e in raw):
        raise ConfigError(f"{where}: events must be a non-empty list of event names",
                          f"leave it out for every event, or list some of: {known}")
    unknown = [e for e in raw if e not in {kind.value for kind in EventKind}]
    if unknown:
        raise ConfigError(f"{where}: events names unknown event {unknown[0]!r}",
                          f"the events are: {known}")
    return frozenset(EventKind(e) for e in raw)


def _is_http_url(url: str) -> bool:
    if UNSAFE.search(url) or any(c.isspace() for c in url):
        return False
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (
            parts.port is None or parts.port > 0)
    except ValueError:  # a port out of range, a malformed IPv6 address
        return False
