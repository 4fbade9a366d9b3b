"""The audit log's hash chain (pure; persistence lives in the store).

Each record's hash covers its content and the hash of the record before it, so editing a record
breaks its own hash, and deleting or reordering records breaks the links. The sequence number is
deliberately not hashed: the chain itself defines the order, which lets :func:`verify` tell a
reordering (a record links to one that is not its predecessor) from an edit.

Limits (docs/threat-model.md): someone who can write the database can truncate the newest
records or rebuild the whole chain; copy `escrow audit verify`'s head hash somewhere else, and
use the journal copy, to detect that.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from escrow.encoding import AUDIT_DOMAIN, canonical_json, encode

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEvent:
    """What happened, before it is placed in the chain. ``details`` must never hold secrets."""

    event: str
    actor: str
    cluster_id: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    timestamp: str
    event: str
    actor: str
    cluster_id: str
    details_json: str
    prev_hash: str
    hash: str

    @property
    def details(self) -> dict[str, Any]:
        value = json.loads(self.details_json)
        return value if isinstance(value, dict) else {}


def record_hash(
    prev_hash: str, timestamp: str, event: str, actor: str, cluster_id: str, details_json: str
) -> str:
    return hashlib.sha256(
        encode(AUDIT_DOMAIN, prev_hash, timestamp, event, actor, cluster_id, details_json)
    ).hexdigest()


def seal(event: AuditEvent, timestamp: str, prev_hash: str, seq: int) -> AuditRecord:
    details_json = canonical_json(dict(event.details))
    digest = record_hash(prev_hash, timestamp, event.event, event.actor, event.cluster_id,
                         details_json)
    return AuditRecord(seq, timestamp, event.event, event.actor, event.cluster_id, details_json,
                       prev_hash, digest)


@dataclass(frozen=True)
class ChainProblem:
    seq: int
    kind: str  # "edited", "deleted", "reordered"
    message: str


def head(records: Sequence[AuditRecord]) -> str:
    """The hash that ends the chain (GENESIS for an empty log)."""
    return records[-1].hash if records else GENESIS


def verify(records: Sequence[AuditRecord]) -> list[ChainProblem]:
    """Check records in stored order; return every problem found, each naming its record."""
    problems: list[ChainProblem] = []
    by_hash = {r.hash: r for r in records}
    expected_prev = GENESIS
    previous: AuditRecord | None = None
    for record in records:
        recomputed = record_hash(record.prev_hash, record.timestamp, record.event, record.actor,
                                 record.cluster_id, record.details_json)
        if not hmac.compare_digest(recomputed, record.hash):
            problems.append(ChainProblem(
                record.seq, "edited",
                f"record {record.seq} ({record.event}) was edited: its content no longer matches "
                "its hash",
            ))
        elif not hmac.compare_digest(record.prev_hash, expected_prev):
            linked = by_hash.get(record.prev_hash)
            if linked is not None:
                problems.append(ChainProblem(
                    record.seq, "reordered",
                    f"record {record.seq} ({record.event}) is out of order: it was written "
                    f"right after record {linked.seq}",
                ))
            elif record.prev_hash == GENESIS:
                problems.append(ChainProblem(
                    record.seq, "reordered",
                    f"record {record.seq} ({record.event}) claims to be the first record",
                ))
            elif previous is not None and record.seq == previous.seq + 1:
                problems.append(ChainProblem(
                    previous.seq, "edited",
                    f"record {previous.seq} ({previous.event}) was rewritten with a recomputed "
                    f"hash: record {record.seq} links to a different version of it",
                ))
            else:
                after = f"record {previous.seq}" if previous is not None else "the start"
                problems.append(ChainProblem(
                    record.seq, "deleted",
                    f"records between {after} and record {record.seq} ({record.event}) were "
                    "deleted: the record it links to is gone",
                ))
        expected_prev = record.hash
        previous = record
    return problems
