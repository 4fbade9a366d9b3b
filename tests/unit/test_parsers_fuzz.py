"""Fuzzing of every parser of bytes that come from outside the process.

Certificates (agents' node certificates, operators' root CAs), custodian keys, API request
bodies, SLIP-39 mnemonics, config files, the escrow's answers as the agent and the custodian CLI
read them, the agent's state file, swarm's files on a manager's disk, and backups. Each parser
may return a value or raise its documented error (an EscrowError or AgentError family, or
pydantic's ValidationError where the server turns it into a 400), nothing else; errors about
secret input (mnemonics, passphrases, PINs) never quote it.

Arbitrary text for escrow.toml, mnemonics and unlock keys is already fuzzed in test_config.py,
test_shares.py and test_unlockkey.py; the tests here add bytes that are not UTF-8, structured
near-valid input, and mutations of valid input. Every bug the fuzzing found is pinned by an
``@example`` or a test of its own.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import pytest
import shamir_mnemonic
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError
from shamir_mnemonic import Share
from shamir_mnemonic.wordlist import WORDLIST

from agent import client as agent_client
from agent import config as agent_config
from agent import state as agent_state
from agent import swarm_identity
from agent.errors import AgentError, SharesUnusable
from agent.release import candidate_keys
from escrow import (
    api_client,
    backup,
    config,
    custodian_keys,
    identity,
)
from escrow.cli import context, recover
from escrow.cli.serve import parse_listen
from escrow.core import encoding, protocol, shares
from escrow.core.errors import (
    ConfigError,
    EscrowError,
    IdentityError,
    InputError,
    RecoveryError,
    RequestError,
)
from escrow.core.hsm import read_pin_file
from escrow.core.protocol import (
    ApproveRequest,
    DenyRequest,
    DepositRequest,
    EnrollRequest,
    Message,
    PendingRequest,
    ReleasedShare,
    RequestStatus,
    ResultReport,
    ShareExportRequest,
    UnsealRequest,
)
from escrow.core.unlockkey import UnlockKey
from escrow.server import app
from escrow.service import fields
from lab.certs import make_node_cert, make_root_ca
from lab.custodians import PASSPHRASE

# Damaged serial numbers make cryptography warn that it will refuse them one day; our parsers
# map that refusal like any other.
pytestmark = pytest.mark.filterwarnings(
    "ignore::cryptography.utils.CryptographyDeprecationWarning")

T = TypeVar("T")
E = TypeVar("E", bound=Exception)
CLUSTER = "c" * 25
NODE = "n" * 25
FUZZ = settings(max_examples=150, deadline=None)
FILES = settings(max_examples=100, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])

ROOT = make_root_ca()
ROOT_DER = ROOT.cert.public_bytes(serialization.Encoding.DER)
MANAGER = make_node_cert(ROOT, NODE, CLUSTER)
MANAGER_DER = MANAGER.cert.public_bytes(serialization.Encoding.DER)
IDENTITY_REASONS = {"bad_certificate", "wrong_root_ca", "not_a_manager", "wrong_cluster",
                    "wrong_node", "cert_not_yet_valid", "cert_expired"}

# DER fragments that the regression examples patch.
X509_V3 = bytes.fromhex("a003020102")
P256_OID = bytes.fromhex("06082a8648ce3d030107")
EC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")
BASIC_CONSTRAINTS_CA = bytes.fromhex("040530030101ff")
CLUSTER_NAME = b"\x0c\x19" + CLUSTER.encode()  # UTF8String; 0x0d would be a RELATIVE-OID


def _common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def outcome(call: Callable[[], T], documented: type[E]) -> T | E:
    """What ``call`` returns, or the documented error it raised; anything else propagates and
    fails the test."""
    try:
        return call()
    except documented as exc:
        return exc


def patched(der: bytes, old: bytes, new: bytes) -> bytes:
    assert old in der
    return der.replace(old, new, 1)


def pem(der: bytes, label: str = "CERTIFICATE", headers: Sequence[str] = (),
        blank: bool = True) -> bytes:
    head = "".join(f"{h}\n" for h in headers) + ("\n" if headers and blank else "")
    return (f"-----BEGIN {label}-----\n{head}".encode() + base64.encodebytes(der)
            + f"-----END {label}-----\n".encode())


def flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    mutable = bytearray(data)
    for index, bit in flips:
        mutable[index % len(mutable)] ^= 1 << bit
    return bytes(mutable)


def bit_flipped(data: bytes) -> st.SearchStrategy[bytes]:
    return st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)),
                    min_size=1, max_size=3).map(lambda flips: flip(data, flips))


PEM_HEADERS = ["Proc-Type: 4,ENCRYPTED", "DEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF",
               "DEK-Info: NO-SUCH-CIPHER,0011", "DEK-Info: AES-128-CBC,zz", "kek-version: 7",
               "raft-dek: CAESIAAAAAAAAAAAAAAAAA==", "Comment: hello", "X-Long: " + "a" * 300,
               ":", "no colon here"]
PEM_LABELS = ["CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE", "CERTIFICATE REQUEST",
              "PUBLIC KEY", "PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "PKCS7", "",
              "CERTIFICATE "]
LINE_ENDS = [b"\r\n", b"\n\n", b" \n", b"\t\n", b"", b"\n \n", b"\r"]


def pem_variants(der: bytes, label: str, others: Sequence[bytes] = ()) -> st.SearchStrategy[bytes]:
    """Valid DER made damaged or oddly wrapped: flipped bits, truncation, RFC 1421 headers, other
    block labels, several blocks, other line ends, junk around, or no PEM at all."""
    text = pem(der, label)
    return st.one_of(
        bit_flipped(der).map(lambda damaged: pem(damaged, label)),
        st.integers(0, len(text) - 1).map(lambda n: text[:n]),
        st.integers(1, len(der) - 1).map(lambda n: pem(der[:n], label)),
        st.tuples(st.lists(st.sampled_from(PEM_HEADERS), min_size=1, max_size=3),
                  st.booleans()).map(lambda hb: pem(der, label, hb[0], hb[1])),
        st.sampled_from(PEM_LABELS).map(lambda other: pem(der, other)),
        st.lists(st.sampled_from([text, *others]), max_size=3).map(b"".join),
        st.sampled_from(LINE_ENDS).map(lambda end: text.replace(b"\n", end)),
        st.tuples(st.binary(max_size=40), st.binary(max_size=40)).map(
            lambda junk: junk[0] + text + junk[1]),
        st.binary(max_size=300),
    )


def _der_content(der: bytes, offset: int) -> tuple[int, int]:
    """Start and end of the content of the DER element at ``offset``."""
    first = der[offset + 1]
    if first < 0x80:
        return offset + 2, offset + 2 + first
    count = first & 0x7F
    start = offset + 2 + count
    return start, start + int.from_bytes(der[offset + 2 : start], "big")


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def resigned(cert: x509.Certificate, tbs: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A certificate whose to-be-signed part is ``tbs`` (whatever it holds), validly signed by
    ``key``: damage that only a signer could make, so it gets past the chain check."""
    der = cert.public_bytes(serialization.Encoding.DER)
    body, _ = _der_content(der, 0)
    _, tbs_end = _der_content(der, body)
    _, algorithm_end = _der_content(der, tbs_end)
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    bits = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    content = tbs + der[tbs_end:algorithm_end] + bits
    return b"\x30" + _der_length(len(content)) + content


