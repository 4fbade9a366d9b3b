"""What a manager's disk says about it: its swarm certificate, and (with the unlock key) its
swarm node key. Pure functions over bytes, plus one reader of the certificate directory.

While a manager is locked, swarm-node.crt and swarm-root-ca.crt are plain PEM but
swarm-node.key is PKCS#8 encrypted under the unlock key (docs/threat-model.md, "What autolock
protects"), with PEM headers
`kek-version:` and `raft-dek:` that `cryptography` does not accept, so they are stripped first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.errors import AgentError
from escrow.core.certs import name_value
from escrow.core.unlockkey import UnlockKey

CERT_DIR = Path("swarm") / "certificates"


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    cluster_id: str
    role: str
    cert_pem: str
    kek_version: str


def _pem_headers(pem: bytes) -> tuple[dict[str, str], bytes]:
    """Split RFC 1421 headers off a PEM block; return them and the block without them."""
    headers: dict[str, str] = {}
    kept: list[bytes] = []
    in_headers = False
    for line in pem.splitlines():
        if line.startswith(b"-----BEGIN"):
            in_headers = True
            kept.append(line)
        elif in_headers and b":" in line:
            name, _, value = line.decode("ascii", errors="replace").partition(":")
            headers[name.strip()] = value.strip()
        elif in_headers and not line.strip():
            in_headers = False
        else:
            in_headers = False
            kept.append(line)
    return headers, b"\n".join(kept) + b"\n"


def kek_version(key_pem: bytes) -> str:
    """The `kek-version:` header: readable while locked, changes with every rotation."""
    return _pem_headers(key_pem)[0].get("kek-version", "")


def decrypt_node_key(key_pem: bytes, key: UnlockKey) -> ec.EllipticCurvePrivateKey:
    """Decrypt swarm-node.key in memory with the unlock key's KEK."""
    _, body = _pem_headers(key_pem)
    try:
        private = serialization.load_pem_private_key(body, password=key.kek)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise AgentError("swarm-node.key does not decrypt with the current unlock key",
                         "the key was rotated while this ran; try again") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise AgentError("swarm-node.key is not an EC key", "is this a Swarm node key?")
    return private


def read_identity(docker_root: Path) -> NodeIdentity:
    directory = docker_root / CERT_DIR
    try:
        cert_pem = (directory / "swarm-node.crt").read_bytes()
        key_pem = (directory / "swarm-node.key").read_bytes()
    except OSError as exc:
        raise AgentError(f"cannot read the swarm certificates in {directory}: {exc.strerror}",
                         "is this node part of a swarm, and is docker_root right?") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        names = [name_value(cert.subject, oid) for oid in (NameOID.COMMON_NAME,
                                                           NameOID.ORGANIZATION_NAME,
                                                           NameOID.ORGANIZATIONAL_UNIT_NAME)]
        text = cert_pem.decode("ascii")
    except (ValueError, x509.InvalidVersion):  # UnicodeDecodeError is a ValueError
        raise AgentError(f"{directory / 'swarm-node.crt'} is not a PEM certificate",
                         "the swarm state on this node is damaged") from None
    node_id, cluster_id, role = names
    return NodeIdentity(node_id=node_id, cluster_id=cluster_id, role=role, cert_pem=text,
                        kek_version=kek_version(key_pem))


def read_signing_identity(docker_root: Path, key: UnlockKey, attempts: int = 10,
                          ) -> tuple[NodeIdentity, ec.EllipticCurvePrivateKey]:
    """The node's certificate and its decrypted key, guaranteed to belong together.

    Swarm renews a manager's certificate on its own (right after `swarm init`, and before
    expiry) by rewriting both files, so a certificate read a moment before the key may not
    match it: read both, compare public keys, and read again on a mismatch.
    """
    for _ in range(attempts):
        identity = read_identity(docker_root)
        private = decrypt_node_key((docker_root / CERT_DIR / "swarm-node.key").read_bytes(), key)
        cert_key = x509.load_pem_x509_certificate(identity.cert_pem.encode()).public_key()
        if cert_key == private.public_key():
            return identity, private
        time.sleep(0.2)
    raise AgentError("swarm-node.crt and swarm-node.key keep changing under us",
                     "the manager is renewing its certificate; try again in a minute")
