from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from escrow import config
from escrow.errors import ConfigError
from escrow.hsm import HsmSettings


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
    ("[hsm\n", "not valid TOML"),
])
def test_bad_config_names_the_setting(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(write(tmp_path, text), env={})


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(st.text())
def test_arbitrary_config_text_raises_only_config_error(tmp_path: Path, text: str) -> None:
    with contextlib.suppress(ConfigError):
        config.load(write(tmp_path, text), env={})