def openssl_encrypted(der: bytes, password: bytes, label: str = "EC PRIVATE KEY") -> bytes:
    """OpenSSL's traditional PEM encryption (Proc-Type/DEK-Info headers, AES-128-CBC with
    EVP_BytesToKey), which lets a test encrypt any DER, damaged or not."""
    iv = os.urandom(16)
    key = hashlib.md5(password + iv[:8], usedforsecurity=False).digest()
    padder = padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    sealed = encryptor.update(padder.update(der) + padder.finalize()) + encryptor.finalize()
    return pem(sealed, label,
               ["Proc-Type: 4,ENCRYPTED", f"DEK-Info: AES-128-CBC,{iv.hex().upper()}"])


# -- certificates --------------------------------------------------------------------------

ROOT_WITH_BAD_VERSION = pem(patched(ROOT_DER, X509_V3, bytes.fromhex("a003020107")))
ROOT_WITH_UNKNOWN_CURVE = pem(patched(ROOT_DER, P256_OID, P256_OID[:-1] + b"\x08"))
ROOT_WITH_UNKNOWN_KEY_TYPE = pem(patched(ROOT_DER, EC_KEY_OID, EC_KEY_OID[:-1] + b"\x09"))
ROOT_WITH_BAD_EXTENSION = pem(patched(ROOT_DER, BASIC_CONSTRAINTS_CA,
                                      BASIC_CONSTRAINTS_CA[:-1] + b"\x07"))


@FUZZ
@given(pem_variants(ROOT_DER, "CERTIFICATE", [MANAGER.pem]))
@example(ROOT_WITH_BAD_VERSION)  # was x509.InvalidVersion
@example(ROOT_WITH_UNKNOWN_CURVE)  # was accepted, then UnsupportedAlgorithm at every check
@example(ROOT_WITH_UNKNOWN_KEY_TYPE)  # likewise
@example(ROOT_WITH_BAD_EXTENSION)  # was ValueError from the lazily parsed extensions
def test_a_damaged_root_ca_is_refused_with_input_error_or_works_for_node_checks(
        data: bytes) -> None:
    root = outcome(lambda: identity.parse_root_ca(data), InputError)
    if isinstance(root, InputError):
        assert root.hint
        return
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    checked = outcome(lambda: identity.check_node_cert(MANAGER.pem, data, CLUSTER, NODE,
                                                       datetime.now(UTC)), IdentityError)
    assert not isinstance(checked, IdentityError) or checked.reason == "wrong_root_ca"


def _self_signed(key: CertificateIssuerPrivateKeyTypes, ca: bool | None) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarm-ca")])
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(1)))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


ROOT_KEYS: dict[str, CertificateIssuerPrivateKeyTypes] = {
    "P-256": ec.generate_private_key(ec.SECP256R1()),
    "P-384": ec.generate_private_key(ec.SECP384R1()),
    "Ed25519": ed25519.Ed25519PrivateKey.generate(),
    "RSA": rsa.generate_private_key(65537, 2048)}


@pytest.mark.parametrize("key_type", sorted(ROOT_KEYS))
@pytest.mark.parametrize("ca", [True, False, None])
def test_a_root_ca_is_accepted_only_if_it_is_a_ca(key_type: str, ca: bool | None) -> None:
    data = _self_signed(ROOT_KEYS[key_type], ca)
    if ca:
        assert _common_name(identity.parse_root_ca(data)) == "swarm-ca"
        return
    with pytest.raises(InputError, match="not a CA"):
        identity.parse_root_ca(data)


def test_a_root_ca_file_with_two_certificates_is_refused() -> None:
    with pytest.raises(InputError, match="holds 2 certificates"):
        identity.parse_root_ca(ROOT.pem + ROOT.pem)


@st.composite
def resigned_manager_certs(draw: st.DrawFn) -> bytes:
    """The manager's certificate with bits flipped in what the root signs, signed again."""
    tbs = draw(bit_flipped(MANAGER.cert.tbs_certificate_bytes))
    return pem(resigned(MANAGER.cert, tbs, ROOT.key))


@FUZZ
@given(st.one_of(pem_variants(MANAGER_DER, "CERTIFICATE", [ROOT.pem]), resigned_manager_certs()))
@example(pem(patched(MANAGER_DER, X509_V3, bytes.fromhex("a003020107"))))  # was InvalidVersion
@example(pem(resigned(MANAGER.cert, patched(MANAGER.cert.tbs_certificate_bytes, X509_V3,
                                            bytes.fromhex("a003020107")), ROOT.key)))
@example(pem(resigned(MANAGER.cert, patched(MANAGER.cert.tbs_certificate_bytes, CLUSTER_NAME,
                                            b"\x0d" + CLUSTER_NAME[1:]), ROOT.key)))  # ValueError
def test_a_damaged_node_certificate_is_refused_with_identity_error(data: bytes) -> None:
    cert = outcome(lambda: identity.check_node_cert(data, ROOT.pem, CLUSTER, NODE,
                                                    datetime.now(UTC)), IdentityError)
    if isinstance(cert, IdentityError):
        assert cert.reason in IDENTITY_REASONS
        assert cert.hint
        return
    assert _common_name(cert) == NODE
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)  # what enroll uses next


def test_a_node_certificate_checked_against_a_bad_root_gives_an_escrow_error() -> None:
    for root in (ROOT_WITH_UNKNOWN_CURVE, ROOT_WITH_BAD_EXTENSION, b"garbage"):
        with pytest.raises(InputError):
            identity.check_node_cert(MANAGER.pem, root, CLUSTER, NODE, datetime.now(UTC))


NAME_OIDS = [NameOID.COMMON_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.ORGANIZATION_NAME,
             NameOID.LOCALITY_NAME]
