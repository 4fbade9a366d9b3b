"""TLS material for the quickstart: a self-signed CA and a server certificate signed by it.

The CA's private key is thrown away once the server certificate is signed, so a stolen data
directory cannot mint certificates that agents would trust; renewing means a new CA (run
`escrow tls init --force` and hand the new ca.pem to agents and custodians). Production points
server.tls_cert / server.tls_key at certificates from its own CA.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from escrow.core.errors import ConfigError
from escrow.core.files import write_atomic

SERVER_DAYS = 825
# Valid from an hour ago, as swarmkit does for node certificates: a client whose clock is
# behind the escrow's still accepts a certificate made a moment ago.
BACKDATE = timedelta(hours=1)


def default_names() -> list[str]:
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()]
    return list(dict.fromkeys(n for n in names if n))


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_quickstart_tls(directory: Path, names: list[str]) -> Path:
    """Write directory/ca.pem, server.pem and server.key (0600). Returns the CA path."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    # Every CA's name is its own, and its certificates name its key: clients trusting several
    # replicas' CAs from one file (README, "Run several replicas") find the right one; OpenSSL
    # would otherwise try the first CA of the same name and report a bad signature.
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarm-unseal escrow CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, socket.gethostname()),
                         x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(8))])
    ca_key_id = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - BACKDATE)
          .not_valid_after(now + timedelta(days=SERVER_DAYS + 1))
          .add_extension(ca_key_id, critical=False)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + timedelta(days=SERVER_DAYS))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_key_id), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_path = directory / "server.key"
    write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    (directory / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_path


# TLS 1.2 suites: ECDHE key exchange with an AEAD cipher only (OpenSSL's default list also has
# CBC suites with HMAC, e.g. ECDHE-ECDSA-AES128-SHA256, and plain DHE). Either key type, ECDSA
# as the quickstart's or RSA. TLS 1.3 suites are all AEAD and stay OpenSSL's defaults.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
])


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    return context


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2 (AEAD suites only, see TLS12_CIPHERS) or 1.3."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    # No TLS 1.3 session tickets: no client resumes a session (aiohttp does not), and OpenSSL
    # otherwise encrypts and sends two after every handshake.
    context.num_tickets = 0
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} / key {key}: {exc}",
                          "run `escrow tls init` for the quickstart certificates, or set "
                          "server.tls_cert and server.tls_key") from None
    return context


def client_context(ca: Path, setting: str = "--ca / ESCROW_CA") -> ssl.SSLContext:
    """Trust only the pinned CA, TLS 1.2 (AEAD suites only) or 1.3, host names checked;
    ``setting`` is where the caller's user gives the CA, for the hint."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    try:
        context.load_verify_locations(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the escrow CA {ca}: {exc}",
                          f"give {setting}: the escrow's tls/ca.pem") from None
    return context
