"""Swarm identities: cluster ids and the cluster root CA that is pinned at registration (pure).

Checks take bytes and return parsed values or raise; they never read files or sockets.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.x509.oid import NameOID

from escrow.errors import InputError

# Swarm makes node and cluster ids with identity.NewID(): 25 characters of lower-case base 36.
_SWARM_ID = re.compile(r"^[a-z0-9]{25}$")
_ID_HINT = "read it on a manager with `docker info --format '{{.Swarm.Cluster.ID}}'`"


def validate_cluster_id(cluster_id: str) -> str:
    if not _SWARM_ID.match(cluster_id):
        raise InputError(f"{cluster_id!r} is not a Swarm cluster id (25 lower-case letters and "
                         "digits)", _ID_HINT)
    return cluster_id


def parse_root_ca(pem: bytes) -> x509.Certificate:
    """Parse the cluster's root CA: exactly one PEM certificate that is a CA."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
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
    if constraints is None or not constraints.ca:
        raise InputError("the root CA file holds a certificate that is not a CA",
                         "give swarm-root-ca.crt, not a node certificate (swarm-node.crt)")
    return cert


def subject_cn(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""