NAME_VALUES = st.one_of(st.sampled_from([NODE, CLUSTER, "swarm-manager", "swarm-worker"]),
                        st.text(st.characters(exclude_categories=["Cs"]), min_size=1,
                                max_size=16))


@FUZZ
@given(names=st.lists(st.tuples(st.sampled_from(NAME_OIDS), NAME_VALUES), max_size=5),
       start=st.integers(-400, 400), days=st.integers(1, 400))
def test_a_certificate_signed_by_the_root_passes_only_with_this_node_names_and_dates(
        names: list[tuple[x509.ObjectIdentifier, str]], start: int, days: int) -> None:
    not_before = datetime.now(UTC) + timedelta(days=start)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(oid, value) for oid, value in names]))
            .issuer_name(ROOT.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before)
            .not_valid_after(not_before + timedelta(days=days)).sign(ROOT.key, hashes.SHA256()))
    checked = outcome(lambda: identity.check_node_cert(
        cert.public_bytes(serialization.Encoding.PEM), ROOT.pem, CLUSTER, NODE,
        datetime.now(UTC)), IdentityError)
    if isinstance(checked, IdentityError):
        assert checked.reason in IDENTITY_REASONS
        return
    assert sorted(v for o, v in names if o != NameOID.LOCALITY_NAME) == sorted(
        [NODE, CLUSTER, "swarm-manager"])
    assert start <= 0 < start + days


# -- custodian keys ------------------------------------------------------------------------

CUSTODIAN_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_DER = CUSTODIAN_KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
SEC1_DER = CUSTODIAN_KEY.private_bytes(serialization.Encoding.DER,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption())
PKCS8_PEM = CUSTODIAN_KEY.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.BestAvailableEncryption(PASSPHRASE))
PKCS8_DER = base64.b64decode(b"".join(PKCS8_PEM.splitlines()[1:-1]))
# What `escrow custodian keygen` writes, at one bcrypt round so that each example stays quick.
OPENSSH_BLOB = base64.b64decode(b"".join(
    custodian_keys.generate(PASSPHRASE, kdf_rounds=1)[0].strip().splitlines()[1:-1]))
OTHER_PUBLIC_KEYS = [k.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
                     for k in ROOT_KEYS.values()]
PUBLIC_KEY_WITH_UNKNOWN_CURVE = pem(patched(PUBLIC_DER, P256_OID, P256_OID[:-1] + b"\x08"),
                                    "PUBLIC KEY")


@FUZZ
@given(pem_variants(PUBLIC_DER, "PUBLIC KEY", OTHER_PUBLIC_KEYS) | st.sampled_from(
    OTHER_PUBLIC_KEYS))
@example(PUBLIC_KEY_WITH_UNKNOWN_CURVE)  # was UnsupportedAlgorithm
@example(pem(patched(PUBLIC_DER, EC_KEY_OID, EC_KEY_OID[:-1] + b"\x09"), "PUBLIC KEY"))
def test_a_damaged_custodian_public_key_is_refused_with_input_error(data: bytes) -> None:
    key = outcome(lambda: custodian_keys.load_public(data), InputError)
    if isinstance(key, InputError):
        assert "keygen" in key.hint
        return
    assert isinstance(key.curve, ec.SECP256R1)


PASSPHRASES = st.one_of(st.sampled_from([PASSPHRASE, b"", b"not the passphrase"]),
                        st.binary(max_size=40))
OTHER_PRIVATE_KEYS = [k.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(PASSPHRASE))
                      for k in ROOT_KEYS.values()]
PRIVATE_KEYS = st.one_of(
    pem_variants(PKCS8_DER, "ENCRYPTED PRIVATE KEY"),
    pem_variants(OPENSSH_BLOB, "OPENSSH PRIVATE KEY"),
    st.sampled_from(OTHER_PRIVATE_KEYS),
    bit_flipped(SEC1_DER).map(lambda der: openssl_encrypted(der, PASSPHRASE)),
    st.binary(max_size=200).map(lambda der: openssl_encrypted(der, PASSPHRASE)),
    st.sampled_from([openssl_encrypted(SEC1_DER, PASSPHRASE), pem(SEC1_DER, "EC PRIVATE KEY")]))


@FUZZ
@given(data=PRIVATE_KEYS, passphrase=PASSPHRASES)
@example(data=openssl_encrypted(patched(SEC1_DER, P256_OID, P256_OID[:-1] + b"\x08"),
                                PASSPHRASE), passphrase=PASSPHRASE)  # was UnsupportedAlgorithm
def test_a_damaged_custodian_private_key_is_refused_without_showing_the_passphrase(
        data: bytes, passphrase: bytes) -> None:
    key = outcome(lambda: custodian_keys.load_private(data, passphrase), InputError)
    if isinstance(key, InputError):
        if len(passphrase) >= 6:
            assert passphrase.decode("utf-8", "replace") not in key.diagnostics()
        return
    assert isinstance(key.curve, ec.SECP256R1)


# -- API request bodies --------------------------------------------------------------------

B64_TEXT = st.from_regex(r"\A[A-Za-z0-9+/]{0,60}={0,2}\Z")
ODD_TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["\ud800", "é", "\x00", "a" * 300]))
JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | ODD_TEXT | B64_TEXT
    | st.integers(-(2**70), 2**70) | st.sampled_from([2**63, 2**64, -1, 0]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
    max_leaves=12)
AGENT_KEY_PEM = protocol.public_pem(ec.generate_private_key(ec.SECP256R1()).public_key())
VALID_BODIES: dict[type[Message], dict[str, Any]] = {
    EnrollRequest: {"cluster_id": CLUSTER, "node_id": NODE,
                    "node_cert": MANAGER.pem.decode(), "agent_public_key": AGENT_KEY_PEM,
                    "hostname": "m1", "nonce": "AAAA", "swarm_signature": "",
                    "agent_signature": ""},
    DepositRequest: {"cluster_id": CLUSTER, "node_id": NODE, "nonce": "AAAA",
                     "sealed_key": "AAAA", "signature": ""},
    UnsealRequest: {"cluster_id": CLUSTER, "node_id": NODE, "node_cert": MANAGER.pem.decode(),
                    "ephemeral_public_key": "AAAA", "hostname": "m1", "boot_id": str(uuid.uuid4()),
                    "kek_version": "3", "nonce": "AAAA", "signature": ""},
    ApproveRequest: {"signature": "AAAA"},
    DenyRequest: {"reason": "not planned", "signature": "AAAA"},
    ShareExportRequest: {"cluster_id": CLUSTER, "ephemeral_public_key": "AAAA"},
    ResultReport: {"node_id": NODE, "outcome": "unlocked", "version": 1, "signature": ""},
}
REQUESTS = sorted(VALID_BODIES, key=lambda model: model.__name__)


