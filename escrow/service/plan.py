"""Which shares an unseal request may have now: a pure function of the cluster's key versions,
their shares, the request's approvals and the clock. No store, no token."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from escrow.core.states import Decision, RequestState
from escrow.core.timestamps import parse_timestamp
from escrow.store import ApprovalRecord, KeyVersionRecord, RequestRecord, ShareRecord


@dataclass(frozen=True)
class Release:
    """The shares of one key version that a request may have."""

    version: KeyVersionRecord
    shares: tuple[ShareRecord, ...]


@dataclass(frozen=True)
class Plan:
    """Per retained version, newest first, the shares a request may have. The newest
    version's threshold is what the request waits for."""

    releases: tuple[Release, ...]
    # Custodians whose slots the deny window filled, with no approval of theirs.
    by_default: frozenset[str] = frozenset()

    @property
    def threshold(self) -> int:
        return self.releases[0].version.policy.threshold if self.releases else 0

    @property
    def needed(self) -> int:
        """Shares of the newest version still missing (0 with no version at all)."""
        if not self.releases:
            return 0
        return max(0, self.threshold - len(self.releases[0].shares))

    def eligible(self, custodian: str) -> bool:
        """Whether ``custodian`` holds a slot of a version the request may release."""
        return any(custodian in r.version.policy.slots for r in self.releases)


def approvers(approvals: Sequence[ApprovalRecord]) -> list[str]:
    return [a.custodian for a in approvals if a.decision == Decision.APPROVE]


def plan(versions: Sequence[KeyVersionRecord], shares: Mapping[int, Sequence[ShareRecord]],
         approved_by: Collection[str], max_versions: int, *, by_default: bool = False) -> Plan:
    """Per version (the newest ``max_versions`` only), its automatic slots first, then the
    approvers' slots, up to its threshold; ``by_default`` (the deny window passed with no
    denial, :func:`approved_by_default`), then the other custodians' slots in slot order."""
    releases = []
    defaulted: set[str] = set()
    for version in versions[:max_versions]:
        rows = shares.get(version.version, ())
        chosen = ([r for r in rows if r.holder == "auto"]
                  + [r for r in rows if r.holder in approved_by])
        if by_default:
            chosen += [r for r in rows if r.holder != "auto" and r.holder not in approved_by]
        kept = tuple(chosen[: version.policy.threshold])
        defaulted.update(r.holder for r in kept
                         if r.holder != "auto" and r.holder not in approved_by)
        releases.append(Release(version, kept))
    return Plan(tuple(releases), frozenset(defaulted))


def default_approval_at(request: RequestRecord, approve_after_seconds: int) -> datetime | None:
    """When the cluster's deny window approves ``request`` unless denied (None: no window)."""
    if approve_after_seconds <= 0:
        return None
    return parse_timestamp(request.created_at) + timedelta(seconds=approve_after_seconds)


def approved_by_default(request: RequestRecord, approvals: Sequence[ApprovalRecord],
                        approve_after_seconds: int, now: datetime) -> bool:
    """Whether the deny window has passed for a still pending ``request`` that no custodian
    denied: then it proceeds without the approvals it lacks."""
    at = default_approval_at(request, approve_after_seconds)
    return (at is not None and now >= at and state_at(request, now) == RequestState.PENDING
            and not any(a.decision == Decision.DENY for a in approvals))


def state_at(request: RequestRecord, now: datetime) -> RequestState:
    """The request's state as of ``now``: a pending request past its expiry has expired."""
    if request.state == RequestState.PENDING and now > parse_timestamp(request.expires_at):
        return RequestState.EXPIRED
    return request.state
