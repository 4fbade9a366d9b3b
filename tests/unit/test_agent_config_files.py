"""The agent refuses a config file or escrow CA that someone other than root could change
(agent/config.py), and reads escrow_deposit_key_sha256 and one escrow URL or several."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent import config as agent_config
from agent.errors import AgentError

NOBODY = 65534


def files(tmp_path: Path, *, config_mode: int = 0o644, ca_mode: int = 0o644,
          extra: str = "", url: str = '"https://escrow:8443"') -> tuple[Path, Path]:
    ca = tmp_path / "escrow-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    ca.chmod(ca_mode)
    config = tmp_path / "config.toml"
    config.write_text(f'escrow_url = {url}\nescrow_ca = "{ca}"\n{extra}')
    config.chmod(config_mode)
    return config, ca


def refusal(config: Path) -> AgentError:
    with pytest.raises(AgentError) as caught:
        agent_config.load(config, {})
    return caught.value


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o400])
def test_a_root_owned_config_and_ca_writable_by_root_only_are_read(
        tmp_path: Path, mode: int) -> None:
    config, ca = files(tmp_path, config_mode=mode)
    assert agent_config.load(config, {}).escrow_ca == ca


@pytest.mark.parametrize(("mode", "who"), [(0o666, "group and others"), (0o646, "others"),
                                           (0o664, "its group")])
def test_a_config_file_others_can_write_is_refused_with_the_fix(
        tmp_path: Path, mode: int, who: str) -> None:
    config, _ = files(tmp_path, config_mode=mode)
    error = refusal(config)
    assert error.message.startswith(f"the config file {config} is writable by {who} (owner "
                                    f"root (uid 0), mode {mode:04o})")
    assert error.hint == f"chown root:root {config}; chmod 0600 {config}"


def test_a_ca_file_others_can_write_is_refused_as_it_redirects_the_agent(
        tmp_path: Path) -> None:
    config, ca = files(tmp_path, ca_mode=0o666)
    error = refusal(config)
    assert error.message.startswith(f"the escrow CA (escrow_ca) {ca} is writable by group and "
                                    "others (owner root (uid 0), mode 0666)")
    assert "escrow of their choosing" in error.message
    assert error.hint == f"chown root:root {ca}; chmod 0644 {ca}"
    # Given as a flag instead, the same file is refused just the same.
    config.write_text('escrow_url = "https://escrow:8443"\nescrow_ca = "/ca.pem"\n')
    with pytest.raises(AgentError, match="writable by group and others"):
        agent_config.load(config, {"escrow_ca": str(ca)})


def test_a_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    config, ca = files(tmp_path)
    os.chown(ca, NOBODY, NOBODY)
    error = refusal(config)
    assert f"{ca} is owned by another user (owner" in error.message
    assert f"uid {NOBODY})" in error.message
    assert error.hint.startswith(f"chown root:root {ca}")


def test_a_symlink_is_judged_by_its_target(tmp_path: Path) -> None:
    config, ca = files(tmp_path, ca_mode=0o666)
    link = tmp_path / "link.pem"
    link.symlink_to(ca)
    config.write_text(f'escrow_url = "https://escrow:8443"\nescrow_ca = "{link}"\n')
    config.chmod(0o600)
    error = refusal(config)
    assert f"{link} (a link to {ca}) is writable by group and others" in error.message
    assert error.hint == f"chown root:root {ca}; chmod 0644 {ca}"
    ca.chmod(0o644)
    assert agent_config.load(config, {}).escrow_ca == link


def test_a_directory_others_can_write_is_refused_but_a_sticky_one_is_not(
        tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    config, _ = files(shared)
    shared.chmod(0o777)  # anyone could replace config.toml
    error = refusal(config)
    assert error.message.startswith(f"the config file {config} is in the directory {shared}, "
                                    "which is writable by group and others")
    assert error.hint == f"chown root:root {shared}; chmod go-w {shared}"
    shared.chmod(0o1777)  # like /tmp: nobody can replace root's files in it
    assert agent_config.load(config, {})


def test_a_missing_ca_is_left_to_where_it_is_loaded(tmp_path: Path) -> None:
    config, ca = files(tmp_path)
    ca.unlink()
    assert agent_config.load(config, {}).escrow_ca == ca


def test_exposure_names_what_is_wrong() -> None:
    trusted = {0, 1000}
    assert agent_config.exposure(stat.S_IFREG | 0o644, 0, trusted) == ""
    assert agent_config.exposure(stat.S_IFREG | 0o600, 1000, trusted) == ""
    assert agent_config.exposure(stat.S_IFREG | 0o620, 0, trusted) == "is writable by its group"
    assert agent_config.exposure(stat.S_IFREG | 0o1777, 0, trusted) == (
        "is writable by group and others")
    assert agent_config.exposure(stat.S_IFDIR | 0o1777, 0, trusted) == ""
    assert agent_config.exposure(stat.S_IFDIR | 0o755, 5, trusted) == (
        "is owned by another user")
    assert agent_config.exposure(stat.S_IFREG | 0o602, 5, trusted) == (
        "is owned by another user and is writable by others")


@pytest.mark.parametrize("value", ["ab" * 31, "zz" * 32, "", 5])
def test_a_deposit_key_fingerprint_must_be_a_sha256(tmp_path: Path, value: object) -> None:
    shown = f'"{value}"' if isinstance(value, str) else str(value)
    config, _ = files(tmp_path, extra=f"escrow_deposit_key_sha256 = {shown}\n")
    error = refusal(config)
    assert "escrow_deposit_key_sha256 must be a SHA-256 fingerprint" in error.message


def test_a_deposit_key_fingerprint_is_read_in_lower_case(tmp_path: Path) -> None:
    config, _ = files(tmp_path, extra=f'escrow_deposit_key_sha256 = "{"AB" * 32}"\n')
    assert agent_config.load(config, {}).escrow_deposit_key_sha256 == "ab" * 32
    assert agent_config.load(config, {"escrow_deposit_key_sha256": "cd" * 32}
                             ).escrow_deposit_key_sha256 == "cd" * 32


@pytest.mark.parametrize(("url", "flag", "urls"), [
    ('"https://escrow:8443"', None, ("https://escrow:8443",)),
    ('["https://e1:8443", "https://e2:8443"]', None, ("https://e1:8443", "https://e2:8443")),
    ('"https://e1:8443, https://e2:8443"', None, ("https://e1:8443", "https://e2:8443")),
    ('"https://escrow:8443"', "https://e2:8443,https://e1:8443",
     ("https://e2:8443", "https://e1:8443")),
], ids=["one", "a-list", "commas-in-the-file", "commas-in-the-flag"])
def test_escrow_url_is_one_url_or_several_in_order_of_preference(
        tmp_path: Path, url: str, flag: str | None, urls: tuple[str, ...]) -> None:
    config, _ = files(tmp_path, url=url)
    assert agent_config.load(config, {"escrow_url": flag}).escrow_url == urls


@pytest.mark.parametrize(("url", "wrong"), [
    ('["https://e1:8443", "http://e2:8443"]', "escrow_url 'http://e2:8443' is not an https:// URL"),
    ('"https://e1:8443,"', "escrow_url has an empty entry (a comma too many?)"),
    ('["https://e1:8443", "https://e1:8443"]', "escrow_url names 'https://e1:8443' twice"),
    ("[]", "escrow_url names no URL"),
    ("[1]", "escrow_url must be a URL or a list of URLs, not [1]"),
    ('"https://agent:s3cret@e1:8443"', "escrow_url the URL of e1:8443 carries a user name or "
                                       "password"),
], ids=["not-https", "empty", "twice", "none", "not-a-string", "a-password"])
def test_a_wrong_escrow_url_is_refused_naming_the_file_and_what_is_wrong(
        tmp_path: Path, url: str, wrong: str) -> None:
    config, _ = files(tmp_path, url=url)
    error = refusal(config)
    assert error.message == f"{config}: {wrong}"
    assert "s3cret" not in error.message + error.hint
    assert 'escrow_url = ["https://escrow-1.example:8443", "https://escrow-2.example:8443"]' \
        in error.hint