@st.composite
def request_bodies(draw: st.DrawFn) -> tuple[type[Message], bytes]:
    """A valid body with one field replaced, dropped or added; any JSON; or any bytes."""
    model = draw(st.sampled_from(REQUESTS))
    body = dict(VALID_BODIES[model])
    how = draw(st.sampled_from(["replace", "drop", "add", "json", "bytes"]))
    if how == "bytes":
        return model, draw(st.binary(max_size=200))
    if how == "json":
        return model, json.dumps(draw(JSON)).encode()
    field = draw(st.sampled_from(sorted(body)))
    if how == "drop":
        del body[field]
    elif how == "add":
        body[draw(ODD_TEXT)] = draw(JSON)
    else:
        body[field] = draw(JSON)
    return model, json.dumps(body).encode()


def _server_body(model: type[Message], raw: bytes) -> Message:
    return app.parse_body(raw, model)


def _use_like_the_service(body: Message) -> None:
    """What Escrow does with a parsed body before any check can refuse it: decode base64,
    parse PEM, and build the length-prefixed payloads that signatures cover."""
    for name, size in (("nonce", 32), ("ephemeral_public_key", 32), ("sealed_key", None),
                       ("signature", None), ("swarm_signature", None), ("agent_signature", None)):
        if hasattr(body, name):
            decoded = outcome(partial(fields.b64, getattr(body, name), name, size),
                              RequestError)
            assert not isinstance(decoded, RequestError) or decoded.reason == "bad_encoding"
    if isinstance(body, EnrollRequest | UnsealRequest):
        cert = body.node_cert.encode("ascii")
        checked = outcome(lambda: identity.check_node_cert(
            cert, ROOT.pem, body.cluster_id, body.node_id, datetime.now(UTC)), IdentityError)
        assert not isinstance(checked, IdentityError) or checked.reason in IDENTITY_REASONS
    if isinstance(body, EnrollRequest):
        key = outcome(lambda: fields.p256_public(body.agent_public_key, "agent key"),
                      RequestError)
        assert not isinstance(key, RequestError) or key.reason == "bad_key"
        protocol.enroll_payload(body.cluster_id, body.node_id, b"", b"", body.hostname, b"")
    if isinstance(body, UnsealRequest):
        protocol.unseal_payload(body.cluster_id, body.node_id, b"", b"", body.hostname,
                                body.boot_id, body.kek_version, b"")
    if isinstance(body, ResultReport):
        protocol.result_payload("r-1", body.node_id, body.outcome, body.version)
    if isinstance(body, DenyRequest):
        encoding.encode("swarm-unseal/v1/approval", body.reason)


@settings(max_examples=400, deadline=None)
@given(request_bodies())
@example((ApproveRequest, b'{"\\ud800": 1, "signature": ""}'))  # the 400 did not serialise
@example((EnrollRequest, json.dumps({**VALID_BODIES[EnrollRequest],
                                     "node_cert": "\u00e9"}).encode()))  # was UnicodeEncodeError
@example((ResultReport, json.dumps({**VALID_BODIES[ResultReport],
                                    "version": 2**64}).encode()))  # was OverflowError
def test_a_request_body_is_a_400_naming_the_problem_or_usable_by_the_service(
        case: tuple[type[Message], bytes]) -> None:
    model, raw = case
    body = outcome(lambda: _server_body(model, raw), RequestError)
    if isinstance(body, RequestError):
        assert body.status == 400
        assert body.reason in ("malformed_json", "invalid_body")
        # What the middleware answers must itself be sendable.
        sent = app._error(body.status, body.reason, body.message, body.hint)
        assert json.loads(sent.text or "")["error"] == body.reason
        return
    _use_like_the_service(body)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(REQUESTS), st.one_of(st.binary(max_size=200),
                                            JSON.map(lambda v: json.dumps(v).encode())))
def test_request_models_refuse_arbitrary_json_with_validation_error_only(
        model: type[Message], raw: bytes) -> None:
    parsed = outcome(lambda: model.model_validate_json(raw), ValidationError)
    assert isinstance(parsed, model | ValidationError)


def test_a_deeply_nested_body_is_a_400() -> None:
    with pytest.raises(RequestError) as caught:
        _server_body(ApproveRequest, b"[" * 5000 + b"]" * 5000)
    assert caught.value.status == 400


@FUZZ
@given(st.one_of(st.text(max_size=80), B64_TEXT), st.sampled_from([None, 32]))
def test_base64_fields_decode_or_give_value_error_and_request_error(
        text: str, size: int | None) -> None:
    try:
        raw = protocol.b64d(text)
    except ValueError:
        with pytest.raises(RequestError, match="is not base64"):
            fields.b64(text, "nonce", size)
        return
    assert base64.b64decode(protocol.b64e(raw)) == raw
    decoded = outcome(lambda: fields.b64(text, "nonce", size), RequestError)
    if isinstance(decoded, RequestError):
        assert f"must be {size} bytes" in decoded.message
    else:
        assert decoded == raw


@FUZZ
@given(st.text(max_size=120), st.binary(max_size=64))
def test_verifying_an_arbitrary_signature_is_false_never_an_exception(
        signature: str, payload: bytes) -> None:
    assert protocol.verify(CUSTODIAN_KEY.public_key(), signature, payload) is False


@FUZZ
@given(st.one_of(st.text(max_size=200),
                 st.binary(max_size=120).map(lambda raw: pem(raw, "PUBLIC KEY").decode()),
                 st.sampled_from([k.decode() for k in OTHER_PUBLIC_KEYS])))
def test_an_agent_public_key_that_is_not_p256_pem_is_a_request_error(text: str) -> None:
    key = outcome(lambda: fields.p256_public(text, "agent public key"), RequestError)
    if isinstance(key, RequestError):
        assert key.reason == "bad_key"
        return
    assert isinstance(key.curve, ec.SECP256R1)


def test_an_agent_public_key_on_an_unknown_curve_is_a_request_error() -> None:
    with pytest.raises(RequestError):
        fields.p256_public(PUBLIC_KEY_WITH_UNKNOWN_CURVE.decode(), "agent public key")


# -- mnemonics -----------------------------------------------------------------------------

KEY = UnlockKey(os.urandom(32))
SPLIT = shares.split(KEY, 2, 3)
OTHER_SPLIT = shares.split(UnlockKey(os.urandom(32)), 2, 3)
SHORT_SECRET_SPLIT = shamir_mnemonic.generate_mnemonics(1, [(2, 3)], os.urandom(16))[0]


