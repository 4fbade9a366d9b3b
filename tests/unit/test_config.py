from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escrow import config
from escrow.core.errors import ConfigError
from escrow.core.hsm import HsmSettings


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / config.CONFIG_NAME).write_text(text)
    return tmp_path


def test_written_config_loads_back_with_paths_relative_to_the_data_dir(tmp_path: Path) -> None:
    hsm = HsmSettings("/lib/x.so", "tok", "wrap", tmp_path / "pin", tmp_path / "s" / "c.conf")
    config.write(tmp_path, hsm, 7)
    loaded = config.load(tmp_path, env={})
    assert loaded.hsm == hsm
    assert loaded.retention_days == 7
    assert 'pin_file = "pin"' in (tmp_path / config.CONFIG_NAME).read_text()


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    write(tmp_path, '[hsm]\nmodule = "/a.so"\ntoken = "t"\n')
    loaded = config.load(tmp_path, env={"ESCROW_HSM_TOKEN": "other",
                                        "ESCROW_KEYS_RETENTION_DAYS": "2.5"})
    assert loaded.hsm.token == "other"
    assert loaded.retention_days == 2.5


def test_missing_config_points_at_escrow_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(tmp_path, env={})
    assert "escrow init" in caught.value.hint


@pytest.mark.parametrize(("text", "message"), [
    ('[hsm]\nmodule = "/a.so"\ntoken = "t"\npin = "1234"\n', "unknown setting hsm.pin"),
    ('[hsm]\nmodule = "/a.so"\ntoken = 5\n', "hsm.token must be a non-empty string"),
    ('[hsm]\nmodule = "/a.so"\ntoken = "t"\n[keys]\nretention_days = "x"\n', "must be a number"),
    ('[hsm]\nmodule = "/a.so"\ntoken = "t"\n[keys]\nretention_days = -1\n', "must not be"),
    ('[hsm]\nmodule = "/a.so"\n', "hsm.token is not set"),
    ("hsm = 3\n", "must be a table"),
    ('[hsm]\nmodule = "/a.so"\ntoken = "t"\n[server]\nwebhook_url = "https://x.example/"\n',
     "server.webhook_url is no longer a setting"),
    ('[hsm]\nmodule = "/a.so"\ntoken = "t"\n[[webhooks]]\nname = "o"\n', "webhooks\\[1\\]"),
    ("[hsm\n", "not valid TOML"),
])
def test_bad_config_names_the_setting(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(write(tmp_path, text), env={})


def test_the_retired_webhook_url_points_at_webhooks_tables(tmp_path: Path) -> None:
    write(tmp_path, HSM_TABLE)
    with pytest.raises(ConfigError, match="ESCROW_SERVER_WEBHOOK_URL is no longer a setting"
                       ) as caught:
        config.load(tmp_path, env={"ESCROW_SERVER_WEBHOOK_URL": "https://x.example/"})
    assert "[[webhooks]]" in caught.value.hint


def test_webhooks_tables_load_with_secret_files_relative_to_the_data_dir(tmp_path: Path) -> None:
    write(tmp_path, HSM_TABLE + '[[webhooks]]\nname = "oncall"\nurl = "https://x.example/h"\n'
          'secret_file = "oncall.secret"\n')
    [oncall] = config.load(tmp_path, env={}).webhooks
    assert (oncall.name, oncall.secret_file) == ("oncall", tmp_path / "oncall.secret")
    assert config.load(write(tmp_path, HSM_TABLE), env={}).webhooks == ()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(st.text())
def test_arbitrary_config_text_raises_only_config_error(tmp_path: Path, text: str) -> None:
    with contextlib.suppress(ConfigError):
        config.load(write(tmp_path, text), env={})


SLOW_CLIENT_SETTINGS = {  # server.KEY: (default, environment variable)
    "tls_handshake_timeout_seconds": (30.0, "ESCROW_SERVER_TLS_HANDSHAKE_TIMEOUT_SECONDS"),
    "header_timeout_seconds": (10.0, "ESCROW_SERVER_HEADER_TIMEOUT_SECONDS"),
    "body_timeout_seconds": (10.0, "ESCROW_SERVER_BODY_TIMEOUT_SECONDS"),
    "keepalive_seconds": (75.0, "ESCROW_SERVER_KEEPALIVE_SECONDS"),
    "max_connections": (8192, "ESCROW_SERVER_MAX_CONNECTIONS"),
    "max_connections_per_source": (6144, "ESCROW_SERVER_MAX_CONNECTIONS_PER_SOURCE"),
}
HSM_TABLE = '[hsm]\nmodule = "/a.so"\ntoken = "t"\n'


def test_slow_client_limits_default_to_room_for_the_unseal_storm(tmp_path: Path) -> None:
    server = config.load(write(tmp_path, HSM_TABLE), env={}).server
    for key, (default, _) in SLOW_CLIENT_SETTINGS.items():
        assert getattr(server, key) == default, key
    # bench/unseal_storm.py runs 5,000 agents from 127.0.0.1 at once, within both caps.
    assert server.max_connections_per_source > 5000
    assert server.max_connections > server.max_connections_per_source
    # Above the agent's own 60 s keep-alive, so the agent always closes an idle connection
    # first (agent/daemon.py keeps one warm while dockerd restarts).
    assert server.keepalive_seconds > 60


def test_slow_client_limits_come_from_the_file_and_the_environment(tmp_path: Path) -> None:
    text = HSM_TABLE + "[server]\n" + "".join(f"{key} = 3\n" for key in SLOW_CLIENT_SETTINGS)
    server = config.load(write(tmp_path, text), env={}).server
    assert all(getattr(server, key) == 3 for key in SLOW_CLIENT_SETTINGS)
    assert isinstance(server.max_connections, int)
    env = {name: "7" for _, name in SLOW_CLIENT_SETTINGS.values()}
    server = config.load(tmp_path, env=env).server
    assert all(getattr(server, key) == 7 for key in SLOW_CLIENT_SETTINGS)


@pytest.mark.parametrize(("key", "value"), [
    ("tls_handshake_timeout_seconds", "0"), ("header_timeout_seconds", "0"),
    ("body_timeout_seconds", "0"), ("max_connections", "0"),
    ("max_connections_per_source", "0.5"),
])
def test_slow_client_limits_of_zero_are_refused_naming_where_they_came_from(
        tmp_path: Path, key: str, value: str) -> None:
    write(tmp_path, HSM_TABLE + f"[server]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=rf"escrow.toml: server\.{key} must be"):
        config.load(tmp_path, env={})
    name = SLOW_CLIENT_SETTINGS[key][1]
    with pytest.raises(ConfigError, match=rf"^{name}: server\.{key} must be"):
        config.load(write(tmp_path, HSM_TABLE), env={name: value})


def test_keepalive_of_zero_means_no_keepalive(tmp_path: Path) -> None:
    write(tmp_path, HSM_TABLE + "[server]\nkeepalive_seconds = 0\n")
    assert config.load(tmp_path, env={}).server.keepalive_seconds == 0
