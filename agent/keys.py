"""The agent key: a P-256 key bound to the node at enrollment, kept in a 0600 file under the
state directory, or made inside a PKCS#11 token and never leaving it."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import AgentConfig
from agent.errors import AgentError
from escrow.core.files import write_atomic
from escrow.core.hsm import HsmSettings, Pin, credential_pin, read_pin_file

PIN_CREDENTIAL = "agent-key-pin"


def load(config: AgentConfig) -> ec.EllipticCurvePrivateKey:
    """The enrolled agent key, from its token (an agent.token_key.TokenKey) or its file."""
    if config.agent_key_pkcs11_module:
        return _in_token(config, create=False)
    return load_file(config.agent_key_path)


def load_or_create(config: AgentConfig) -> ec.EllipticCurvePrivateKey:
    if config.agent_key_pkcs11_module:
        return _in_token(config, create=True)
    path = config.agent_key_path
    if path.exists():
        return load_file(path)
    return _create_file(path)


def _token_pin(config: AgentConfig) -> Pin:
    credential = credential_pin(os.environ, PIN_CREDENTIAL, "LoadCredential=")
    if credential is not None:
        return credential
    if config.agent_key_pkcs11_pin_file:
        path = Path(config.agent_key_pkcs11_pin_file)
        return read_pin_file(path, f"file {path}", "agent_key_pkcs11_pin_file")
    raise AgentError("no PIN for the agent key's token",
                     f"set agent_key_pkcs11_pin_file, or pass a systemd credential named "
                     f"{PIN_CREDENTIAL} (LoadCredential={PIN_CREDENTIAL}:/path)")


def _in_token(config: AgentConfig, *, create: bool) -> ec.EllipticCurvePrivateKey:
    # Imported only here: python-pkcs11 costs an agent with a file key 2 MiB it never uses.
    from agent.token_key import TokenKey  # noqa: PLC0415

    settings = HsmSettings(config.agent_key_pkcs11_module, config.agent_key_pkcs11_token,
                           key_label=config.agent_key_pkcs11_label,
                           module_set_in="agent_key_pkcs11_module",
                           label_set_in="agent_key_pkcs11_token in the agent's config.toml")
    return TokenKey.open(settings, _token_pin(config), config.agent_key_pkcs11_label,
                         create=create)


def load_file(path: Path) -> ec.EllipticCurvePrivateKey:
    """The existing agent key; a missing one means this node was never enrolled."""
    if not path.exists():
        raise AgentError(f"there is no agent key at {path}: this node is not enrolled",
                         "run `unseal-agent enroll` on this manager while it is unlocked")
    if path.stat().st_mode & 0o077:
        raise AgentError(f"the agent key {path} is readable by other users",
                         f"run `chmod 600 {path}`, then re-enroll: treat the key as exposed")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise AgentError(f"{path} is not a PEM private key", "remove it and enroll again",
                         ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AgentError(f"{path} is not an EC key", "remove it and enroll again")
    return key


def _create_file(path: Path) -> ec.EllipticCurvePrivateKey:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    # Unencrypted: the agent starts unattended; the file's mode and the unit's sandbox guard it
    # (docs/threat-model.md), or a token holds the key instead.
    write_atomic(path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()), new=True)
    return key
