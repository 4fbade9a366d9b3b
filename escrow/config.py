"""The data directory and its config file, ``escrow.toml``.

Layout of a data directory (mode 0700):

    escrow.toml        settings (below); every one can be overridden by an environment variable
    escrow.db          SQLite database (WAL): clusters, custodians, wrapped shares, audit log
    disk-reserve       `escrow serve` only: space held back for releases (see diskspace.py)
    serve.lock         held by the serving escrow (see lock.py)
    hsm-pin            embedded default only: the SoftHSM token's PIN (0600)
    softhsm/           embedded default only: SoftHSM config and token files

Settings (TOML table.key = environment variable):

    hsm.module         ESCROW_HSM_MODULE        PKCS#11 module path
    hsm.token          ESCROW_HSM_TOKEN         token label
    hsm.key_label      ESCROW_HSM_KEY_LABEL     wrapping key label (default escrow-wrap)
    hsm.pin_file       ESCROW_HSM_PIN_FILE      PIN file, relative to the data directory or
                                                absolute (or ESCROW_HSM_PIN, or a systemd
                                                credential named hsm-pin)
    hsm.softhsm_conf   ESCROW_HSM_SOFTHSM_CONF  SOFTHSM2_CONF to use (embedded default)
    keys.retention_days ESCROW_KEYS_RETENTION_DAYS  days a superseded key version is kept
    server.listen      ESCROW_SERVER_LISTEN     HOST:PORT for `escrow serve` (127.0.0.1:8443)
    server.tls_cert    ESCROW_SERVER_TLS_CERT   server certificate chain (PEM; tls/server.pem)
    server.tls_key     ESCROW_SERVER_TLS_KEY    its private key (PEM; tls/server.key)
    server.max_body_bytes ESCROW_SERVER_MAX_BODY_BYTES  larger request bodies get 413 (65536)
    server.disk_reserve_bytes ESCROW_SERVER_DISK_RESERVE_BYTES  space kept for releases when the
                                                disk fills (16 MiB; 0: none), see diskspace.py
    server.tls_handshake_timeout_seconds ESCROW_SERVER_TLS_HANDSHAKE_TIMEOUT_SECONDS  a TLS
                                                handshake (and a TLS close) must end within (30:
                                                with 10, 5,000 agents connecting at once to 2
                                                busy cores lost 644 handshakes in the queue)
    server.header_timeout_seconds ESCROW_SERVER_HEADER_TIMEOUT_SECONDS  a request's headers
                                                must be complete within (10) of the handshake, or
                                                of their first byte after a response
    server.body_timeout_seconds ESCROW_SERVER_BODY_TIMEOUT_SECONDS  its body within (10) of
                                                its headers; later: 408, connection closed
    server.keepalive_seconds ESCROW_SERVER_KEEPALIVE_SECONDS  an idle connection is closed
                                                after (75; above the agent's 60 s, 0: at once)
    server.max_connections ESCROW_SERVER_MAX_CONNECTIONS  connections open at once, TLS
                                                handshakes included; more are closed at once
                                                (8192, each costs ~300 KiB; lowered to fit the
                                                open-files limit, see server/connections.py)
    server.max_connections_per_source ESCROW_SERVER_MAX_CONNECTIONS_PER_SOURCE  of which one
                                                client address (IPv6: one /64) may hold (6144:
                                                room for bench/unseal_storm.py's 5,000 agents on
                                                127.0.0.1; lower it when clients do not share
                                                an address, e.g. 256)
    requests.ttl_seconds ESCROW_REQUESTS_TTL_SECONDS  unseal requests expire after (900)
    requests.rate_limit ESCROW_REQUESTS_RATE_LIMIT  unseal requests per node per window that
                                                did not end in a reported unlock (10); all
                                                requests, unlocked or not: six times that
    requests.rate_window_seconds ESCROW_REQUESTS_RATE_WINDOW_SECONDS  that window (600)
    requests.max_window_seconds ESCROW_REQUESTS_MAX_WINDOW_SECONDS  how far ahead a maintenance
                                                window may end (86400: a day; 0: custodians
                                                open none)
    requests.source_rate ESCROW_REQUESTS_SOURCE_RATE  requests per second one client address
                                                (IPv6: one /64) may make to the endpoints
                                                anyone reaches (20; 0: no limit); more: 429
    requests.source_burst ESCROW_REQUESTS_SOURCE_BURST  ...in bursts of up to (200)
    keys.max_versions  ESCROW_KEYS_MAX_VERSIONS  key versions a cluster retains at most; an
                                                agent's deposit beyond it is refused (10)
    keys.node_deposit_limit ESCROW_KEYS_NODE_DEPOSIT_LIMIT  new key versions one node may
                                                deposit per window (4)
    keys.node_deposit_window_seconds ESCROW_KEYS_NODE_DEPOSIT_WINDOW_SECONDS  that window (3600)
    store.url          ESCROW_STORE_URL         a PostgreSQL store instead of escrow.db: a libpq
                                                URL or conninfo without a password (several
                                                hosts with target_session_attrs=read-write
                                                find a promoted standby); unset: SQLite
    store.password_file ESCROW_STORE_PASSWORD_FILE  its password, 0600, relative to the data
                                                directory or absolute (or a systemd credential
                                                named store-password; neither: libpq's own
                                                ~/.pgpass or PGPASSFILE)

Receivers of notifications, one table each, no environment variable (a list of receivers, and
their secrets, have no place there); escrow/notifications/settings.py:

    [[webhooks]]       name (in /metrics and the log), url, events (default: all), and the
                       signing secret: secret_file (0600, relative to the data directory or
                       absolute) or secret_credential (a systemd credential's name)

server.webhook_url (ESCROW_SERVER_WEBHOOK_URL), an unsigned receiver of some of these events, is
refused with a hint to [[webhooks]].
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from escrow.core import tomlfile
from escrow.core.errors import ConfigError
from escrow.core.files import write_atomic
from escrow.core.hsm import HsmSettings
from escrow.notifications import settings as webhook_settings
from escrow.notifications.settings import WebhookSettings

CONFIG_NAME = "escrow.toml"
DB_NAME = "escrow.db"
DATA_DIR_ENV = "ESCROW_DATA_DIR"
DEFAULT_RETENTION_DAYS = 30.0
RETIRED_WEBHOOK = ("server", "webhook_url")
RETIRED_WEBHOOK_ENV = "ESCROW_SERVER_WEBHOOK_URL"

# (table, key) -> (environment variable, type)
_SETTINGS: dict[tuple[str, str], tuple[str, type]] = {
    ("hsm", "module"): ("ESCROW_HSM_MODULE", str),
    ("hsm", "token"): ("ESCROW_HSM_TOKEN", str),
    ("hsm", "key_label"): ("ESCROW_HSM_KEY_LABEL", str),
    ("hsm", "pin_file"): ("ESCROW_HSM_PIN_FILE", str),
    ("hsm", "softhsm_conf"): ("ESCROW_HSM_SOFTHSM_CONF", str),
    ("keys", "retention_days"): ("ESCROW_KEYS_RETENTION_DAYS", float),
    ("server", "listen"): ("ESCROW_SERVER_LISTEN", str),
    ("server", "tls_cert"): ("ESCROW_SERVER_TLS_CERT", str),
    ("server", "tls_key"): ("ESCROW_SERVER_TLS_KEY", str),
    ("server", "max_body_bytes"): ("ESCROW_SERVER_MAX_BODY_BYTES", float),
    ("server", "disk_reserve_bytes"): ("ESCROW_SERVER_DISK_RESERVE_BYTES", float),
    ("server", "tls_handshake_timeout_seconds"): ("ESCROW_SERVER_TLS_HANDSHAKE_TIMEOUT_SECONDS",
                                                  float),
    ("server", "header_timeout_seconds"): ("ESCROW_SERVER_HEADER_TIMEOUT_SECONDS", float),
    ("server", "body_timeout_seconds"): ("ESCROW_SERVER_BODY_TIMEOUT_SECONDS", float),
    ("server", "keepalive_seconds"): ("ESCROW_SERVER_KEEPALIVE_SECONDS", float),
    ("server", "max_connections"): ("ESCROW_SERVER_MAX_CONNECTIONS", float),
    ("server", "max_connections_per_source"): ("ESCROW_SERVER_MAX_CONNECTIONS_PER_SOURCE", float),
    ("requests", "ttl_seconds"): ("ESCROW_REQUESTS_TTL_SECONDS", float),
    ("requests", "rate_limit"): ("ESCROW_REQUESTS_RATE_LIMIT", float),
    ("requests", "rate_window_seconds"): ("ESCROW_REQUESTS_RATE_WINDOW_SECONDS", float),
    ("requests", "max_window_seconds"): ("ESCROW_REQUESTS_MAX_WINDOW_SECONDS", float),
    ("requests", "source_rate"): ("ESCROW_REQUESTS_SOURCE_RATE", float),
    ("requests", "source_burst"): ("ESCROW_REQUESTS_SOURCE_BURST", float),
    ("keys", "max_versions"): ("ESCROW_KEYS_MAX_VERSIONS", float),
    ("keys", "node_deposit_limit"): ("ESCROW_KEYS_NODE_DEPOSIT_LIMIT", float),
    ("keys", "node_deposit_window_seconds"): ("ESCROW_KEYS_NODE_DEPOSIT_WINDOW_SECONDS", float),
    ("store", "url"): ("ESCROW_STORE_URL", str),
    ("store", "password_file"): ("ESCROW_STORE_PASSWORD_FILE", str),
}


@dataclass(frozen=True)
class ServerSettings:
    listen: str = "127.0.0.1:8443"
    tls_cert: Path = Path("tls/server.pem")
    tls_key: Path = Path("tls/server.key")
    max_body_bytes: int = 65536
    disk_reserve_bytes: int = 16 * 1024 * 1024
    # Slow and greedy clients (server/connections.py); "Settings" above says what each means.
    tls_handshake_timeout_seconds: float = 30.0
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 10.0
    keepalive_seconds: float = 75.0
    max_connections: int = 8192
    max_connections_per_source: int = 6144
    request_ttl_seconds: float = 900.0
    rate_limit: int = 10
    rate_window_seconds: float = 600.0
    source_rate: float = 20.0
    source_burst: float = 200.0
    max_versions: int = 10
    node_deposit_limit: int = 4
    node_deposit_window_seconds: float = 3600.0
    # A maintenance window is custodians' approval given ahead of time: it may not reach
    # further ahead than this.
    max_window_seconds: float = 86400.0


@dataclass(frozen=True)
class StoreSettings:
    url: str = ""  # empty: the SQLite file escrow.db in the data directory
    password_file: Path | None = None


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    hsm: HsmSettings
    retention_days: float
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    webhooks: tuple[WebhookSettings, ...] = ()

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_NAME


def _check_known(raw: Mapping[str, Any], path: Path) -> None:
    for table, body in raw.items():
        if table == webhook_settings.TABLE:  # a list of tables, checked as it is read
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {table!r} must be a table such as [{table}]",
                              "see the settings listed in README.md")
        for key in body:
            if (table, key) == RETIRED_WEBHOOK:
                raise ConfigError(f"{path}: server.webhook_url is no longer a setting",
                                  webhook_settings.RETIRED_HINT)
            if (table, key) not in _SETTINGS:
                known = ", ".join(f"{t}.{k}" for t, k in _SETTINGS)
                raise ConfigError(f"{path}: unknown setting {table}.{key}",
                                  f"known settings: {known}")


def _coerce(table: str, key: str, value: Any, origin: str) -> Any:
    _, kind = _SETTINGS[(table, key)]
    if kind is float:
        if isinstance(value, bool):
            value = "not a number"
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{origin}: {table}.{key} must be a number",
                              f"for example {table}.{key} = 30") from None
        if not math.isfinite(number):
            raise ConfigError(f"{origin}: {table}.{key} must be a finite number, not {number}",
                              f"for example {table}.{key} = 30")
        if number < 0:
            raise ConfigError(f"{origin}: {table}.{key} must not be negative", "use 0 or more")
        return number
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{origin}: {table}.{key} must be a non-empty string",
                          f'for example {table}.{key} = "..."')
    return value


def _resolve(data_dir: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    return path if path.is_absolute() else data_dir / path


def _positive(values: Mapping[tuple[str, str], Any], key: str, default: float,
              origin: str, count: bool = False) -> float:
    """server.KEY, which must be more than 0 (a deadline or a cap of 0 would refuse every
    client), and a whole 1 or more if it counts connections."""
    value = float(values.get(("server", key), default))
    if (count and value < 1) or value <= 0:
        least = "1 or more" if count else "more than 0"
        raise ConfigError(f"{origin}: server.{key} must be {least}",
                          f"for example server.{key} = {default:g} (the default)")
    return value


def _read(data_dir: Path) -> dict[str, Any]:
    raw = tomlfile.read(data_dir / CONFIG_NAME, "the config file",
                        "it must be a regular file readable by the escrow's user")
    if raw is None:
        raise ConfigError(f"{data_dir} is not an escrow data directory (no {CONFIG_NAME})",
                          f"run `escrow init --data-dir {data_dir}` first, or give the right "
                          f"--data-dir / {DATA_DIR_ENV}")
    return raw


def load(data_dir: Path, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    path = data_dir / CONFIG_NAME
    raw = _read(data_dir)
    _check_known(raw, path)
    if env.get(RETIRED_WEBHOOK_ENV):
        raise ConfigError(f"{RETIRED_WEBHOOK_ENV} is no longer a setting",
                          f"unset it; {webhook_settings.RETIRED_HINT}")
    values: dict[tuple[str, str], Any] = {}
    for (table, key), (env_name, _) in _SETTINGS.items():
        if env.get(env_name):
            values[(table, key)] = _coerce(table, key, env[env_name], env_name)
        elif key in raw.get(table, {}):
            values[(table, key)] = _coerce(table, key, raw[table][key], str(path))
    for required in (("hsm", "module"), ("hsm", "token")):
        if required not in values:
            raise ConfigError(f"{path}: {required[0]}.{required[1]} is not set",
                              "set it in the file or through its environment variable")
    hsm = HsmSettings(
        module=values[("hsm", "module")],
        token=values[("hsm", "token")],
        key_label=values.get(("hsm", "key_label"), "escrow-wrap"),
        pin_file=_resolve(data_dir, values.get(("hsm", "pin_file"))),
        softhsm_conf=_resolve(data_dir, values.get(("hsm", "softhsm_conf"))),
    )
    defaults = ServerSettings()

    def origin(key: str) -> str:
        return env_override("server", key, env) or str(path)

    server = ServerSettings(
        listen=values.get(("server", "listen"), defaults.listen),
        tls_cert=data_dir / values.get(("server", "tls_cert"), defaults.tls_cert),
        tls_key=data_dir / values.get(("server", "tls_key"), defaults.tls_key),
        max_body_bytes=int(values.get(("server", "max_body_bytes"), defaults.max_body_bytes)),
        disk_reserve_bytes=int(values.get(("server", "disk_reserve_bytes"),
                                          defaults.disk_reserve_bytes)),
        tls_handshake_timeout_seconds=_positive(values, "tls_handshake_timeout_seconds",
                                                defaults.tls_handshake_timeout_seconds,
                                                origin("tls_handshake_timeout_seconds")),
        header_timeout_seconds=_positive(values, "header_timeout_seconds",
                                         defaults.header_timeout_seconds,
                                         origin("header_timeout_seconds")),
        body_timeout_seconds=_positive(values, "body_timeout_seconds",
                                       defaults.body_timeout_seconds,
                                       origin("body_timeout_seconds")),
        keepalive_seconds=values.get(("server", "keepalive_seconds"), defaults.keepalive_seconds),
        max_connections=int(_positive(values, "max_connections", defaults.max_connections,
                                      origin("max_connections"), count=True)),
        max_connections_per_source=int(_positive(values, "max_connections_per_source",
                                                 defaults.max_connections_per_source,
                                                 origin("max_connections_per_source"),
                                                 count=True)),
        request_ttl_seconds=values.get(("requests", "ttl_seconds"),
                                       defaults.request_ttl_seconds),
        rate_limit=int(values.get(("requests", "rate_limit"), defaults.rate_limit)),
        rate_window_seconds=values.get(("requests", "rate_window_seconds"),
                                       defaults.rate_window_seconds),
        source_rate=values.get(("requests", "source_rate"), defaults.source_rate),
        source_burst=max(1.0, values.get(("requests", "source_burst"), defaults.source_burst)),
        max_versions=max(1, int(values.get(("keys", "max_versions"), defaults.max_versions))),
        node_deposit_limit=int(values.get(("keys", "node_deposit_limit"),
                                          defaults.node_deposit_limit)),
        node_deposit_window_seconds=values.get(("keys", "node_deposit_window_seconds"),
                                               defaults.node_deposit_window_seconds),
        max_window_seconds=values.get(("requests", "max_window_seconds"),
                                      defaults.max_window_seconds),
    )
    store = StoreSettings(values.get(("store", "url"), ""),
                          _resolve(data_dir, values.get(("store", "password_file"))))
    return Settings(data_dir, hsm, values.get(("keys", "retention_days"), DEFAULT_RETENTION_DAYS),
                    server, store,
                    webhook_settings.parse(raw.get(webhook_settings.TABLE), str(path), data_dir))


def write(data_dir: Path, hsm: HsmSettings, retention_days: float) -> Path:
    table: dict[str, Any] = {"module": hsm.module, "token": hsm.token, "key_label": hsm.key_label}
    for name, value in (("pin_file", hsm.pin_file), ("softhsm_conf", hsm.softhsm_conf)):
        if value is not None:
            table[name] = str(value.relative_to(data_dir) if value.is_relative_to(data_dir)
                              else value)
    path = data_dir / CONFIG_NAME
    path.write_text(tomli_w.dumps({"hsm": table, "keys": {"retention_days": retention_days}}))
    return path


def env_override(table: str, key: str, env: Mapping[str, str] | None = None) -> str | None:
    """The environment variable that overrides this setting right now, if one does."""
    name = _SETTINGS[(table, key)][0]
    return name if (os.environ if env is None else env).get(name) else None


def update(data_dir: Path, table: str, key: str, value: str) -> None:
    """Set one setting in escrow.toml, atomically: a crash leaves the old file or the new one.
    The file is rewritten from its values, so comments in it are not kept."""
    if (table, key) not in _SETTINGS:
        raise ConfigError(f"{table}.{key} is not an escrow setting", "this is a bug")
    path = data_dir / CONFIG_NAME
    raw = _read(data_dir)
    raw.setdefault(table, {})[key] = value
    write_atomic(path, tomli_w.dumps(raw).encode(), stat.S_IMODE(path.stat().st_mode))
