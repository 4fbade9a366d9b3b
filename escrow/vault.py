"""The vault: deposits, key history and pruning, over a Store and a token.

The vault splits a key and wraps each share; it never combines shares. Time and the token come
in as parameters, so the rules here are tested with a fixed clock.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from escrow import custodian_keys, identity
from escrow.audit import AuditEvent
from escrow.core import shares
from escrow.core.encoding import share_aad
from escrow.core.errors import HsmError, InputError, PolicyError, ShareAuthFailed
from escrow.core.states import NodeStatus
from escrow.core.timestamps import parse_timestamp, timestamp
from escrow.core.unlockkey import UnlockKey
from escrow.policy import Policy, check_approve_after, make_policy, validate_custodian_name
from escrow.store import (
    ClusterRecord,
    CustodianRecord,
    KeyVersionRecord,
    ShareRecord,
    Store,
)

FINGERPRINT_PREFIX = 16


class Wrapper(Protocol):
    """What the vault needs of the HSM (escrow.wrapping.Token implements it)."""

    def wrap(self, plaintext: bytes, aad: bytes) -> bytes: ...
    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes: ...


@dataclass(frozen=True)
class DepositResult:
    version: int
    created: bool
    fingerprint: str


@dataclass(frozen=True)
class VersionInfo:
    record: KeyVersionRecord
    superseded_at: datetime | None  # when a newer version arrived; None for the newest
    destroy_after: datetime | None

    @property
    def fingerprint_prefix(self) -> str:
        return self.record.fingerprint[:FINGERPRINT_PREFIX]


def version_history(
    versions: Sequence[KeyVersionRecord], retention: timedelta
) -> list[VersionInfo]:
    """Annotate versions (newest first) with when each was superseded and may be destroyed."""
    history: list[VersionInfo] = []
    newer: KeyVersionRecord | None = None
    for record in versions:
        superseded = parse_timestamp(newer.created_at) if newer else None
        history.append(VersionInfo(record, superseded,
                                   superseded + retention if superseded else None))
        newer = record
    return history


def prunable(history: Sequence[VersionInfo], now: datetime,
             keep: Collection[int] = ()) -> list[int]:
    """Versions whose retention has run out, except those in ``keep``. The newest version
    never qualifies."""
    return [info.record.version for info in history
            if info.destroy_after is not None and info.destroy_after <= now
            and info.record.version not in keep]


@dataclass(frozen=True)
class Pruned:
    destroyed: list[int]
    kept: dict[int, list[str]]  # version past retention -> nodes that last unlocked with it


class Vault:
    def __init__(self, store: Store, wrapper: Wrapper, clock: Callable[[], datetime],
                 actor: str) -> None:
        self.store = store
        self.wrapper = wrapper
        self.clock = clock
        self.actor = actor

    def _event(self, event: str, cluster_id: str = "", **details: object) -> AuditEvent:
        return AuditEvent(event, self.actor, cluster_id, details)

    # -- custodians -------------------------------------------------------------------------

    def add_custodian(self, name: str, public_key_pem: bytes) -> CustodianRecord:
        validate_custodian_name(name)
        custodian_keys.load_public(public_key_pem)
        record = CustodianRecord(name, public_key_pem.decode("ascii"), timestamp(self.clock()))
        self.store.add_custodian(record, self._event("custodian.add", name=name))
        return record

    def remove_custodian(self, name: str) -> None:
        self.store.remove_custodian(name, self._event("custodian.remove", name=name))

    # -- clusters ---------------------------------------------------------------------------

    def _policy(self, threshold: int, slots: Sequence[str], allow_no_paper: bool) -> Policy:
        known = [c.name for c in self.store.list_custodians()]
        policy = make_policy(threshold, slots, known)
        if not policy.paper_recoverable and not allow_no_paper:
            raise PolicyError(
                f"with this policy custodians hold {len(policy.custodians)} share(s) but "
                f"{policy.threshold} are needed: if the escrow or its HSM is lost, the key "
                "cannot be rebuilt from paper",
                "add custodian slots (e.g. auto,auto,alice,bob,carol with threshold 2), or pass "
                "--allow-no-paper-recovery if you accept that risk",
            )
        return policy

    def add_cluster(self, cluster_id: str, root_ca_pem: bytes, threshold: int,
                    slots: Sequence[str], *, allow_no_paper: bool = False) -> ClusterRecord:
        identity.validate_cluster_id(cluster_id)
        identity.parse_root_ca(root_ca_pem)
        policy = self._policy(threshold, slots, allow_no_paper)
        record = ClusterRecord(cluster_id, root_ca_pem.decode("ascii"), policy,
                               timestamp(self.clock()))
        self.store.add_cluster(record, self._event(
            "cluster.add", cluster_id, threshold=threshold, slots=list(policy.slots),
            paper_recoverable=policy.paper_recoverable))
        return record

    def set_policy(self, cluster_id: str, threshold: int, slots: Sequence[str], *,
                   allow_no_paper: bool = False) -> Policy:
        self.store.get_cluster(cluster_id)
        policy = self._policy(threshold, slots, allow_no_paper)
        self.store.set_policy(cluster_id, policy, self._event(
            "cluster.set_policy", cluster_id, threshold=threshold, slots=list(policy.slots),
            paper_recoverable=policy.paper_recoverable))
        return policy

    def set_approve_after(self, cluster_id: str, seconds: int) -> None:
        """Turn the cluster's deny window on (requests short of approvals proceed this long
        after they were made unless a custodian denies them) or off (0)."""
        self.store.get_cluster(cluster_id)
        self.store.set_approve_after(cluster_id, check_approve_after(seconds), self._event(
            "cluster.set_approve_after", cluster_id, approve_after_seconds=seconds))

    # -- deposits ---------------------------------------------------------------------------

    def reject_deposit(self, cluster_id: str, error: InputError) -> None:
        """Record a refused deposit. The reason names the form only, never the input."""
        self.store.append_audit(self._event("key.deposit_rejected", cluster_id,
                                            reason=error.message))

    def deposit(self, cluster_id: str, key: UnlockKey) -> DepositResult:
        cluster = self.store.get_cluster(cluster_id)
        policy = cluster.policy
        fingerprint = key.fingerprint(cluster_id)

        def make_shares(version: int) -> list[ShareRecord]:
            mnemonics = shares.split(key, policy.threshold, len(policy.slots))
            return [
                ShareRecord(cluster_id, version, slot, holder,
                            self.wrapper.wrap(mnemonic.encode("ascii"),
                                             share_aad(cluster_id, version, slot)))
                for slot, (holder, mnemonic) in enumerate(zip(policy.slots, mnemonics,
                                                              strict=True))
            ]

        record, created = self.store.add_key_version(
            cluster_id, fingerprint, policy, make_shares,
            self._event("key.deposit", cluster_id, fingerprint=fingerprint[:FINGERPRINT_PREFIX],
                        threshold=policy.threshold, slots=list(policy.slots)),
        )
        if not created:
            self.store.append_audit(self._event(
                "key.deposit_existing", cluster_id, version=record.version,
                fingerprint=fingerprint[:FINGERPRINT_PREFIX]))
        return DepositResult(record.version, created, fingerprint)

    def unwrap_share(self, share: ShareRecord) -> str:
        """Unwrap one share's mnemonic. Callers release it encrypted, never in the clear."""
        return self.wrapper.unwrap(share.wrapped,
                                share_aad(share.cluster_id, share.version, share.slot)
                                ).decode("ascii")

    # -- wrapping keys ----------------------------------------------------------------------

    def rewrap(self, target: Wrapper, wrapped_meta: Mapping[str, bytes], **details: object) -> int:
        """Re-wrap every share, and the meta values named with their associated data, from
        this vault's wrapper to ``target``, in one transaction. A value only ``target`` opens
        was re-wrapped by an earlier run that stopped before the config named the new key,
        and is kept. Returns the number of shares."""

        def move(wrapped: bytes, aad: bytes) -> bytes:
            try:
                plaintext = self.wrapper.unwrap(wrapped, aad)
            except ShareAuthFailed:
                target.unwrap(wrapped, aad)  # raises unless the earlier run moved it
                return wrapped
            moved = target.wrap(plaintext, aad)
            if target.unwrap(moved, aad) != plaintext:
                raise HsmError("the token re-wrapped a share it then did not open back",
                               "nothing was changed; check the token's health")
            return moved

        def mover(aad: bytes) -> Callable[[bytes], bytes]:
            return lambda wrapped: move(wrapped, aad)

        return self.store.rewrap(
            lambda row: move(row.wrapped, share_aad(row.cluster_id, row.version, row.slot)),
            {name: mover(aad) for name, aad in wrapped_meta.items()},
            self._event("hsm.rewrap", "", **details))

    def check_all_unwrap(self, wrapped_meta: Mapping[str, bytes]) -> int:
        """Open every share and named meta value with this vault's wrapper; ShareAuthFailed
        names the first that does not open. Returns the number of shares."""
        count = 0
        for cluster in self.store.list_clusters():
            for version in self.store.list_key_versions(cluster.cluster_id):
                for share in self.store.get_shares(cluster.cluster_id, version.version):
                    self.unwrap_share(share)
                    count += 1
        for name, aad in wrapped_meta.items():
            wrapped = self.store.get_meta(name)
            if wrapped is not None:
                self.wrapper.unwrap(wrapped, aad)
        return count

    def record(self, event: str, **details: object) -> None:
        """An audit record of an action taken outside the store (in the token, say)."""
        self.store.append_audit(self._event(event, "", **details))

    # -- history ----------------------------------------------------------------------------

    def history(self, cluster_id: str, retention: timedelta) -> list[VersionInfo]:
        return version_history(self.store.list_key_versions(cluster_id), retention)

    def in_use(self, cluster_id: str) -> dict[int, list[str]]:
        """Versions that an enrolled, active node last unlocked with, and those nodes: if
        newer versions are junk (deposited by a compromised node), such a version may be the
        real key, so it is never pruned while a node relies on it."""
        active = {n.node_id for n in self.store.list_nodes()
                  if n.cluster_id == cluster_id and n.status == NodeStatus.ACTIVE}
        users: dict[int, list[str]] = {}
        for node, unlock in self.store.last_unlocks(cluster_id).items():
            if node in active:
                users.setdefault(unlock.version, []).append(node)
        return users

    def prune(self, cluster_id: str, retention: timedelta, *, dry_run: bool = False) -> Pruned:
        history = self.history(cluster_id, retention)
        users = self.in_use(cluster_id)
        doomed = prunable(history, self.clock(), users)
        kept = {v: users[v] for v in prunable(history, self.clock()) if v in users}
        if doomed and not dry_run:
            self.store.delete_key_versions(cluster_id, doomed, self._event(
                "key.prune", cluster_id, versions=doomed, kept_in_use=sorted(kept),
                retention_days=retention.total_seconds() / 86400))
        return Pruned(doomed, kept)
