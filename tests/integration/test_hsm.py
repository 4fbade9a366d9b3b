"""The PKCS#11 layer against a real SoftHSM token."""

from __future__ import annotations

import copy
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute

from agent.token_key import TokenKey
from escrow.core.encoding import share_aad
from escrow.core.errors import (
    ConfigError,
    HsmModuleMissing,
    ShareAuthFailed,
    TokenNotFound,
    WrappingKeyMissing,
    WrongPin,
)
from escrow.core.hsm import HsmSettings, Pin
from escrow.wrapping import Token, resolve_pin
from tests.conftest import SESSION_PIN, SoftHsm

CLUSTER = "c" * 25


def test_wrapped_share_unwraps_only_with_its_own_associated_data(token: Token) -> None:
    wrapped = token.wrap(b"share words", share_aad(CLUSTER, 1, 0))
    assert b"share words" not in wrapped
    assert token.unwrap(wrapped, share_aad(CLUSTER, 1, 0)) == b"share words"
    for other in (share_aad(CLUSTER, 1, 1), share_aad(CLUSTER, 2, 0), share_aad("d" * 25, 1, 0)):
        with pytest.raises(ShareAuthFailed, match="copied from another row"):
            token.unwrap(wrapped, other)


def test_each_wrap_uses_a_fresh_iv(token: Token) -> None:
    aad = share_aad(CLUSTER, 1, 0)
    assert token.wrap(b"x", aad) != token.wrap(b"x", aad)


@pytest.mark.parametrize("damage", ["truncate", "flip", "format"])
def test_damaged_ciphertext_fails_authentication(token: Token, damage: str) -> None:
    aad = share_aad(CLUSTER, 1, 0)
    wrapped = bytearray(token.wrap(b"share words", aad))
    if damage == "truncate":
        wrapped = wrapped[:20]
    elif damage == "flip":
        wrapped[-1] ^= 1
    else:
        wrapped[0] = 9
    with pytest.raises(ShareAuthFailed):
        token.unwrap(bytes(wrapped), aad)


def test_wrapping_key_is_sensitive_non_extractable_and_created_once(token: Token) -> None:
    assert token.create_wrapping_key() is False
    key = token._find_key(token.settings.key_label)
    assert key[Attribute.SENSITIVE] is True
    assert key[Attribute.EXTRACTABLE] is False
    assert key[Attribute.NEVER_EXTRACTABLE] is True
    with pytest.raises(pkcs11.AttributeSensitive):
        key[Attribute.VALUE]


def test_missing_wrapping_key_is_reported(hsm_settings: HsmSettings) -> None:
    with Token(hsm_settings, Pin(SESSION_PIN, "test")) as fresh, \
            pytest.raises(WrappingKeyMissing, match="has no wrapping key labelled"):
        fresh.wrap(b"x", b"aad")


def test_wrong_pin_is_reported_with_its_source(hsm_settings: HsmSettings) -> None:
    with pytest.raises(WrongPin, match="refused the PIN from file /etc/x"):
        Token(hsm_settings, Pin("0000-wrong", "file /etc/x"))


def test_missing_token_is_reported(softhsm: SoftHsm) -> None:
    settings = HsmSettings(softhsm.module, "no-such-token", "wrap")
    with pytest.raises(TokenNotFound, match="no token labelled 'no-such-token'"):
        Token(settings, Pin(SESSION_PIN, "test"))


def test_missing_module_is_reported_with_an_install_hint(tmp_path: Path) -> None:
    settings = HsmSettings(str(tmp_path / "libnothing.so"), "t", "wrap")
    with pytest.raises(HsmModuleMissing) as caught:
        Token(settings, Pin(SESSION_PIN, "test"))
    assert "apt-get install softhsm2" in caught.value.hint


def test_an_agent_missing_its_token_is_told_the_agent_setting(softhsm: SoftHsm) -> None:
    settings = HsmSettings(softhsm.module, "no-such-token", "agent",
                           module_set_in="agent_key_pkcs11_module",
                           label_set_in="agent_key_pkcs11_token")
    with pytest.raises(TokenNotFound) as caught:
        TokenKey.open(settings, Pin(SESSION_PIN, "test"), "agent", create=False)
    assert "agent_key_pkcs11_token" in caught.value.hint
    assert "escrow.toml" not in caught.value.hint


def write_pin(path: Path, pin: str, mode: int = 0o600) -> Path:
    path.write_text(pin + "\n")
    path.chmod(mode)
    return path


def test_pin_sources_in_order_file_then_credential_then_environment(tmp_path: Path) -> None:
    explicit = write_pin(tmp_path / "explicit", "from-file")
    configured = write_pin(tmp_path / "configured", "from-config")
    creds = tmp_path / "creds"
    creds.mkdir()
    write_pin(creds / "hsm-pin", "from-credential")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "ESCROW_HSM_PIN": "from-env"}
    assert resolve_pin(explicit, configured, env).value == "from-file"
    assert resolve_pin(None, configured, env).value == "from-credential"
    assert resolve_pin(None, configured, {"ESCROW_HSM_PIN": "from-env"}).value == "from-env"
    assert resolve_pin(None, configured, {}).value == "from-config"
    assert "from" not in repr(resolve_pin(None, configured, {}))


def test_pin_problems_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no HSM PIN was found"):
        resolve_pin(None, None, {})
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_pin(tmp_path / "absent", None, {})
    with pytest.raises(ConfigError, match="readable or writable by every user"):
        resolve_pin(write_pin(tmp_path / "open", "1234", 0o644), None, {})
    with pytest.raises(ConfigError, match="is empty"):
        resolve_pin(write_pin(tmp_path / "empty", ""), None, {})


def test_an_agent_key_made_in_a_token_signs_but_never_leaves_it(hsm_settings: HsmSettings,
                                                               ) -> None:
    key = TokenKey.open(hsm_settings, Pin(SESSION_PIN, "test"), "agent-key-test", create=True)
    try:
        signature = key.sign(b"payload", ec.ECDSA(hashes.SHA256()))
        key.public_key().verify(signature, b"payload", ec.ECDSA(hashes.SHA256()))
        for leave in (key.private_numbers, lambda: copy.copy(key), lambda: copy.deepcopy(key),
                      lambda: key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()),
                      lambda: key.exchange(ec.ECDH(), key.public_key())):
            with pytest.raises(TypeError, match="cannot leave it"):
                leave()
    finally:
        key.close()
