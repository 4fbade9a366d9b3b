"""The audit log's hash chain (pure; persistence lives in the store).

Each record's hash covers its content and the hash of the record before it, so editing a record
breaks its own hash, and deleting or reordering records breaks the links. The sequence number is
deliberately not hashed: the chain itself defines the order, which lets :func:`verify` tell a
reordering (a record links to one that is not its predecessor) from an edit.

Verification is one pass over an iterable (:class:`ChainVerifier`): it keeps the previous record
and only what a problem needs, never a list or index of every record, so a log of millions of
records is checked in flat memory straight from the database.

Old records can be moved out of the database into archive files (`escrow audit archive`): JSON
lines, a header line naming the range, then one line per record with every hashed field. The
database then starts its chain at a :class:`Checkpoint` (the last archived record's seq and hash,
and the archive's SHA-256), and an ``audit.archive`` record written in the same transaction as
the deletion backs it. Archives and database verify as one continuous chain.

Limits (docs/threat-model.md): someone who can write the database can truncate the newest
records or rebuild the whole chain (or forge a checkpoint and its ``audit.archive`` record); copy
`escrow audit verify`'s head hash somewhere else, keep the archives, and use the journal copy,
to detect that.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from escrow.core.encoding import AUDIT_DOMAIN, canonical_json, encode

GENESIS = "0" * 64
ARCHIVE_EVENT = "audit.archive"
ARCHIVE_FORMAT = "escrow-audit-archive"
ARCHIVE_VERSION = 1


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


def chained(event: AuditEvent, timestamp: str, prev_hash: str, seq: int) -> AuditRecord:
    details_json = canonical_json(dict(event.details))
    digest = record_hash(prev_hash, timestamp, event.event, event.actor, event.cluster_id,
                         details_json)
    return AuditRecord(seq, timestamp, event.event, event.actor, event.cluster_id, details_json,
                       prev_hash, digest)


@dataclass(frozen=True)
class ChainProblem:
    seq: int
    kind: str  # "edited", "deleted", "reordered"; "archive" (a file), "checkpoint" (an anchor)
    message: str


@dataclass(frozen=True)
class Checkpoint:
    """Where the database's chain starts once older records were archived: the last archived
    record (``seq``, ``hash``), the range archived, and the archive file that holds it (its
    name, and the SHA-256 of the whole file as ``sha256sum`` prints it)."""

    seq: int
    hash: str
    first_seq: int
    records: int
    archive_name: str
    archive_sha256: str
    created_at: str

    def details(self) -> dict[str, Any]:
        """What the ``audit.archive`` record that backs this checkpoint says."""
        return {"archive": self.archive_name, "archive_sha256": self.archive_sha256,
                "first_seq": self.first_seq, "last_seq": self.seq, "last_hash": self.hash,
                "records": self.records}

    def describe(self) -> str:
        return f"archive checkpoint at seq {self.seq}, hash {self.hash}"

    def backed_by(self, record: AuditRecord) -> bool:
        if record.event != ARCHIVE_EVENT:
            return False
        try:
            details = record.details
        except ValueError:
            return False
        return (details.get("last_seq") == self.seq and details.get("last_hash") == self.hash
                and details.get("archive_sha256") == self.archive_sha256)


class ChainVerifier:
    """Checks records fed in chain order, one at a time (:meth:`add`), then :meth:`finish`.

    Memory stays flat: besides the previous record it keeps only records involved in a problem
    (a record whose successor does not link to it, and a link waiting for a later record), so
    the problems reported are those a lookup over the whole log would find: an edited record, a
    rewritten one, deleted records, records out of order. A record that links to an earlier
    record whose own successor links to it too (a fork: a copied or injected record) is reported
    at that record, as deleted or rewritten records.

    ``start`` is the checkpoint the chain continues from (GENESIS without one); it must be backed
    by an ``audit.archive`` record later in the chain, as must every checkpoint passed to
    :meth:`expect_archive_record`.
    """

    def __init__(self, start: Checkpoint | None = None) -> None:
        self.start = start
        self.problems: list[ChainProblem] = []
        self.records = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.head = start.hash if start is not None else GENESIS
        self._previous: AuditRecord | None = None
        # hash -> seq of records whose successor in the stream does not link to them
        self._dangling: dict[str, int] = {}
        # prev_hash -> (index in problems, record) of links to a record not seen (yet)
        self._pending: dict[str, list[tuple[int, AuditRecord]]] = {}
        self._unbacked: dict[int, Checkpoint] = {}
        if start is not None:
            self.expect_archive_record(start)

    def expect_archive_record(self, checkpoint: Checkpoint) -> None:
        """Report ``checkpoint`` unless an ``audit.archive`` record naming it comes later."""
        self._unbacked.setdefault(checkpoint.seq, checkpoint)

    def report(self, problem: ChainProblem) -> None:
        """A problem found outside the chain itself (an archive file's header, say)."""
        self.problems.append(problem)

    def add(self, record: AuditRecord) -> None:
        previous = self._previous
        if previous is not None and record.prev_hash != previous.hash:
            self._dangling[previous.hash] = previous.seq
        for index, waiting in self._pending.pop(record.hash, ()):
            self.problems[index] = _out_of_order(waiting, record.seq)
        recomputed = record_hash(record.prev_hash, record.timestamp, record.event, record.actor,
                                 record.cluster_id, record.details_json)
        if not hmac.compare_digest(recomputed, record.hash):
            self.problems.append(ChainProblem(
                record.seq, "edited",
                f"record {record.seq} ({record.event}) was edited: its content no longer matches "
                "its hash",
            ))
        elif not hmac.compare_digest(record.prev_hash, self.head):
            linked = self._dangling.get(record.prev_hash)
            if linked is not None:
                self.problems.append(_out_of_order(record, linked))
            else:
                self._pending.setdefault(record.prev_hash, []).append(
                    (len(self.problems), record))
                self.problems.append(self._unlinked(record, previous))
        if self._unbacked:
            for seq, checkpoint in list(self._unbacked.items()):
                if checkpoint.backed_by(record):
                    del self._unbacked[seq]
        self.head = record.hash
        self._previous = record
        self.records += 1
        self.last_seq = record.seq
        if self.first_seq is None:
            self.first_seq = record.seq

    def _unlinked(self, record: AuditRecord, previous: AuditRecord | None) -> ChainProblem:
        """The problem of a record whose link matches no record seen so far."""
        start = self.start
        if record.prev_hash == GENESIS or (start is not None and record.prev_hash == start.hash):
            after = "" if record.prev_hash == GENESIS or start is None else (
                f" after the {start.describe()}")
            return ChainProblem(
                record.seq, "reordered",
                f"record {record.seq} ({record.event}) claims to be the first record{after}",
            )
        if previous is not None and record.seq == previous.seq + 1:
            return ChainProblem(
                previous.seq, "edited",
                f"record {previous.seq} ({previous.event}) was rewritten with a recomputed "
                f"hash: record {record.seq} links to a different version of it",
            )
        if previous is not None:
            after = f"record {previous.seq}"
        elif start is not None:
            after = f"the {start.describe()}"
        else:
            after = "the start"
        return ChainProblem(
            record.seq, "deleted",
            f"records between {after} and record {record.seq} ({record.event}) were "
            "deleted: the record it links to is gone",
        )

    def finish(self) -> list[ChainProblem]:
        """Every problem found, each naming its record."""
        for checkpoint in self._unbacked.values():
            self.problems.append(ChainProblem(
                checkpoint.seq, "checkpoint",
                f"the {checkpoint.describe()} has no {ARCHIVE_EVENT} record after it: it was "
                "not made by `escrow audit archive`, and the records before it may have been "
                "deleted",
            ))
        self._unbacked.clear()
        return self.problems


def _out_of_order(record: AuditRecord, linked_seq: int) -> ChainProblem:
    return ChainProblem(
        record.seq, "reordered",
        f"record {record.seq} ({record.event}) is out of order: it was written right after "
        f"record {linked_seq}",
    )


def head(records: Iterable[AuditRecord], start: str = GENESIS) -> str:
    """The hash that ends the chain (``start``, GENESIS by default, for no records)."""
    last = deque(records, maxlen=1)
    return last[0].hash if last else start


def verify(records: Iterable[AuditRecord],
           start: Checkpoint | None = None) -> list[ChainProblem]:
    """Check records in stored order, in one pass; return every problem found, each naming its
    record. ``start``: the checkpoint the records continue from (GENESIS without one)."""
    chain = ChainVerifier(start)
    for record in records:
        chain.add(record)
    return chain.finish()


def verify_log(checkpoints: Sequence[Checkpoint],
               records: Iterable[AuditRecord]) -> ChainVerifier:
    """Check a database's log as `escrow audit verify` does without archives: its records,
    in chain order, continue from its last checkpoint (GENESIS without one), which an
    ``audit.archive`` record among them must back. Returns the finished verifier: its
    problems, the records counted and the head."""
    chain = ChainVerifier(checkpoints[-1] if checkpoints else None)
    for record in records:
        chain.add(record)
    chain.finish()
    return chain


# -- archive files -------------------------------------------------------------------------

_RECORD_FIELDS = {"seq": int, "timestamp": str, "event": str, "actor": str, "cluster_id": str,
                  "details_json": str, "prev_hash": str, "hash": str}


@dataclass(frozen=True)
class ArchiveHeader:
    """The first line of an archive: the range it holds, where its chain starts and ends, and
    the SHA-256 of every line after this one."""

    first_seq: int
    last_seq: int
    records: int
    first_prev_hash: str
    last_hash: str
    records_sha256: str
    created_at: str

    def line(self) -> bytes:
        return canonical_json({
            "format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION, "first_seq": self.first_seq,
            "last_seq": self.last_seq, "records": self.records,
            "first_prev_hash": self.first_prev_hash, "last_hash": self.last_hash,
            "records_sha256": self.records_sha256, "created_at": self.created_at,
        }).encode("ascii") + b"\n"

    @classmethod
    def parse(cls, line: bytes) -> ArchiveHeader:
        """Raises ValueError unless ``line`` is a header this version writes."""
        try:
            raw = json.loads(line)
        except (UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(str(exc)) from None
        if not isinstance(raw, dict) or raw.get("format") != ARCHIVE_FORMAT:
            raise ValueError("not an audit archive header")
        if raw.get("version") != ARCHIVE_VERSION:
            raise ValueError(f"archive version {raw.get('version')!r}")
        types = {"first_seq": int, "last_seq": int, "records": int, "first_prev_hash": str,
                 "last_hash": str, "records_sha256": str, "created_at": str}
        for name, kind in types.items():
            if type(raw.get(name)) is not kind:
                raise ValueError(f"header field {name} is not a {kind.__name__}")
        return cls(raw["first_seq"], raw["last_seq"], raw["records"], raw["first_prev_hash"],
                   raw["last_hash"], raw["records_sha256"], raw["created_at"])


def archive_line(record: AuditRecord) -> bytes:
    """One record as one archive line, every hashed field exactly as stored."""
    return canonical_json({
        "seq": record.seq, "timestamp": record.timestamp, "event": record.event,
        "actor": record.actor, "cluster_id": record.cluster_id,
        "details_json": record.details_json, "prev_hash": record.prev_hash, "hash": record.hash,
    }).encode("ascii") + b"\n"


def parse_archive_line(line: bytes) -> AuditRecord:
    """Raises ValueError unless ``line`` holds one record as :func:`archive_line` writes it."""
    try:
        raw = json.loads(line)
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(raw, dict) or set(raw) != set(_RECORD_FIELDS):
        raise ValueError("not an audit record")
    for name, kind in _RECORD_FIELDS.items():
        if type(raw[name]) is not kind:
            raise ValueError(f"field {name} is not a {kind.__name__}")
    return AuditRecord(raw["seq"], raw["timestamp"], raw["event"], raw["actor"],
                       raw["cluster_id"], raw["details_json"], raw["prev_hash"], raw["hash"])


class ArchiveReader:
    """Reads an archive's lines once: :meth:`records` yields its records; once they are all
    read, :attr:`problems` names every way the file disagrees with its header and
    :attr:`file_sha256` is the SHA-256 of the whole file. Raises ValueError at once for a file
    that does not start with an archive header."""

    def __init__(self, name: str, lines: Iterable[bytes]) -> None:
        self.name = name
        self._lines: Iterator[bytes] = iter(lines)
        self._file = hashlib.sha256()
        first = next(self._lines, b"")
        self._file.update(first)
        self.header = ArchiveHeader.parse(first)
        self.problems: list[ChainProblem] = []
        self.file_sha256: str | None = None

    def records(self) -> Iterator[AuditRecord]:
        header = self.header
        body = hashlib.sha256()
        count = 0
        first: AuditRecord | None = None
        last: AuditRecord | None = None
        for number, line in enumerate(self._lines, start=2):
            self._file.update(line)
            body.update(line)
            try:
                record = parse_archive_line(line)
            except ValueError:
                seq = last.seq + 1 if last is not None else header.first_seq
                self.problems.append(ChainProblem(
                    seq, "archive", f"line {number} of {self.name} is not an audit record"))
                continue
            count += 1
            first = first or record
            last = record
            yield record
        self.file_sha256 = self._file.hexdigest()
        if not hmac.compare_digest(body.hexdigest(), header.records_sha256):
            self.problems.append(ChainProblem(
                header.first_seq, "archive",
                f"the records in {self.name} do not match the SHA-256 in its header: the file "
                "was edited after it was written",
            ))
        held = (count, first.seq if first else None, last.seq if last else None,
                first.prev_hash if first else None, last.hash if last else None)
        said = (header.records, header.first_seq, header.last_seq, header.first_prev_hash,
                header.last_hash)
        if held != said:
            self.problems.append(ChainProblem(
                header.first_seq, "archive",
                f"{self.name} holds {count} records ({held[1]}..{held[2]}), its header says "
                f"{header.records} ({header.first_seq}..{header.last_seq}) from "
                f"{header.first_prev_hash[:16]} to {header.last_hash[:16]}",
            ))
