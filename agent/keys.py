"""The agent key: a P-256 key bound to the node at enrollment, kept in a 0600 file under the
state directory. (A PKCS#11 token, e.g. a TPM, is the planned alternative.)"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import AgentError


def load(path: Path) -> ec.EllipticCurvePrivateKey:
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


def load_or_create(path: Path) -> ec.EllipticCurvePrivateKey:
    if path.exists():
        return load(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key
