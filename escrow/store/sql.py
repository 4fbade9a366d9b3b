"""The SQL every backend shares: each method of the store, written once against a connection
that takes ``?`` placeholders. A backend (``escrow.store.sqlite``, ``escrow.store.postgres``)
supplies the connection, the write transaction (one writer at a time, which is what keeps the
audit log one chain and lets a deposit number its version), its schema and its errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Protocol

from escrow import audit, audit_journal
from escrow.audit import AuditEvent, AuditRecord
from escrow.core.errors import Conflict, NotFound, StoreError, WindowTaken
from escrow.core.states import Decision, LockState, NodeStatus, Outcome, RequestState
from escrow.policy import Policy
from escrow.store import (
    ApprovalRecord,
    ClusterRecord,
    CustodianRecord,
    DrillRecord,
    HeartbeatRecord,
    KeyVersionRecord,
    MakeShares,
    NodeRecord,
    RequestRecord,
    ShareRecord,
    StoreKind,
    Unlock,
    ViewerRecord,
    WindowClaim,
    WindowRecord,
)


class Cursor(Protocol):
    """What the shared SQL reads of a statement's result."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Db(Protocol):
    """A connection, or one write transaction, taking ``?`` placeholders."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...
    def executemany(self, sql: str, parameters: Iterator[Sequence[Any]] | list[Any], /
                    ) -> Cursor: ...


class NamedRow(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


Clock = Callable[[], str]

_AUDIT_COLUMNS = ("SELECT seq, ts, event, actor, cluster_id, details, prev_hash, hash"
                  " FROM audit")
# Rows that become records are read by column name (SqlStore._named), never by position.
_SELECT_CLUSTERS = ("SELECT cluster_id, root_ca_pem, threshold, slots, created_at,"
                    " approve_after_seconds FROM clusters")
_SELECT_NODES = ("SELECT cluster_id, node_id, agent_public_key_pem, hostname, enrolled_at,"
                 " status FROM nodes")
_SELECT_REQUESTS = ("SELECT request_id, cluster_id, node_id, hostname, boot_id, source,"
                    " cert_pem, ephemeral_key, kek_version, created_at, expires_at, state,"
                    " reason, held_until FROM requests")
_SELECT_HEARTBEATS = ("SELECT cluster_id, node_id, boot_id, first_at, last_at, lock_state,"
                      " kek_version, agent_version, uptime_seconds, interval_seconds, goodbye,"
                      " source FROM heartbeats")
HEARTBEAT_BOOTS = 4  # boots of a node whose last beats are kept
_SELECT_APPROVALS = ("SELECT request_id, custodian, decision, signature, reason, created_at,"
                     " window_id FROM approvals")
_SELECT_WINDOWS = ("SELECT window_id, cluster_id, nodes, restarts, used, expires_at, reason,"
                   " created_at, closed_at, closed_by FROM windows")
_SELECT_SIGNATURES = ("SELECT window_id, custodian, signature FROM window_signatures WHERE"
                      " window_id IN (SELECT window_id FROM windows")
_SIGNING_ORDER = ") ORDER BY created_at, custodian"
AUDIT_BATCH = 500  # records fetched at a time while streaming the audit log
PRUNE_EVERY = 256


def _policy(threshold: int, slots_json: str) -> Policy:
    return Policy(threshold, tuple(json.loads(slots_json)))



class SqlStore:
    """Every Store method but opening and closing; see the module's docstring."""

    kind: StoreKind

    def __init__(self, db: Db, now: Clock) -> None:
        self._db = db
        self._now = now
        # Audit records of the open transaction, copied to the journal once it commits.
        self._uncommitted: list[AuditRecord] = []
        self._uses = 0  # of use_once: expired entries are dropped every PRUNE_EVERY

    def close(self) -> None:
        raise NotImplementedError

    def check_writable(self) -> StoreKind:
        raise NotImplementedError

    def replicas(self) -> list[str]:
        raise NotImplementedError

    def audit_snapshot(self) -> AbstractContextManager[None]:
        """Reads inside agree with each other (checkpoints and records)."""
        raise NotImplementedError

    def compact(self) -> None:
        """Give the space of deleted rows back (after an archive)."""
        raise NotImplementedError

    def listen(self, on_decided: Callable[[str | None], None]) -> None:
        """Call ``on_decided(request_id)`` after a decision on the request commits, from any
        process sharing this store; ``None`` when decisions may have been missed. SQLite needs
        nothing here: one process serves it (escrow.lock), and it wakes its own polls."""

    def _announce(self, db: Db, request_id: str) -> None:
        """Inside the deciding transaction: tell the other processes once it commits."""

    def _unaudited(self) -> AbstractContextManager[Db]:
        """A short transaction that appends nothing to the audit log, so it need not wait for
        the write lock (the single-use guard)."""
        return self._write()

    def _write(self) -> AbstractContextManager[Db]:
        """One write transaction, alone: no other writer runs until it ends."""
        raise NotImplementedError

    def _named(self, sql: str, params: Sequence[object] = ()) -> list[NamedRow]:
        """The rows of a query, read by column name."""
        raise NotImplementedError

    def _stream(self, sql: str, params: Sequence[object]) -> Iterator[tuple[Any, ...]]:
        """The rows of one consistent read, fetched AUDIT_BATCH at a time."""
        raise NotImplementedError

    def _journal_committed(self) -> None:
        """Copy the audit records of the transaction that just committed to the journal."""
        committed, self._uncommitted = self._uncommitted, []
        for record in committed:
            audit_journal.send(record)

    def _forget_uncommitted(self) -> None:
        """The transaction rolled back: its records never were."""
        self._uncommitted.clear()

    def _append(self, db: Db, event: AuditEvent) -> AuditRecord:
        last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        if last is None:  # an empty log, or every record archived: continue from the anchor
            last = db.execute("SELECT seq, hash FROM audit_checkpoints ORDER BY seq DESC"
                              " LIMIT 1").fetchone()
        # Numbered here, under the write lock, never by the database: a sequence would leave
        # a gap after a rollback, and `escrow audit verify` reads a gap as a deleted record.
        seq, prev_hash = (int(last[0]) + 1, str(last[1])) if last else (1, audit.GENESIS)
        record = audit.chained(event, self._now(), prev_hash, seq)
        db.execute(
            "INSERT INTO audit (seq, ts, event, actor, cluster_id, details, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (record.seq, record.timestamp, record.event, record.actor, record.cluster_id,
             record.details_json, record.prev_hash, record.hash),
        )
        self._uncommitted.append(record)
        return record

    # -- custodians -------------------------------------------------------------------------

    def add_custodian(self, record: CustodianRecord, event: AuditEvent) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM custodians WHERE name = ?", (record.name,)).fetchone():
                raise Conflict(f"custodian {record.name!r} already exists",
                               "remove it first, or choose another name")
            db.execute("INSERT INTO custodians VALUES (?, ?, ?)",
                       (record.name, record.public_key_pem, record.created_at))
            self._append(db, event)

    def remove_custodian(self, name: str, event: AuditEvent) -> None:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM custodians WHERE name = ?", (name,)).fetchone():
                raise NotFound(f"no custodian named {name!r}", "see `escrow custodian list`")
            users = [row[0] for row in db.execute("SELECT cluster_id, slots FROM clusters")
                     if name in json.loads(row[1])]
            if users:
                raise Conflict(
                    f"custodian {name!r} holds a slot in the policy of: {', '.join(users)}",
                    "give the slot to someone else with `escrow cluster set-policy`, rotate the "
                    "unlock key so new shares are made, then remove the custodian",
                )
            db.execute("DELETE FROM custodians WHERE name = ?", (name,))
            self._append(db, event)

    def get_custodian(self, name: str) -> CustodianRecord:
        row = self._db.execute("SELECT name, public_key_pem, created_at FROM custodians "
                               "WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no custodian named {name!r}", "see `escrow custodian list`")
        return CustodianRecord(*row)

    def list_custodians(self) -> list[CustodianRecord]:
        rows = self._db.execute("SELECT name, public_key_pem, created_at FROM custodians "
                                "ORDER BY name")
        return [CustodianRecord(*row) for row in rows]

    # -- viewers ----------------------------------------------------------------------------

    def add_viewer(self, record: ViewerRecord, event: AuditEvent) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM viewers WHERE name = ?", (record.name,)).fetchone():
                raise Conflict(f"viewer {record.name!r} already exists",
                               "remove it first (`escrow viewer remove`), or choose another name")
            db.execute("INSERT INTO viewers VALUES (?, ?, ?)",
                       (record.name, record.token_sha256, record.created_at))
            self._append(db, event)

    def remove_viewer(self, name: str, event: AuditEvent) -> None:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM viewers WHERE name = ?", (name,)).fetchone():
                raise NotFound(f"no viewer named {name!r}", "see `escrow viewer list`")
            db.execute("DELETE FROM viewers WHERE name = ?", (name,))
            self._append(db, event)

    def list_viewers(self) -> list[ViewerRecord]:
        rows = self._db.execute("SELECT name, token_sha256, created_at FROM viewers "
                                "ORDER BY name")
        return [ViewerRecord(*row) for row in rows]

    def viewer_named_by(self, token_sha256: str) -> str | None:
        row = self._db.execute("SELECT name FROM viewers WHERE token_sha256 = ?",
                               (token_sha256,)).fetchone()
        return str(row[0]) if row else None

    # -- clusters ---------------------------------------------------------------------------

    def add_cluster(self, record: ClusterRecord, event: AuditEvent) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM clusters WHERE cluster_id = ?",
                          (record.cluster_id,)).fetchone():
                raise Conflict(f"cluster {record.cluster_id} is already registered",
                               "see `escrow cluster show`; change its policy with "
                               "`escrow cluster set-policy`")
            db.execute("INSERT INTO clusters (cluster_id, root_ca_pem, threshold, slots,"
                       " created_at, approve_after_seconds) VALUES (?, ?, ?, ?, ?, ?)",
                       (record.cluster_id, record.root_ca_pem, record.policy.threshold,
                        json.dumps(list(record.policy.slots)), record.created_at,
                        record.approve_after_seconds))
            self._append(db, event)

    def set_policy(self, cluster_id: str, policy: Policy, event: AuditEvent) -> None:
        with self._write() as db:
            cursor = db.execute("UPDATE clusters SET threshold = ?, slots = ? WHERE cluster_id = ?",
                                (policy.threshold, json.dumps(list(policy.slots)), cluster_id))
            if cursor.rowcount == 0:
                raise _no_cluster(cluster_id)
            self._append(db, event)

    def set_approve_after(self, cluster_id: str, seconds: int, event: AuditEvent) -> None:
        with self._write() as db:
            cursor = db.execute("UPDATE clusters SET approve_after_seconds = ? WHERE"
                                " cluster_id = ?", (seconds, cluster_id))
            if cursor.rowcount == 0:
                raise _no_cluster(cluster_id)
            self._append(db, event)

    def get_cluster(self, cluster_id: str) -> ClusterRecord:
        row = self._db.execute(_SELECT_CLUSTERS + " WHERE cluster_id = ?",
                               (cluster_id,)).fetchone()
        if row is None:
            raise _no_cluster(cluster_id)
        return _cluster(row)

    def list_clusters(self) -> list[ClusterRecord]:
        return [_cluster(r) for r in self._db.execute(_SELECT_CLUSTERS + " ORDER BY cluster_id")]

    # -- key versions -----------------------------------------------------------------------

    def add_key_version(
        self, cluster_id: str, fingerprint: str, policy: Policy, make_shares: MakeShares,
        event: AuditEvent,
    ) -> tuple[KeyVersionRecord, bool]:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM clusters WHERE cluster_id = ?",
                              (cluster_id,)).fetchone():
                raise _no_cluster(cluster_id)
            existing = db.execute(
                "SELECT version FROM key_versions WHERE cluster_id = ? AND fingerprint = ?",
                (cluster_id, fingerprint),
            ).fetchone()
            if existing:
                return self._key_version(db, cluster_id, existing[0]), False
            newest = db.execute("SELECT MAX(version) FROM key_versions WHERE cluster_id = ?",
                                (cluster_id,)).fetchone()[0]
            version = (newest or 0) + 1
            shares = make_shares(version)
            if len(shares) != len(policy.slots):
                raise StoreError(f"expected {len(policy.slots)} shares, got {len(shares)}",
                                 "this is a bug; nothing was stored")
            record = KeyVersionRecord(cluster_id, version, fingerprint, policy, self._now())
            db.execute("INSERT INTO key_versions VALUES (?, ?, ?, ?, ?, ?)",
                       (cluster_id, version, fingerprint, policy.threshold,
                        json.dumps(list(policy.slots)), record.created_at))
            db.executemany("INSERT INTO shares VALUES (?, ?, ?, ?, ?)",
                           [(s.cluster_id, s.version, s.slot, s.holder, s.wrapped)
                            for s in shares])
            self._append(db, replace(event, details={**event.details, "version": version}))
            return record, True

    def _key_version(self, db: Db, cluster_id: str,
                     version: int) -> KeyVersionRecord:
        row = db.execute("SELECT cluster_id, version, fingerprint, threshold, slots, created_at "
                         "FROM key_versions WHERE cluster_id = ? AND version = ?",
                         (cluster_id, version)).fetchone()
        return KeyVersionRecord(row[0], row[1], row[2], _policy(row[3], row[4]), row[5])

    def list_key_versions(self, cluster_id: str) -> list[KeyVersionRecord]:
        self.get_cluster(cluster_id)
        rows = self._db.execute(
            "SELECT cluster_id, version, fingerprint, threshold, slots, created_at "
            "FROM key_versions WHERE cluster_id = ? ORDER BY version DESC", (cluster_id,))
        return [KeyVersionRecord(r[0], r[1], r[2], _policy(r[3], r[4]), r[5]) for r in rows]

    def get_shares(self, cluster_id: str, version: int) -> list[ShareRecord]:
        rows = self._db.execute("SELECT cluster_id, version, slot, holder, wrapped FROM shares "
                                "WHERE cluster_id = ? AND version = ? ORDER BY slot",
                                (cluster_id, version))
        return [ShareRecord(r[0], r[1], r[2], r[3], bytes(r[4])) for r in rows]

    def delete_key_versions(
        self, cluster_id: str, versions: Sequence[int], event: AuditEvent
    ) -> None:
        with self._write() as db:
            newest = db.execute("SELECT MAX(version) FROM key_versions WHERE cluster_id = ?",
                                (cluster_id,)).fetchone()[0]
            if newest in versions:
                raise Conflict(f"refusing to destroy version {newest}, the newest key of "
                               f"{cluster_id}", "the newest version is never destroyed")
            for version in versions:
                db.execute("DELETE FROM key_versions WHERE cluster_id = ? AND version = ?",
                           (cluster_id, version))
                # No foreign key holds drills to their version: a drill of a destroyed share
                # would otherwise stay listed, and count in the metric.
                db.execute("DELETE FROM share_drills WHERE cluster_id = ? AND version = ?",
                           (cluster_id, version))
            self._append(db, event)

    def record_drill(self, record: DrillRecord, event: AuditEvent) -> None:
        with self._write() as db:
            # Pruned since the drill began (another replica, `escrow key prune`): audited all
            # the same, but no row for a share that is gone.
            if db.execute("SELECT 1 FROM key_versions WHERE cluster_id = ? AND version = ?",
                          (record.cluster_id, record.version)).fetchone() is None:
                self._append(db, event)
                return
            db.execute("INSERT INTO share_drills (cluster_id, version, slot, custodian,"
                       " last_ok_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (cluster_id, version,"
                       " slot) DO UPDATE SET custodian = excluded.custodian,"
                       " last_ok_at = excluded.last_ok_at",
                       (record.cluster_id, record.version, record.slot, record.custodian,
                        record.last_ok_at))
            self._append(db, event)

    def list_drills(self, cluster_id: str) -> list[DrillRecord]:
        rows = self._db.execute("SELECT cluster_id, version, slot, custodian, last_ok_at FROM"
                                " share_drills WHERE cluster_id = ? ORDER BY version DESC, slot",
                                (cluster_id,))
        return [DrillRecord(str(r[0]), int(r[1]), int(r[2]), str(r[3]), str(r[4]))
                for r in rows]

    def rewrap(self, share: Callable[[ShareRecord], bytes],
               meta: Mapping[str, Callable[[bytes], bytes]], event: AuditEvent) -> int:
        """Replace every share's and the named meta values' wrapped bytes in one transaction:
        all are re-wrapped or none. Returns the number of shares."""
        with self._write() as db:
            rows = [ShareRecord(r[0], r[1], r[2], r[3], bytes(r[4])) for r in db.execute(
                "SELECT cluster_id, version, slot, holder, wrapped FROM shares").fetchall()]
            for row in rows:
                db.execute("UPDATE shares SET wrapped = ? WHERE cluster_id = ? AND version = ?"
                           " AND slot = ?", (share(row), row.cluster_id, row.version, row.slot))
            for name, rewrap in meta.items():
                found = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
                if found:
                    db.execute("UPDATE meta SET value = ? WHERE name = ?",
                               (rewrap(bytes(found[0])), name))
            self._append(db, replace(event, details={**event.details, "shares": len(rows)}))
            return len(rows)

    # -- meta, nodes, requests --------------------------------------------------------------

    def get_meta(self, name: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return bytes(row[0]) if row else None

    def add_meta(self, name: str, value: bytes, event: AuditEvent) -> bytes:
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
            if row is not None:  # another replica made it first: everyone uses that one
                return bytes(row[0])
            db.execute("INSERT INTO meta VALUES (?, ?)", (name, value))
            self._append(db, event)
            return value

    def enroll_node(self, record: NodeRecord, event: AuditEvent) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO nodes (cluster_id, node_id, agent_public_key_pem, hostname,"
                " enrolled_at, status) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (cluster_id, node_id)"
                " DO UPDATE SET agent_public_key_pem = excluded.agent_public_key_pem,"
                " hostname = excluded.hostname, enrolled_at = excluded.enrolled_at",
                (record.cluster_id, record.node_id, record.agent_public_key_pem,
                 record.hostname, record.enrolled_at, record.status))
            self._append(db, event)

    def get_node(self, cluster_id: str, node_id: str) -> NodeRecord | None:
        rows = self._named(_SELECT_NODES + " WHERE cluster_id = ? AND node_id = ?",
                           (cluster_id, node_id))
        return _node(rows[0]) if rows else None

    def list_nodes(self) -> list[NodeRecord]:
        rows = self._named(_SELECT_NODES + " ORDER BY cluster_id, hostname, node_id")
        return [_node(row) for row in rows]

    def set_node_status(self, cluster_id: str, node_id: str, status: NodeStatus,
                        event: AuditEvent) -> None:
        with self._write() as db:
            cursor = db.execute("UPDATE nodes SET status = ? WHERE cluster_id = ? AND node_id = ?",
                                (status, cluster_id, node_id))
            if cursor.rowcount == 0:
                raise NotFound(f"node {node_id} of cluster {cluster_id} is not enrolled",
                               "see `escrow node list`")
            if status != NodeStatus.ACTIVE:
                db.execute("UPDATE requests SET state = 'revoked', reason = ?"
                           " WHERE cluster_id = ? AND node_id = ? AND state = 'pending'",
                           (f"node {status}", cluster_id, node_id))
            self._append(db, event)

    def create_request(self, record: RequestRecord, event: AuditEvent,
                       released: Sequence[tuple[int, int, str]] = (),
                       release_event: AuditEvent | None = None,
                       window: WindowClaim | None = None) -> list[str]:
        with self._write() as db:
            superseded = [row[0] for row in db.execute(
                "SELECT request_id FROM requests WHERE cluster_id = ? AND node_id = ?"
                " AND state = 'pending'", (record.cluster_id, record.node_id))]
            db.execute("UPDATE requests SET state = 'superseded', reason = ? WHERE"
                       " cluster_id = ? AND node_id = ? AND state = 'pending'",
                       (f"superseded by {record.request_id}", record.cluster_id, record.node_id))
            db.execute("INSERT INTO requests (request_id, cluster_id, node_id, hostname,"
                       " boot_id, source, cert_pem, ephemeral_key, kek_version, created_at,"
                       " expires_at, state, reason, held_until)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.request_id, record.cluster_id, record.node_id, record.hostname,
                        record.boot_id, record.source, record.cert_pem, record.ephemeral_key,
                        record.kek_version, record.created_at, record.expires_at, record.state,
                        record.reason, record.held_until))
            self._append(db, replace(event, details={**event.details,
                                                     "superseded": superseded}))
            if window is not None:
                self._claim_window(db, window)
            if released and release_event is not None:
                self._record_releases(db, record.request_id, released, release_event)
            return superseded

    def _claim_window(self, db: Db, claim: WindowClaim) -> None:
        """Take one restart, unless another request (of any replica) took the last one, or the
        window was closed or expired meanwhile: the condition is checked by the UPDATE itself,
        so two writers can never both take it."""
        taken = db.execute("UPDATE windows SET used = used + 1 WHERE window_id = ? AND"
                           " used < restarts AND closed_at = '' AND expires_at > ?",
                           (claim.window_id, claim.now)).rowcount
        if taken != 1:
            raise WindowTaken(f"window {claim.window_id} has no restart left",
                              "the request is made without it")
        for approval, event in claim.approvals:
            db.execute("INSERT INTO approvals (request_id, custodian, decision, signature,"
                       " reason, created_at, window_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (approval.request_id, approval.custodian, approval.decision,
                        approval.signature, approval.reason, approval.created_at,
                        approval.window_id))
            self._append(db, event)

    def count_requests_since(self, cluster_id: str, node_id: str, since: str, *,
                             unconfirmed: bool = False) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM requests WHERE cluster_id = ? AND node_id = ? AND"
            " created_at >= ? AND (? = 0 OR NOT EXISTS (SELECT 1 FROM results WHERE"
            " results.request_id = requests.request_id AND results.outcome = 'unlocked'))",
            (cluster_id, node_id, since, int(unconfirmed))).fetchone()
        return int(row[0])

    def pending_requests_of(self, cluster_id: str, node_id: str) -> list[RequestRecord]:
        rows = self._named(_SELECT_REQUESTS + " WHERE cluster_id = ? AND node_id = ? AND"
                           " state = 'pending' ORDER BY created_at", (cluster_id, node_id))
        return [_request(row) for row in rows]

    def record_heartbeat(self, record: HeartbeatRecord, event: AuditEvent | None) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO heartbeats (cluster_id, node_id, boot_id, first_at, last_at,"
                " lock_state, kek_version, agent_version, uptime_seconds, interval_seconds,"
                " goodbye, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (cluster_id, node_id, boot_id) DO UPDATE SET"
                " last_at = excluded.last_at, lock_state = excluded.lock_state,"
                " kek_version = excluded.kek_version, agent_version = excluded.agent_version,"
                " uptime_seconds = excluded.uptime_seconds,"
                " interval_seconds = excluded.interval_seconds, goodbye = excluded.goodbye,"
                " source = excluded.source",
                (record.cluster_id, record.node_id, record.boot_id, record.first_at,
                 record.last_at, record.lock_state, record.kek_version, record.agent_version,
                 record.uptime_seconds, record.interval_seconds, int(record.goodbye),
                 record.source))
            db.execute("DELETE FROM heartbeats WHERE cluster_id = ? AND node_id = ? AND boot_id"
                       " NOT IN (SELECT boot_id FROM heartbeats WHERE cluster_id = ? AND"
                       " node_id = ? ORDER BY last_at DESC LIMIT ?)",
                       (record.cluster_id, record.node_id, record.cluster_id, record.node_id,
                        HEARTBEAT_BOOTS))
            if event is not None:
                self._append(db, event)

    def heartbeats(self, cluster_id: str, node_id: str) -> list[HeartbeatRecord]:
        rows = self._named(_SELECT_HEARTBEATS + " WHERE cluster_id = ? AND node_id = ?"
                           " ORDER BY last_at DESC", (cluster_id, node_id))
        return [_heartbeat(row) for row in rows]

    def latest_heartbeats(self) -> dict[tuple[str, str], HeartbeatRecord]:
        latest: dict[tuple[str, str], HeartbeatRecord] = {}
        for row in self._named(_SELECT_HEARTBEATS + " ORDER BY last_at"):
            beat = _heartbeat(row)
            latest[(beat.cluster_id, beat.node_id)] = beat
        return latest

    def get_request(self, request_id: str) -> RequestRecord | None:
        rows = self._named(_SELECT_REQUESTS + " WHERE request_id = ?", (request_id,))
        return _request(rows[0]) if rows else None

    def list_requests(self, state: RequestState) -> list[RequestRecord]:
        rows = self._named(_SELECT_REQUESTS + " WHERE state = ? ORDER BY created_at", (state,))
        return [_request(row) for row in rows]

    def set_request_state(self, request_id: str, state: RequestState, reason: str,
                          event: AuditEvent) -> None:
        with self._write() as db:
            db.execute("UPDATE requests SET state = ?, reason = ? WHERE request_id = ?",
                       (state, reason, request_id))
            self._append(db, event)

    def add_approval(self, record: ApprovalRecord, event: AuditEvent) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM approvals WHERE request_id = ? AND custodian = ?",
                          (record.request_id, record.custodian)).fetchone():
                raise Conflict(f"{record.custodian} has already decided on {record.request_id}",
                               "each custodian decides once per request")
            db.execute("INSERT INTO approvals (request_id, custodian, decision, signature,"
                       " reason, created_at, window_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (record.request_id, record.custodian, record.decision, record.signature,
                        record.reason, record.created_at, record.window_id))
            if record.decision == Decision.DENY:
                db.execute("UPDATE requests SET state = 'denied', reason = ? WHERE"
                           " request_id = ?", (f"denied by {record.custodian}: {record.reason}",
                                               record.request_id))
            self._append(db, event)
            self._announce(db, record.request_id)

    def list_approvals(self, request_id: str) -> list[ApprovalRecord]:
        rows = self._named(_SELECT_APPROVALS + " WHERE request_id = ? ORDER BY created_at",
                           (request_id,))
        return [ApprovalRecord(request_id=row["request_id"], custodian=row["custodian"],
                               decision=Decision(row["decision"]), signature=row["signature"],
                               reason=row["reason"], created_at=row["created_at"],
                               window_id=row["window_id"])
                for row in rows]

    # -- maintenance windows ----------------------------------------------------------------

    def open_window(self, record: WindowRecord, event: AuditEvent) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM windows WHERE window_id = ?",
                          (record.window_id,)).fetchone():
                raise Conflict(f"window {record.window_id} exists already",
                               "open a window under a new id (the CLI makes a random one)")
            db.execute("INSERT INTO windows (window_id, cluster_id, nodes, restarts, used,"
                       " expires_at, reason, created_at, closed_at, closed_by)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (record.window_id, record.cluster_id, json.dumps(list(record.nodes)),
                        record.restarts, record.used, record.expires_at, record.reason,
                        record.created_at, record.closed_at, record.closed_by))
            db.executemany("INSERT INTO window_signatures (window_id, custodian, signature,"
                           " created_at) VALUES (?, ?, ?, ?)",
                           [(record.window_id, custodian, signature, record.created_at)
                            for custodian, signature in record.signatures.items()])
            self._append(db, event)

    def sign_window(self, window_id: str, custodian: str, signature: str, created_at: str,
                    event: AuditEvent) -> None:
        with self._write() as db:
            row = db.execute("SELECT closed_at FROM windows WHERE window_id = ?",
                             (window_id,)).fetchone()
            if row is None:
                raise NotFound(f"no window {window_id}", "see `escrow window list`")
            if row[0]:
                raise Conflict(f"window {window_id} was closed", "open a new window")
            if db.execute("SELECT 1 FROM window_signatures WHERE window_id = ? AND"
                          " custodian = ?", (window_id, custodian)).fetchone():
                raise Conflict(f"{custodian} has signed window {window_id} already",
                               "each custodian signs a window once")
            db.execute("INSERT INTO window_signatures (window_id, custodian, signature,"
                       " created_at) VALUES (?, ?, ?, ?)",
                       (window_id, custodian, signature, created_at))
            self._append(db, event)

    def get_window(self, window_id: str) -> WindowRecord | None:
        windows = self._windows(" WHERE window_id = ?", (window_id,))
        return windows[0] if windows else None

    def list_windows(self, cluster_id: str | None = None, *,
                     open_at: str | None = None) -> list[WindowRecord]:
        where, params = " WHERE (? = '' OR cluster_id = ?)", [cluster_id or "", cluster_id or ""]
        if open_at is not None:
            where += " AND closed_at = '' AND used < restarts AND expires_at > ?"
            params.append(open_at)
        return self._windows(where, params)

    def _windows(self, where: str, params: Sequence[object]) -> list[WindowRecord]:
        rows = self._named(_SELECT_WINDOWS + where + " ORDER BY created_at DESC, window_id",
                           params)
        signed: dict[str, dict[str, str]] = {row["window_id"]: {} for row in rows}
        if signed:
            # In signing order, so the opener comes first.
            for row in self._named(_SELECT_SIGNATURES + where + _SIGNING_ORDER, params):
                signed[row["window_id"]][row["custodian"]] = row["signature"]
        return [WindowRecord(window_id=row["window_id"], cluster_id=row["cluster_id"],
                             nodes=tuple(json.loads(row["nodes"])), restarts=int(row["restarts"]),
                             used=int(row["used"]), expires_at=row["expires_at"],
                             reason=row["reason"], created_at=row["created_at"],
                             closed_at=row["closed_at"], closed_by=row["closed_by"],
                             signatures=signed[row["window_id"]])
                for row in rows]

    def close_window(self, window_id: str, closed_by: str, closed_at: str,
                     event: AuditEvent) -> None:
        with self._write() as db:
            row = db.execute("SELECT closed_by FROM windows WHERE window_id = ?",
                             (window_id,)).fetchone()
            if row is None:
                raise NotFound(f"no window {window_id}", "see `escrow window list`")
            if db.execute("UPDATE windows SET closed_at = ?, closed_by = ? WHERE"
                          " window_id = ? AND closed_at = ''",
                          (closed_at, closed_by, window_id)).rowcount != 1:
                raise Conflict(f"window {window_id} was closed already by {row[0]}",
                               "a closed window approves nothing more")
            self._append(db, event)

    def list_releases(self, request_id: str) -> list[tuple[int, int, str]]:
        rows = self._db.execute("SELECT version, slot, holder FROM releases WHERE"
                                " request_id = ?", (request_id,))
        return [(int(v), int(s), str(h)) for v, s, h in rows]

    def record_releases(self, request_id: str, released: Sequence[tuple[int, int, str]],
                        event: AuditEvent) -> int:
        with self._write() as db:
            return self._record_releases(db, request_id, released, event)

    def _record_releases(self, db: Db, request_id: str,
                         released: Sequence[tuple[int, int, str]], event: AuditEvent) -> int:
        fresh = [(version, slot, holder) for version, slot, holder in released
                 if not db.execute("SELECT 1 FROM releases WHERE request_id = ? AND"
                                   " version = ? AND slot = ?",
                                   (request_id, version, slot)).fetchone()]
        if not fresh:
            return 0
        db.executemany("INSERT INTO releases VALUES (?, ?, ?, ?, ?)",
                       [(request_id, v, s, h, self._now()) for v, s, h in fresh])
        self._append(db, replace(event, details={
            **event.details, "shares": [{"version": v, "slot": s, "holder": h}
                                        for v, s, h in fresh]}))
        return len(fresh)

    def record_result(self, request_id: str, version: int, outcome: Outcome,
                      event: AuditEvent) -> Outcome | None:
        """Record an agent's outcome for one version of a request, once; ``unlocked`` completes
        the request. Returns the outcome recorded before for that version (nothing is written
        then), or None when this one was recorded."""
        with self._write() as db:
            before = db.execute("SELECT outcome FROM results WHERE request_id = ? AND"
                                " version = ?", (request_id, version)).fetchone()
            if before:
                return Outcome(before[0])
            db.execute("INSERT INTO results VALUES (?, ?, ?, ?)",
                       (request_id, version, outcome, self._now()))
            if outcome == Outcome.UNLOCKED:
                db.execute("UPDATE requests SET state = 'completed', reason = '' WHERE"
                           " request_id = ?", (request_id,))
            self._append(db, event)
            return None

    def list_results(self, request_id: str) -> dict[int, Outcome]:
        rows = self._db.execute("SELECT version, outcome FROM results WHERE request_id = ?",
                                (request_id,))
        return {int(version): Outcome(outcome) for version, outcome in rows}

    def last_unlocks(self, cluster_id: str) -> dict[str, Unlock]:
        rows = self._db.execute(
            "SELECT q.node_id, r.version, r.reported_at FROM results r JOIN requests q"
            " USING (request_id) WHERE q.cluster_id = ? AND r.outcome = 'unlocked'"
            " ORDER BY r.reported_at", (cluster_id,))
        return {str(node): Unlock(int(version), str(at)) for node, version, at in rows}

    def use_once(self, key: bytes, expires_ms: int, now_ms: int) -> bool:
        with self._unaudited() as db:
            self._uses += 1
            if self._uses % PRUNE_EVERY == 1:
                db.execute("DELETE FROM used_once WHERE expires_at <= ?", (now_ms,))
            return db.execute("INSERT INTO used_once (key, expires_at) VALUES (?, ?)"
                              " ON CONFLICT DO NOTHING", (key, expires_ms)).rowcount == 1

    def count_audit_since(self, event: str, actor: str, since: str) -> int:
        row = self._db.execute("SELECT COUNT(*) FROM audit WHERE event = ? AND actor = ? AND"
                               " ts >= ?", (event, actor, since)).fetchone()
        return int(row[0])

    # -- audit ------------------------------------------------------------------------------

    def append_audit(self, event: AuditEvent) -> AuditRecord:
        with self._write() as db:
            return self._append(db, event)

    def iter_audit(self, after_seq: int = 0, cluster_id: str | None = None,
                   through_seq: int | None = None) -> Iterator[AuditRecord]:
        """Records in chain order, ``after_seq`` < seq <= ``through_seq``: one statement (one
        consistent read) fetched in batches, so memory stays flat however long the log."""
        sql = _AUDIT_COLUMNS + " WHERE seq > ?"
        params: list[object] = [after_seq]
        if through_seq is not None:
            sql += " AND seq <= ?"
            params.append(through_seq)
        if cluster_id is not None:
            sql += " AND cluster_id = ?"
            params.append(cluster_id)
        for row in self._stream(sql + " ORDER BY seq", params):
            yield AuditRecord(*row)

    def latest_audit(self, limit: int, cluster_id: str | None = None) -> list[AuditRecord]:
        """The newest ``limit`` records (of one cluster), oldest first; reads only those."""
        if cluster_id is None:
            rows = self._db.execute(_AUDIT_COLUMNS + " ORDER BY seq DESC LIMIT ?",
                                    (limit,)).fetchall()
        else:
            rows = self._db.execute(_AUDIT_COLUMNS + " WHERE cluster_id = ? ORDER BY seq DESC"
                                    " LIMIT ?", (cluster_id, limit)).fetchall()
        return [AuditRecord(*row) for row in reversed(rows)]


    def audit_checkpoints(self) -> list[audit.Checkpoint]:
        rows = self._db.execute("SELECT seq, hash, first_seq, records, archive_name,"
                                " archive_sha256, created_at FROM audit_checkpoints ORDER BY seq")
        return [audit.Checkpoint(*row) for row in rows]

    def archive_audit(self, checkpoint: audit.Checkpoint, event: AuditEvent) -> AuditRecord:
        """Delete the records up to ``checkpoint.seq`` (already in the archive file it names),
        keep the checkpoint, and append ``event`` with the checkpoint's details, in one
        transaction. Refuses unless exactly the records ``checkpoint`` describes are there."""
        with self._write() as db:
            first, count = db.execute("SELECT MIN(seq), COUNT(*) FROM audit WHERE seq <= ?",
                                      (checkpoint.seq,)).fetchone()
            last = db.execute("SELECT hash FROM audit WHERE seq = ?",
                              (checkpoint.seq,)).fetchone()
            if (first, count) != (checkpoint.first_seq, checkpoint.records) or (
                    last is None or last[0] != checkpoint.hash):
                raise Conflict(
                    f"the audit records {checkpoint.first_seq}..{checkpoint.seq} changed while "
                    "the archive was written: nothing was deleted",
                    "another `escrow audit archive` may have run at the same time: run "
                    "`escrow audit verify`, then archive again into a new file",
                )
            db.execute("INSERT INTO audit_checkpoints VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (checkpoint.seq, checkpoint.hash, checkpoint.first_seq,
                        checkpoint.records, checkpoint.archive_name, checkpoint.archive_sha256,
                        checkpoint.created_at))
            db.execute("DELETE FROM audit WHERE seq <= ?", (checkpoint.seq,))
            return self._append(db, replace(event, details={**event.details,
                                                            **checkpoint.details()}))



