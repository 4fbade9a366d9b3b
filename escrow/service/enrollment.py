"""Enrollment of a node's agent key, and deposits of unlock keys encrypted to the escrow's
deposit key."""

from __future__ import annotations

from datetime import timedelta

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from escrow.audit import AuditEvent
from escrow.core import protocol, unlockkey
from escrow.core.errors import InputError, RequestError
from escrow.core.protocol import HPKE, DepositRequest, EnrollRequest, EnrollResponse
from escrow.core.states import NodeStatus
from escrow.core.timestamps import timestamp
from escrow.service.authentication import VerifiedDeposit, VerifiedEnrollment
from escrow.service.context import Context
from escrow.store import NodeRecord
from escrow.vault import DepositResult, Vault


class Enrollment:
    def __init__(self, context: Context, deposit_key: X25519PrivateKey) -> None:
        self.context = context
        self.store = context.store
        self.settings = context.settings
        self._deposit_key = deposit_key

    @property
    def deposit_public_key(self) -> bytes:
        return self._deposit_key.public_key().public_bytes_raw()

    def enroll(self, verified: VerifiedEnrollment, body: EnrollRequest,
               earlier: NodeRecord | None) -> EnrollResponse:
        self.context.hooks.room()
        now = timestamp(self.context.now())
        self.store.enroll_node(
            NodeRecord(body.cluster_id, body.node_id, protocol.public_pem(verified.agent_key),
                       body.hostname, now, NodeStatus.ACTIVE),
            AuditEvent("node.enroll", f"node:{body.node_id}", body.cluster_id,
                       {"node_id": body.node_id, "hostname": body.hostname,
                        "agent_key_sha256": protocol.sha256_hex(
                            protocol.public_der(verified.agent_key)),
                        "reenrolled": earlier is not None}))
        versions = self.store.list_key_versions(body.cluster_id)
        return EnrollResponse(cluster_id=body.cluster_id, node_id=body.node_id, enrolled_at=now,
                              keys=[protocol.EscrowedKey(version=v.version,
                                                         fingerprint=v.fingerprint)
                                    for v in versions])

    def deposit(self, verified: VerifiedDeposit, body: DepositRequest) -> DepositResult:
        self.context.hooks.room()
        try:
            plain = HPKE.decrypt(verified.encrypted_key, self._deposit_key,
                                 info=protocol.deposit_info(body.cluster_id, body.node_id,
                                                            verified.nonce))
        except (InvalidTag, ValueError):
            raise RequestError("bad_deposit", "the sealed key does not decrypt",
                               "encrypt to the deposit key from GET /v1/info") from None
        try:
            key = unlockkey.parse(plain.decode("ascii", errors="replace"))
        except InputError as exc:
            raise RequestError("bad_deposit", exc.message, exc.hint) from None
        versions = self.store.list_key_versions(body.cluster_id)
        actor = f"node:{body.node_id}"
        if key.fingerprint(body.cluster_id) not in {v.fingerprint for v in versions}:
            self._may_add_version(body.cluster_id, actor, len(versions))
        vault = self.context.vault
        return Vault(self.store, vault.wrapper, vault.clock, actor).deposit(body.cluster_id, key)

    def _may_add_version(self, cluster_id: str, actor: str, retained: int) -> None:
        """A node may add only so many new versions, so junk deposits can neither push the
        real key out of reach nor make every unseal try hundreds of keys."""
        limit = self.settings.max_versions
        if retained >= limit:
            self.context.hooks.on_alert(AuditEvent("key.versions_full", actor, cluster_id,
                                                   {"retained": retained, "limit": limit}))
            raise RequestError("too_many_versions",
                               f"cluster {cluster_id} already retains {retained} key versions, "
                               f"the most this escrow keeps (keys.max_versions = {limit})",
                               "an admin checks `escrow key list` (junk deposits from a node "
                               "are a sign of compromise) and prunes with `escrow key prune`",
                               409)
        window = self.settings.node_deposit_window_seconds
        since = timestamp(self.context.now() - timedelta(seconds=window))
        if self.store.count_audit_since("key.deposit", actor,
                                        since) >= self.settings.node_deposit_limit:
            raise RequestError("rate_limited",
                               f"{actor} deposited {self.settings.node_deposit_limit} new key "
                               f"versions in the last {window:g} s",
                               "rotate less often; the agent deposits again by itself later",
                               429, retry_after=window)
