"""Every identity check of a request, in escrow.service.authentication: on a real SQLite store
in a temporary directory, with no token, no server and no network."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from escrow.audit import AuditEvent
from escrow.core import protocol
from escrow.core.errors import IdentityError
from escrow.core.protocol import UnsealRequest
from escrow.core.states import NodeStatus
from escrow.core.timestamps import timestamp
from escrow.nonces import NonceMinter
from escrow.service.authentication import Authenticator
from escrow.store import CustodianRecord, NodeRecord
from escrow.store.sqlite import SqliteStore
from escrow.vault import Vault
from lab.certs import Issued, make_node_cert, make_root_ca

CLUSTER = "c" * 25
NODE = "n" * 25


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


class PlainWrapper:
    """Stands in for the token: these tests never unwrap a share."""

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes:
        return plaintext

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        return wrapped


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.store = SqliteStore.open(tmp_path / "escrow.db",
                                      lambda: timestamp(self.clock()), create=True)
        self.ca = make_root_ca()
        Vault(self.store, PlainWrapper(), self.clock, "test").add_cluster(
            CLUSTER, self.ca.pem, 1, ["auto"], allow_no_paper=True)
        self.node_cert = make_node_cert(self.ca, NODE, CLUSTER)
        self.agent_key = ec.generate_private_key(ec.SECP256R1())
        self.enroll(NodeStatus.ACTIVE)
        self.auth = Authenticator(self.store, NonceMinter(secrets.token_bytes(32), self.clock),
                                  self.clock)

    def enroll(self, status: NodeStatus) -> None:
        self.store.enroll_node(
            NodeRecord(CLUSTER, NODE, protocol.public_pem(self.agent_key.public_key()), "host",
                       timestamp(self.clock()), NodeStatus.ACTIVE),
            AuditEvent("node.enroll", "test", CLUSTER, {}))
        if status != NodeStatus.ACTIVE:
            self.store.set_node_status(CLUSTER, NODE, status,
                                       AuditEvent("node.revoke", "test", CLUSTER, {}))

    def unseal(self, *, signer: ec.EllipticCurvePrivateKey | None = None,
               cert: Issued | None = None, nonce: bytes | None = None) -> UnsealRequest:
        cert = cert or self.node_cert
        nonce = nonce if nonce is not None else self.auth.nonces.issue()[0]
        ephemeral = X25519PrivateKey.generate().public_key().public_bytes_raw()
        payload = protocol.unseal_payload(
            CLUSTER, NODE, cert.cert.public_bytes(serialization.Encoding.DER), ephemeral,
            "host", "unknown", "", nonce)
        return UnsealRequest(
            cluster_id=CLUSTER, node_id=NODE, node_cert=cert.pem.decode(),
            ephemeral_public_key=protocol.b64e(ephemeral), hostname="host", boot_id="unknown",
            nonce=protocol.b64e(nonce), signature=protocol.sign(signer or self.agent_key,
                                                                payload))

    def audit_rows(self) -> int:
        return sum(1 for _ in self.store.iter_audit())


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    made = World(tmp_path)
    yield made
    made.store.close()


@contextmanager
def refused(reason: str) -> Iterator[None]:
    with pytest.raises(IdentityError) as caught:
        yield
    assert caught.value.reason == reason


def test_an_unseal_signed_by_the_enrolled_key_over_a_fresh_nonce_is_verified(world: World,
                                                                           ) -> None:
    verified = world.auth.verify_unseal(world.unseal())
    assert verified.node.node_id == NODE
    world.auth.admit_unseal(verified, world.unseal())


def test_a_nonce_is_used_once(world: World) -> None:
    nonce = world.auth.nonces.issue()[0]
    world.auth.verify_unseal(world.unseal(nonce=nonce))
    with refused("stale_nonce"):
        world.auth.verify_unseal(world.unseal(nonce=nonce))


def test_an_expired_nonce_is_refused(world: World) -> None:
    nonce = world.auth.nonces.issue()[0]
    world.clock.now += timedelta(minutes=10)
    with refused("stale_nonce"):
        world.auth.verify_unseal(world.unseal(nonce=nonce))


def test_a_nonce_this_escrow_did_not_mint_is_refused(world: World) -> None:
    with refused("stale_nonce"):
        world.auth.verify_unseal(world.unseal(nonce=secrets.token_bytes(32)))


def test_a_request_signed_by_another_key_is_refused(world: World) -> None:
    with refused("bad_signature"):
        world.auth.verify_unseal(world.unseal(signer=ec.generate_private_key(ec.SECP256R1())))


def test_a_node_that_never_enrolled_is_refused(world: World) -> None:
    body = world.unseal().model_copy(update={"node_id": "m" * 25})
    with refused("unknown_node"):
        world.auth.verify_unseal(body)


def test_identification_refusals_write_nothing(world: World) -> None:
    before = world.audit_rows()
    for body in (world.unseal(nonce=secrets.token_bytes(32)),
                 world.unseal(signer=ec.generate_private_key(ec.SECP256R1()))):
        with pytest.raises(IdentityError):
            world.auth.verify_unseal(body)
    assert world.audit_rows() == before


def test_a_revoked_node_proves_who_it_is_but_is_not_admitted(world: World) -> None:
    world.enroll(NodeStatus.REVOKED)
    verified = world.auth.verify_unseal(world.unseal())
    with refused("revoked"):
        world.auth.admit_unseal(verified, world.unseal())


def test_a_certificate_from_another_swarm_is_not_admitted(world: World) -> None:
    stranger = make_node_cert(make_root_ca(), NODE, CLUSTER)
    body = world.unseal(cert=stranger)
    verified = world.auth.verify_unseal(body)
    with pytest.raises(IdentityError):
        world.auth.admit_unseal(verified, body)


def test_a_certificate_for_another_node_is_not_admitted(world: World) -> None:
    other = make_node_cert(world.ca, "o" * 25, CLUSTER)
    body = world.unseal(cert=other)
    verified = world.auth.verify_unseal(body)
    with pytest.raises(IdentityError):
        world.auth.admit_unseal(verified, body)


class Custodian:
    def __init__(self, world: World) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.key_id = protocol.sha256_hex(protocol.public_der(self.key.public_key()))
        pem = self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        world.store.add_custodian(CustodianRecord("alice", pem.decode(), "t"),
                                  AuditEvent("custodian.add", "test", "", {}))
        self.world = world

    def call(self, date: datetime | None = None, nonce: str = "") -> str:
        when = str(int((date or self.world.clock()).timestamp()))
        nonce = nonce or secrets.token_hex(16)
        payload = protocol.custodian_http_payload("GET", "/v1/requests", when, nonce, b"")
        return self.world.auth.verify_custodian(self.key_id, when, nonce,
                                                protocol.sign(self.key, payload), "GET",
                                                "/v1/requests", b"")


def test_a_custodian_signed_request_names_the_custodian(world: World) -> None:
    assert Custodian(world).call() == "alice"


def test_a_replayed_custodian_request_is_refused(world: World) -> None:
    alice = Custodian(world)
    alice.call(nonce="a" * 32)
    with refused("replayed"):
        alice.call(nonce="a" * 32)


def test_a_custodian_clock_off_by_more_than_five_minutes_is_refused(world: World) -> None:
    with refused("clock_skew"):
        Custodian(world).call(date=world.clock() - timedelta(minutes=6))


def test_an_unregistered_custodian_key_is_refused(world: World) -> None:
    alice = Custodian(world)
    alice.key_id = "0" * 64
    with refused("unknown_custodian"):
        alice.call()