def _leaked_pairs(text: str, mnemonics: Sequence[str]) -> list[str]:
    """Adjacent word pairs of the input that an error message repeats."""
    pairs = {f"{a} {b}" for m in mnemonics for a, b in zip(m.lower().split(),
                                                          m.lower().split()[1:], strict=False)}
    return [pair for pair in pairs if pair in text.lower()]


@FUZZ
@given(st.lists(st.sampled_from(WORDLIST), max_size=60),
       st.sampled_from([" ", "  ", "\t", "\n", " \u00a0 "]), st.booleans())
def test_words_from_the_list_parse_as_a_share_or_give_recovery_error(
        words: list[str], separator: str, upper: bool) -> None:
    text = separator.join(w.upper() if upper else w for w in words)
    parsed = outcome(lambda: shares.parse_share(text, "line 1"), RecoveryError)
    if isinstance(parsed, RecoveryError):
        assert parsed.message.startswith("line 1")
        assert not _leaked_pairs(parsed.diagnostics(), [text])
        return
    assert parsed.mnemonic == " ".join(words)


@st.composite
def checksummed_shares(draw: st.DrawFn) -> list[str]:
    """Mnemonics with valid checksums and any parameters: forged or from other secrets."""
    identifier = draw(st.integers(0, 2**15 - 1))
    iteration = draw(st.integers(0, 1))  # each step doubles PBKDF2's work; real shares use 1
    group_count = draw(st.integers(1, 16))
    mnemonics = []
    for _ in range(draw(st.integers(1, 4))):
        share = Share(
            draw(st.sampled_from([identifier, identifier, draw(st.integers(0, 2**15 - 1))])),
            draw(st.booleans()), iteration, draw(st.integers(0, 15)), draw(st.integers(1, 16)),
            group_count, draw(st.integers(0, 15)), draw(st.integers(1, 16)),
            draw(st.binary(min_size=16, max_size=34).filter(lambda v: len(v) % 2 == 0)))
        mnemonics.append(str(share.mnemonic()))
    return mnemonics


@FUZZ
@given(st.one_of(checksummed_shares(),
                 st.lists(st.sampled_from([*SPLIT, *OTHER_SPLIT, *SHORT_SECRET_SPLIT]),
                          max_size=4)))
@example(SHORT_SECRET_SPLIT[:2])  # combined to 16 bytes: InputError, not a RecoveryError
def test_shares_with_valid_checksums_combine_to_a_key_or_give_recovery_error(
        mnemonics: list[str]) -> None:
    key = outcome(lambda: shares.combine(mnemonics), RecoveryError)
    if isinstance(key, RecoveryError):
        assert not _leaked_pairs(key.diagnostics(), mnemonics)
        return
    assert len(key.kek) == 32


@st.composite
def mutated_split(draw: st.DrawFn) -> list[str]:
    mnemonics = [m.split() for m in draw(st.permutations(SPLIT))[: draw(st.integers(1, 3))]]
    for _ in range(draw(st.integers(1, 3))):
        words = mnemonics[draw(st.integers(0, len(mnemonics) - 1))]
        at = draw(st.integers(0, len(words) - 1))
        how = draw(st.sampled_from(["replace", "swap", "drop", "repeat", "truncate", "typo"]))
        if how == "replace":
            words[at] = draw(st.sampled_from(WORDLIST))
        elif how == "swap" and at + 1 < len(words):
            words[at], words[at + 1] = words[at + 1], words[at]
        elif how == "drop" and len(words) > 1:
            del words[at]
        elif how == "repeat":
            words.insert(at, words[at])
        elif how == "truncate":
            del words[at + 1 :]
        elif how == "typo":
            words[at] = words[at][:-1] + draw(st.sampled_from("aeiouxyz"))
    return [" ".join(words) for words in mnemonics]


@FUZZ
@given(mutated_split())
def test_mistyped_shares_rebuild_the_key_or_say_what_is_wrong_without_echoing_them(
        mnemonics: list[str]) -> None:
    key = outcome(lambda: shares.combine(mnemonics), RecoveryError)
    if isinstance(key, RecoveryError):
        assert key.hint
        assert not _leaked_pairs(key.diagnostics(), [*mnemonics, *SPLIT])
    else:
        assert key == KEY


@FUZZ
@given(st.lists(st.one_of(st.sampled_from([*SPLIT, *OTHER_SPLIT, "# a comment", ""]),
                          st.text(max_size=40)), max_size=5))
def test_escrow_recover_reads_any_input_as_shares_or_gives_recovery_error(
        lines: list[str]) -> None:
    text = "\n".join(line.replace("\n", " ") for line in lines)

    def recover_from_stdin() -> UnlockKey:
        with mock.patch("sys.stdin", io.StringIO(text)):
            return recover._from_stdin().key()

    key = outcome(recover_from_stdin, RecoveryError)
    if isinstance(key, RecoveryError):
        assert not _leaked_pairs(key.diagnostics(), SPLIT)
        return
    assert len(key.kek) == 32


# -- config files --------------------------------------------------------------------------

