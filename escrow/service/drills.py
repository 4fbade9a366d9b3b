"""The share drill: a custodian proves that their paper share still matches the escrow's copy
without sending it (escrow.core.drill), and any custodian of a cluster sees when each of its
custodian slots was last proved so."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from shamir_mnemonic import Share

from escrow.audit import AuditEvent
from escrow.core import drill
from escrow.core.errors import IdentityError, RequestError
from escrow.core.protocol import (
    DrillResult,
    DrillSlot,
    ShareDrills,
    ShareProof,
    ShareVerifyRequest,
    ShareVerifyResponse,
)
from escrow.core.timestamps import timestamp
from escrow.service import fields, readings
from escrow.service.authentication import Authenticator
from escrow.service.context import Context
from escrow.store import DrillRecord, KeyVersionRecord, ShareRecord


def _not_a_holder(custodian: str, cluster_id: str, what: str = "") -> IdentityError:
    return IdentityError("not_a_custodian", f"{custodian} holds no share of "
                         f"{what or 'a retained key version of'} {cluster_id}",
                         "only the holder of a slot drills it; see `escrow share drills`")


class Drills:
    def __init__(self, context: Context, authenticator: Authenticator) -> None:
        self.context = context
        self.store = context.store
        self.authenticator = authenticator

    def _retained(self, cluster_id: str) -> list[KeyVersionRecord]:
        versions = self.store.list_key_versions(cluster_id)
        if not versions:
            raise RequestError("no_key", f"{cluster_id} has no key deposited yet", status=404)
        return versions[: self.context.settings.max_versions]

    def listing(self, custodian: str, cluster_id: str) -> ShareDrills:
        """Every custodian slot of the cluster's retained versions and its last successful
        drill, for a custodian holding one of them."""
        with self.context.refusals.audited("share.drills", cluster_id, custodian=custodian):
            versions = self._retained(cluster_id)
            slots = readings.drill_slots(versions, self.store.list_drills(cluster_id))
            # A slot of the cluster's policy counts too, as for `escrow requests`: whoever
            # gets a share at the next deposit may see who drilled theirs.
            holders = [s.custodian for s in slots] + list(
                self.store.get_cluster(cluster_id).policy.custodians)
            if not any(hmac.compare_digest(holder, custodian) for holder in holders):
                raise _not_a_holder(custodian, cluster_id)
        return ShareDrills(
            cluster_id=cluster_id, custodian=custodian, newest=versions[0].version,
            slots=[DrillSlot(version=s.version.version, version_created_at=s.version.created_at,
                             slot=s.slot, custodian=s.custodian, last_ok_at=s.last_ok_at)
                   for s in slots])

    def verify(self, custodian: str, body: ShareVerifyRequest) -> ShareVerifyResponse:
        """Compare each proof with the one the escrow's copy of that share makes; audit each
        outcome, and keep the time of each match."""
        cluster_id = body.cluster_id
        with self.context.refusals.audited("share.drill", cluster_id, custodian=custodian):
            versions = self._retained(cluster_id)
            mine = {share.version: share for version in versions
                    for share in self.store.get_shares(cluster_id, version.version)
                    if hmac.compare_digest(share.holder, custodian)}
            if not mine:
                raise _not_a_holder(custodian, cluster_id)
            asked = _asked(body.proofs, mine, {v.version for v in versions}, custodian,
                           cluster_id)
            # Last of the checks: a refused drill leaves its nonce good for a corrected one.
            nonce = self.authenticator.use_nonce(body.nonce)
            self.context.hooks.room()
        results = []
        for share, given in asked:
            # The escrow's copy is unwrapped by the token only to be compared, as an export
            # unwraps it only to encrypt it; it goes nowhere.
            copy = Share.from_mnemonic(self.context.vault.unwrap_share(share))
            ok = drill.matches(copy, given, nonce, cluster_id, share.version, share.slot,
                               custodian)
            event = AuditEvent("share.drill", f"custodian:{custodian}", cluster_id,
                               {"version": share.version, "slot": share.slot,
                                "outcome": "ok" if ok else "mismatch"})
            if ok:
                self.store.record_drill(DrillRecord(cluster_id, share.version, share.slot,
                                                    custodian, timestamp(self.context.now())),
                                        event)
            else:
                self.store.append_audit(event)
            results.append(DrillResult(version=share.version, slot=share.slot, match=ok))
        return ShareVerifyResponse(cluster_id=cluster_id, newest=versions[0].version,
                                   results=sorted(results, key=lambda r: -r.version))


def _asked(proofs: Sequence[ShareProof], mine: Mapping[int, ShareRecord], retained: set[int],
           custodian: str, cluster_id: str) -> list[tuple[ShareRecord, bytes]]:
    """The shares the proofs are about, each with its proof; refused unless every one is of
    a retained version, once, and of the caller's own slot in it."""
    asked: list[tuple[ShareRecord, bytes]] = []
    for item in proofs:
        if item.version not in retained:
            raise RequestError("unknown_version", f"version {item.version} of {cluster_id} "
                               "is not retained", "see `escrow share drills`", 404)
        share = mine.get(item.version)
        if share is None or share.slot != item.slot:
            raise _not_a_holder(custodian, cluster_id,
                                f"slot {item.slot} of version {item.version} of")
        if any(s.version == item.version for s, _ in asked):
            raise RequestError("duplicate_version", f"version {item.version} is asked twice",
                               "send one proof per version")
        asked.append((share, fields.b64(item.proof, "proof", drill.PROOF_BYTES)))
    return asked