def _cluster(row: Sequence[Any]) -> ClusterRecord:
    return ClusterRecord(row[0], row[1], _policy(row[2], row[3]), row[4], int(row[5]))


def _node(row: NamedRow) -> NodeRecord:
    return NodeRecord(cluster_id=row["cluster_id"], node_id=row["node_id"],
                      agent_public_key_pem=row["agent_public_key_pem"],
                      hostname=row["hostname"], enrolled_at=row["enrolled_at"],
                      status=NodeStatus(row["status"]))


def _request(row: NamedRow) -> RequestRecord:
    return RequestRecord(request_id=row["request_id"], cluster_id=row["cluster_id"],
                         node_id=row["node_id"], hostname=row["hostname"],
                         boot_id=row["boot_id"], source=row["source"], cert_pem=row["cert_pem"],
                         ephemeral_key=bytes(row["ephemeral_key"]),
                         kek_version=row["kek_version"], created_at=row["created_at"],
                         expires_at=row["expires_at"], state=RequestState(row["state"]),
                         reason=row["reason"], held_until=row["held_until"])


def _heartbeat(row: NamedRow) -> HeartbeatRecord:
    return HeartbeatRecord(cluster_id=row["cluster_id"], node_id=row["node_id"],
                           boot_id=row["boot_id"], first_at=row["first_at"],
                           last_at=row["last_at"], lock_state=LockState(row["lock_state"]),
                           kek_version=row["kek_version"], agent_version=row["agent_version"],
                           uptime_seconds=row["uptime_seconds"],
                           interval_seconds=row["interval_seconds"],
                           goodbye=bool(row["goodbye"]), source=row["source"])


def _no_cluster(cluster_id: str) -> NotFound:
    return NotFound(f"cluster {cluster_id} is not registered",
                    "see `escrow cluster list`, or register it with `escrow cluster add`")
