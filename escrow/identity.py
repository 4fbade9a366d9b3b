"""Swarm identities: cluster ids and the cluster root CA that is pinned at registration (pure).

Checks take bytes and return parsed values or raise; they never read files or sockets.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import NameOID

from escrow.core.certs import name_value
from escrow.core.errors import IdentityError, InputError

# Swarm makes node and cluster ids with identity.NewID(): 25 characters of lower-case base 36.
_SWARM_ID = re.compile(r"^[a-z0-9]{25}$")
_ID_HINT = "read it on a manager with `docker info --format '{{.Swarm.Cluster.ID}}'`"


def validate_cluster_id(cluster_id: str) -> str:
    if not _SWARM_ID.fullmatch(cluster_id):
        raise InputError(f"{cluster_id!r} is not a Swarm cluster id (25 lower-case letters and "
                         "digits)", _ID_HINT)
    return cluster_id


def parse_root_ca(pem: bytes) -> x509.Certificate:
    """Parse the cluster's root CA: exactly one PEM certificate that is a CA, with a public key
    that can check node certificates. Raises only InputError."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except (ValueError, x509.InvalidVersion):
        raise InputError("the root CA file is not a PEM certificate",
                         "copy /var/lib/docker/swarm/certificates/swarm-root-ca.crt from a "
                         "manager") from None
    if len(certs) != 1:
        raise InputError(f"the root CA file holds {len(certs)} certificates, expected one",
                         "give only the cluster's root CA (swarm-root-ca.crt)")
    cert = certs[0]
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    except ValueError:  # extensions are parsed only now: a damaged one surfaces here
        raise InputError("the root CA certificate has a malformed extension",
                         "the file is damaged; copy swarm-root-ca.crt from a manager again"
                         ) from None
    if constraints is None or not constraints.ca:
        raise InputError("the root CA file holds a certificate that is not a CA",
                         "give swarm-root-ca.crt, not a node certificate (swarm-node.crt)")
    try:
        cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise InputError("the root CA's public key is of a type or curve this escrow cannot use",
                         "give the swarm's own root CA (swarm-root-ca.crt, an ECDSA P-256 key)"
                         ) from None
    return cert


MANAGER_OU = "swarm-manager"


def parse_node_cert(cert_pem: bytes) -> x509.Certificate:
    """Parse a swarm node certificate (no checks of who issued it or for whom)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, x509.InvalidVersion):
        raise IdentityError("bad_certificate", "the node certificate is not a PEM certificate",
                            "send swarm-node.crt as it is on disk", 400) from None
    try:
        _ = cert.subject  # names and keys are parsed only when asked for: damage shows here
        cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise IdentityError("bad_certificate", "the node certificate has a malformed name or key",
                            "send swarm-node.crt as it is on disk", 400) from None
    return cert


@functools.lru_cache(maxsize=4096)
def _pinned_root(pem: bytes) -> x509.Certificate:
    """A cluster's pinned root CA, parsed once: every request of the cluster is checked
    against it. A PEM changes only when an admin re-registers the cluster."""
    return parse_root_ca(pem)


def check_issuer(cert: x509.Certificate, root_ca_pem: bytes, cluster_id: str) -> None:
    """Raise unless ``cert`` was signed by the root CA pinned for the cluster."""
    root = _pinned_root(root_ca_pem)
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise IdentityError("wrong_root_ca", "the node certificate does not chain to the root CA "
                            f"pinned for cluster {cluster_id}",
                            "a node of another swarm, or the swarm's CA was rotated: re-register "
                            "the cluster's root CA") from None


def check_claims(cert: x509.Certificate, cluster_id: str, node_id: str, now: datetime) -> None:
    """Raise unless ``cert`` names a manager of ``cluster_id`` called ``node_id`` and is valid
    at ``now``."""
    subject = cert.subject
    if name_value(subject, NameOID.ORGANIZATIONAL_UNIT_NAME) != MANAGER_OU:
        raise IdentityError("not_a_manager", "the certificate is not a manager's (OU is not "
                            "swarm-manager)", "only managers are locked; workers need no key")
    if name_value(subject, NameOID.ORGANIZATION_NAME) != cluster_id:
        raise IdentityError("wrong_cluster", f"the certificate is for another cluster, not "
                            f"{cluster_id}", "check the agent's cluster id")
    if name_value(subject, NameOID.COMMON_NAME) != node_id:
        raise IdentityError("wrong_node", f"the certificate is for another node, not {node_id}",
                            "each agent presents its own node's certificate")
    if now < cert.not_valid_before_utc:
        raise IdentityError("cert_not_yet_valid",
                            f"the node certificate is valid from {cert.not_valid_before_utc}, "
                            f"but the escrow's clock says {now}: a clock is off by at least "
                            f"{(cert.not_valid_before_utc - now).total_seconds():.0f} s",
                            "synchronise the clocks of the swarm's managers and of the escrow "
                            "(NTP)")
    if now > cert.not_valid_after_utc:
        raise IdentityError("cert_expired",
                            f"the node certificate expired at {cert.not_valid_after_utc}",
                            "a manager renews its certificate while unlocked; unlock this one "
                            "by hand (escrow recover) and it will renew")


def check_node_cert(cert_pem: bytes, root_ca_pem: bytes, cluster_id: str, node_id: str,
                    now: datetime) -> x509.Certificate:
    """Check a swarm node certificate as docs/threat-model.md ("Trust boundaries and checks")
    says, or raise IdentityError."""
    cert = parse_node_cert(cert_pem)
    check_issuer(cert, root_ca_pem, cluster_id)
    check_claims(cert, cluster_id, node_id, now)
    return cert