ESCROW_SETTINGS = sorted(config._SETTINGS)
TOML_VALUES = st.recursive(
    st.booleans() | st.text(max_size=20) | st.integers(-(2**64), 2**64)
    | st.floats() | st.datetimes() | st.dates(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6)


@st.composite
def escrow_tomls(draw: st.DrawFn) -> tuple[bytes, set[str]]:
    """escrow.toml with known and unknown settings holding any TOML value; and the names a
    message about it could name."""
    document: dict[str, Any] = {"hsm": {"module": "/lib/p11.so", "token": "t"}}
    for _ in range(draw(st.integers(1, 4))):
        table, key = draw(st.sampled_from(ESCROW_SETTINGS)) if draw(st.booleans()) else (
            draw(st.sampled_from(["hsm", "server", "x"])), draw(st.text(min_size=1, max_size=8)))
        if draw(st.booleans()):
            document.setdefault(table, {})
            if isinstance(document[table], dict):
                document[table][key] = draw(TOML_VALUES)
        else:
            document[table] = draw(TOML_VALUES)
    names = set(document) | {repr(t) for t in document} | {
        f"{t}.{k}" for t, v in document.items() if isinstance(v, dict) for k in v}
    return tomli_w.dumps(document).encode(), names | {"hsm.module", "hsm.token"}


def _escrow_toml_cases() -> st.SearchStrategy[tuple[bytes, set[str]]]:
    return st.one_of(escrow_tomls(), st.binary(max_size=200).map(lambda raw: (raw, set())))


def _write(directory: Path, name: str, data: bytes) -> Path:
    (directory / name).write_bytes(data)
    return directory / name


HSM = b'[hsm]\nmodule = "/a.so"\ntoken = "t"\n'


@FILES
@given(_escrow_toml_cases())
@example((HSM + b"[server]\nmax_body_bytes = inf\n", {"server.max_body_bytes"}))  # OverflowError
@example((HSM + b"[server]\nmax_body_bytes = nan\n", {"server.max_body_bytes"}))  # ValueError
@example((HSM + b"[keys]\nretention_days = 0x" + b"f" * 300 + b"\n",
          {"keys.retention_days"}))  # was OverflowError from float()
@example((HSM + b"[keys]\nretention_days = " + b"9" * 5000 + b"\n", set()))  # tomllib ValueError
@example((HSM + b"[keys]\nretention_days = " + b"[" * 2000 + b"]" * 2000 + b"\n", set()))
@example((b"# \xff\xfe not UTF-8\n" + HSM, set()))  # was UnicodeDecodeError
def test_escrow_toml_loads_or_gives_config_error_naming_the_setting(
        tmp_path: Path, case: tuple[bytes, set[str]]) -> None:
    data, names = case
    _write(tmp_path, config.CONFIG_NAME, data)
    loaded = outcome(lambda: config.load(tmp_path, env={}), ConfigError)
    if isinstance(loaded, ConfigError):
        message = loaded.message
        assert not names or any(name in message for name in names) or "TOML" in message, message
        return
    server = loaded.server
    assert isinstance(server.max_body_bytes, int)
    assert isinstance(server.rate_limit, int)
    for number in (loaded.retention_days, server.request_ttl_seconds,
                   server.rate_window_seconds):
        assert 0 <= number < float("inf")


@FUZZ
@given(st.dictionaries(st.sampled_from([env for env, _ in config._SETTINGS.values()]),
                       st.one_of(st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
                                 st.sampled_from(["inf", "-inf", "nan", "1e400", "0x10", "٣"])),
                       max_size=4))
@example({"ESCROW_SERVER_MAX_BODY_BYTES": "inf"})  # was OverflowError
@example({"ESCROW_REQUESTS_RATE_LIMIT": "nan"})  # was ValueError
def test_escrow_environment_settings_load_or_give_config_error_naming_the_variable(
        tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> None:
    directory = tmp_path_factory.getbasetemp() / "env-config"
    directory.mkdir(exist_ok=True)
    _write(directory, config.CONFIG_NAME, HSM)
    loaded = outcome(lambda: config.load(directory, env=env), ConfigError)
    if isinstance(loaded, ConfigError):
        assert any(name in loaded.message for name, value in env.items() if value)


def test_an_escrow_toml_that_is_a_directory_gives_config_error(tmp_path: Path) -> None:
    (tmp_path / config.CONFIG_NAME).mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path, env={})


def test_a_listen_address_with_a_superscript_port_gives_config_error() -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_listen("127.0.0.1:\u00b2")


@FUZZ
@given(st.text(max_size=30))
@example("127.0.0.1:\u0663")  # an Arabic-Indic digit is a digit to int() too
def test_a_listen_address_parses_or_gives_config_error(text: str) -> None:
    parsed = outcome(lambda: parse_listen(text), ConfigError)
    if not isinstance(parsed, ConfigError):
        assert 0 < parsed[1] < 65536


def test_a_pin_file_that_is_not_utf8_gives_config_error_without_its_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path, "pin", b"12\xff34\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        read_pin_file(path, "file pin")
    assert "0xff" not in caught.value.diagnostics()


AGENT_KEYS = sorted(agent_config._KNOWN)


@st.composite
def agent_tomls(draw: st.DrawFn) -> tuple[bytes, set[str]]:
    document: dict[str, Any] = {"escrow_url": "https://escrow:8443", "escrow_ca": "/ca.pem"}
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(AGENT_KEYS) | st.text(min_size=1, max_size=10))
        document[key] = draw(TOML_VALUES)
    names = set(document) | {repr(key) for key in document}
    return tomli_w.dumps(document).encode(), names | {"escrow_url", "escrow_ca"}


@FILES
@given(st.one_of(agent_tomls(), st.binary(max_size=200).map(lambda raw: (raw, set()))))
@example((b"docker_poll_seconds = 0x" + b"f" * 4000 + b"\n",
          {"docker_poll_seconds"}))  # repr() of the value in the message raised ValueError
@example((b"key_check_seconds = " + b"9" * 5000 + b"\n", set()))  # tomllib's ValueError
@example((b"escrow_url = " + b"[" * 2000 + b"]" * 2000 + b"\n", set()))  # RecursionError
@example((b'escrow_ca = "\xff"\n', set()))  # was UnicodeDecodeError
def test_agent_config_loads_or_gives_agent_error_naming_the_setting(
        tmp_path: Path, case: tuple[bytes, set[str]]) -> None:
    data, names = case
    path = _write(tmp_path, "config.toml", data)
    loaded = outcome(lambda: agent_config.load(path, {}), AgentError)
    if isinstance(loaded, AgentError):
        assert not names or any(name in loaded.message for name in names), loaded.message
        return
    assert loaded.escrow_url
    assert all(url.startswith("https://") for url in loaded.escrow_url)
    assert isinstance(loaded.escrow_ca, Path)
    for key in agent_config.SECONDS:
        low, high = agent_config._LIMITS[key]
        assert low <= getattr(loaded, key) <= high


def test_an_agent_config_that_is_a_directory_gives_agent_error(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="cannot read"):
        agent_config.load(tmp_path, {})


# -- the escrow's answers, as the agent and the custodian CLI read them --------------------

ANSWER_MODELS: list[type[BaseModel]] = [RequestStatus, protocol.NonceResponse,
                                        protocol.InfoResponse, protocol.EnrollResponse,
                                        protocol.DepositResponse, protocol.HealthResponse]
STATUSES = st.sampled_from([200, 201, 204, 301, 400, 401, 403, 404, 409, 413, 429, 500, 502,
                            503]) | st.integers(100, 599)
ANSWER_TEXT = st.one_of(st.text(max_size=200), JSON.map(json.dumps),
                        st.sampled_from(['{"error": "x", "message": "y", "hint": "z"}',
                                         '{"error": 1}', "null", "<html>bad gateway</html>"]))
DEEP = "[" * 5000 + "]" * 5000
STATUS_WITH_HUGE_VERSION = json.dumps({
    "request_id": "r-1", "cluster_id": CLUSTER, "node_id": NODE, "state": "ready",
    "created_at": "", "expires_at": "", "threshold": 1, "needed": 0, "approvals": [],
    "releases": [{"version": 2**64, "fingerprint": "f", "slot": 0, "holder": "auto",
                  "sealed_share": ""}]})


@FUZZ
@given(STATUSES, ANSWER_TEXT, st.sampled_from(ANSWER_MODELS))
@example(400, DEEP, RequestStatus)  # was RecursionError
@example(503, DEEP, RequestStatus)  # was RecursionError
@example(200, STATUS_WITH_HUGE_VERSION, RequestStatus)  # was OverflowError in candidate_keys
def test_any_escrow_answer_is_a_model_or_an_agent_error(
        status: int, text: str, model: type[BaseModel]) -> None:
    answer = outcome(lambda: agent_client.parse_answer(status, text, model), AgentError)
    if isinstance(answer, AgentError):
        assert answer.message
        return
    assert status < 400
    assert isinstance(answer, model)
    if isinstance(answer, RequestStatus):
        keys = outcome(lambda: list(candidate_keys(answer, X25519PrivateKey.generate())),
                       SharesUnusable)
        assert isinstance(keys, list | SharesUnusable)


@FUZZ
@given(STATUSES, ANSWER_TEXT, st.sampled_from([TypeAdapter(list[PendingRequest]),
                                               protocol.DecisionResponse, ReleasedShare]))
@example(403, DEEP, protocol.DecisionResponse)  # was RecursionError
def test_any_escrow_answer_to_a_custodian_is_a_model_or_an_escrow_error(
        status: int, text: str, answer: TypeAdapter[Any] | type[BaseModel]) -> None:
    parsed = outcome(lambda: api_client.parse_answer(status, text, answer), EscrowError)
    assert isinstance(parsed, EscrowError) or status < 400


def test_a_pending_request_with_an_unreadable_creation_time_is_still_listed() -> None:
    assert context.age_of("yesterday") == "?"


REQUEST_ID = "r-1"


def _released(ephemeral: X25519PrivateKey, version: int, slot: int, plain: bytes,
              fingerprint: str) -> ReleasedShare:
    info = protocol.share_info(REQUEST_ID, CLUSTER, version, slot)
    sealed = protocol.HPKE.encrypt(plain, ephemeral.public_key(), info=info)
    return ReleasedShare(version=version, fingerprint=fingerprint, slot=slot, holder="auto",
                         sealed_share=protocol.b64e(sealed))


RELEASE_PLAINTEXTS = st.one_of(st.sampled_from([m.encode() for m in SPLIT + SHORT_SECRET_SPLIT]),
                               st.binary(max_size=80), st.sampled_from([b"\xff", b"\xc3\xa9"]))


@st.composite
def released_shares(draw: st.DrawFn) -> tuple[X25519PrivateKey, RequestStatus]:
    """Shares as a faulty or hostile escrow might release them: decryptable garbage, shares of
    other secrets, wrong fingerprints, ciphertexts for another key or no ciphertext at all."""
    ephemeral = X25519PrivateKey.generate()
    releases = []
    for _ in range(draw(st.integers(0, 4))):
        version, slot = draw(st.integers(1, 3)), draw(st.integers(0, 3))
        fingerprint = draw(st.sampled_from([KEY.fingerprint(CLUSTER), "0" * 64]))
        if draw(st.booleans()):
            releases.append(_released(ephemeral, version, slot, draw(RELEASE_PLAINTEXTS),
                                      fingerprint))
        else:
            releases.append(ReleasedShare(version=version, fingerprint=fingerprint, slot=slot,
                                          holder="auto", sealed_share=draw(B64_TEXT)))
    return ephemeral, RequestStatus(
        request_id=REQUEST_ID, cluster_id=CLUSTER, node_id=NODE, state="ready", created_at="",
        expires_at="", threshold=2, needed=0, approvals=[], releases=releases)


def _status(ephemeral: X25519PrivateKey, plains: Sequence[bytes]) -> RequestStatus:
    return RequestStatus(
        request_id=REQUEST_ID, cluster_id=CLUSTER, node_id=NODE, state="ready", created_at="",
        expires_at="", threshold=2, needed=0, approvals=[],
        releases=[_released(ephemeral, 1, slot, plain, KEY.fingerprint(CLUSTER))
                  for slot, plain in enumerate(plains)])


_EPHEMERAL = X25519PrivateKey.generate()


@FUZZ
@given(released_shares())
@example((_EPHEMERAL, _status(_EPHEMERAL, [b"\xff"])))  # was UnicodeDecodeError
@example((_EPHEMERAL, _status(_EPHEMERAL, [m.encode() for m in SHORT_SECRET_SPLIT[:2]])))
def test_released_shares_give_keys_or_shares_unusable(
        case: tuple[X25519PrivateKey, RequestStatus]) -> None:
    ephemeral, status = case
    keys = outcome(lambda: list(candidate_keys(status, ephemeral)), SharesUnusable)
    if isinstance(keys, SharesUnusable):
        assert keys.hint
        return
    assert all(key == KEY for _, key in keys)


# -- the agent's own files and swarm's files on a manager ----------------------------------

STATE_CASES = st.one_of(st.binary(max_size=100), JSON.map(lambda v: json.dumps(v).encode()),
                        st.dictionaries(st.sampled_from(["node_id", "escrowed", "last_unlock",
                                                         "checked_kek_version", "other"]),
                                        JSON, max_size=3).map(lambda d: json.dumps(d).encode()))


@FILES
@given(STATE_CASES)
@example(b"5")  # was AttributeError ('int' object has no attribute 'pop')
@example(b'{"escrowed": "x"}')  # was accepted, then AttributeError in versions()
@example(DEEP.encode())  # was RecursionError
def test_a_damaged_agent_state_file_gives_agent_error_or_a_usable_state(
        tmp_path: Path, data: bytes) -> None:
    path = _write(tmp_path, "state.json", data)
    state = outcome(lambda: agent_state.load(path), AgentError)
    if isinstance(state, AgentError):
        assert "damaged" in state.message
        return
    assert all(isinstance(v, int) for v in state.versions())
    assert isinstance(state.knows(NODE, CLUSTER), bool)
    assert all(isinstance(getattr(state, f), str) for f in ("node_id", "cluster_id",
                                                            "checked_kek_version"))


NODE_KEY_PEM = MANAGER.key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
    serialization.BestAvailableEncryption(KEY.kek))
SWARM_NODE_KEY = NODE_KEY_PEM.replace(b"-----\n", b"-----\nkek-version: 3\nraft-dek: AAAA\n\n",
                                      1)
NODE_KEY_DER = base64.b64decode(b"".join(NODE_KEY_PEM.splitlines()[1:-1]))
# A flipped bit of the AES-CBC IV flips the same bit of the first plaintext block, which holds
# the key type: the key decrypts, to a type cryptography does not know.
AES_256_CBC_IV = bytes.fromhex("060960864801650304012a0410")
NODE_KEY_OF_UNKNOWN_TYPE = pem(
    flip(NODE_KEY_DER, [(NODE_KEY_DER.index(AES_256_CBC_IV) + len(AES_256_CBC_IV) + 15, 3)]),
    "ENCRYPTED PRIVATE KEY", ["kek-version: 3"])


@FUZZ
@given(st.one_of(pem_variants(NODE_KEY_DER, "ENCRYPTED PRIVATE KEY"), st.just(SWARM_NODE_KEY)))
@example(NODE_KEY_OF_UNKNOWN_TYPE)  # was UnsupportedAlgorithm
def test_a_damaged_swarm_node_key_gives_agent_error_or_the_key(data: bytes) -> None:
    assert isinstance(swarm_identity.kek_version(data), str)
    key = outcome(lambda: swarm_identity.decrypt_node_key(data, KEY), AgentError)
    assert isinstance(key, AgentError | ec.EllipticCurvePrivateKey)


@FUZZ
@given(st.binary(max_size=300))
def test_pem_headers_of_any_bytes_are_read_without_an_exception(data: bytes) -> None:
    assert isinstance(swarm_identity.kek_version(data), str)


@FILES
@given(pem_variants(MANAGER_DER, "CERTIFICATE", [ROOT.pem]))
@example(b"# \xc3\xa9\n" + MANAGER.pem)  # was UnicodeDecodeError
@example(pem(patched(MANAGER_DER, X509_V3, bytes.fromhex("a003020107"))))  # InvalidVersion
@example(pem(patched(MANAGER_DER, CLUSTER_NAME, b"\x0d" + CLUSTER_NAME[1:])))  # ValueError
def test_a_damaged_swarm_node_certificate_on_disk_gives_agent_error_or_the_identity(
        tmp_path: Path, data: bytes) -> None:
    directory = tmp_path / swarm_identity.CERT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory, "swarm-node.crt", data)
    _write(directory, "swarm-node.key", SWARM_NODE_KEY)
    node = outcome(lambda: swarm_identity.read_identity(tmp_path), AgentError)
    if isinstance(node, AgentError):
        assert "swarm-node.crt" in node.message
        return
    assert node.kek_version == "3"
    assert node.cert_pem.isascii()


# -- backups -------------------------------------------------------------------------------

def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


DB = b"SQLite format 3\x00"
MANIFEST = {"format": 1, "created_at": "2026-11-01T12:00:00+00:00", "audit_records": 1,
            "audit_head": "00", "files": {"escrow.db": hashlib.sha256(DB).hexdigest()}}
GOOD_BACKUP = _tar({backup.MANIFEST: json.dumps(MANIFEST).encode(), "escrow.db": DB})


@st.composite
def backups(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["bytes", "flip", "truncate", "manifest", "field"]))
    if how == "bytes":
        return draw(st.binary(max_size=200))
    if how == "flip":
        return draw(bit_flipped(GOOD_BACKUP))
    if how == "truncate":
        return GOOD_BACKUP[: draw(st.integers(0, len(GOOD_BACKUP) - 1))]
    manifest: Any = draw(JSON) if how == "manifest" else {
        **MANIFEST, draw(st.sampled_from(sorted(MANIFEST))): draw(JSON)}
    return _tar({backup.MANIFEST: json.dumps(manifest).encode(), "escrow.db": DB})


@FILES
@given(backups())
@example(_tar({backup.MANIFEST: json.dumps({**MANIFEST, "audit_records": float("inf")}).encode(),
               "escrow.db": DB}))  # was OverflowError
@example(_tar({backup.MANIFEST: DEEP.encode(), "escrow.db": DB}))  # was RecursionError
@example(_tar({backup.MANIFEST: json.dumps({**MANIFEST, "audit_head": 0}).encode(),
               "escrow.db": DB}))  # was accepted; restore's message then raised TypeError
def test_a_damaged_backup_gives_input_error(tmp_path: Path, data: bytes) -> None:
    path = _write(tmp_path, "escrow.backup", data)
    read = outcome(lambda: backup._read(path), InputError)
    if isinstance(read, InputError):
        assert read.hint
        return
    manifest, contents = read
    assert set(contents) == set(manifest.files)
    # restore() formats these into its messages and audit record
    assert isinstance(manifest.audit_head, str)
    assert isinstance(manifest.created_at, str)


def test_the_backup_the_fuzzing_starts_from_is_accepted(tmp_path: Path) -> None:
    manifest, contents = backup._read(_write(tmp_path, "escrow.backup", GOOD_BACKUP))
    assert contents == {"escrow.db": DB}
    assert manifest.audit_records == 1


def test_a_postgresql_escrow_backup_holds_no_database_and_says_so(tmp_path: Path) -> None:
    toml = b'[store]\nurl = "postgresql://escrow@db.example/escrow"\n'
    files = {"escrow.toml": hashlib.sha256(toml).hexdigest()}
    manifest, contents = backup._read(_write(tmp_path, "pg.backup", _tar({
        backup.MANIFEST: json.dumps({**MANIFEST, "files": files, "store": "postgresql"}).encode(),
        "escrow.toml": toml})))
    assert (manifest.store, contents) == ("postgresql", {"escrow.toml": toml})
    # A database beside a manifest that says PostgreSQL, or none beside one that says SQLite
    # (what a backup without "store" is), or a store of another kind: not a backup we made.
    for store, members in (("postgresql", {"escrow.toml": toml, "escrow.db": DB}),
                           ("sqlite", {"escrow.toml": toml}), ("mysql", {"escrow.toml": toml})):
        listed = {name: hashlib.sha256(content).hexdigest() for name, content in members.items()}
        with pytest.raises(InputError):
            backup._read(_write(tmp_path, f"{store}.backup", _tar({
                backup.MANIFEST: json.dumps({**MANIFEST, "files": listed,
                                             "store": store}).encode(), **members})))


@pytest.mark.parametrize("point", [bytes(32), bytes([1]) + bytes(31)])
def test_a_low_order_ephemeral_key_is_refused_before_any_request_is_recorded(point: bytes) -> None:
    # Shares can never be encrypted to such a key: accepting it made every poll answer 500.
    with pytest.raises(RequestError, match="not a usable X25519 public key"):
        fields.ephemeral(base64.b64encode(point).decode("ascii"))
