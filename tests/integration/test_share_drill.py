"""The share drill (issue 18) against a real `escrow serve`: a custodian types their paper share
into `escrow share verify`, which proves it matches the escrow's copy without sending it; every
drill is audited, `escrow share drills` lists them, and /metrics ages the least recently
drilled share of each cluster's newest key. The drill's store methods on both backends."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner

from escrow import api_client
from escrow.audit import AuditEvent
from escrow.cli import cli
from escrow.cli.drills import drills_path, mine, verify_request
from escrow.core import drill, protocol, shares
from escrow.core.errors import IdentityError
from escrow.core.protocol import (
    NonceResponse,
    ShareDrills,
    ShareProof,
    ShareVerifyRequest,
    ShareVerifyResponse,
)
from escrow.core.timestamps import timestamp
from escrow.core.unlockkey import UnlockKey
from escrow.https import Origin, Response
from escrow.policy import Policy
from escrow.store import ClusterRecord, DrillRecord, ShareRecord
from escrow.store.sql import SqlStore
from lab.api import deposit, enrolled, run
from lab.commands import run_escrow
from lab.net import free_port
from lab.server import Cluster, EscrowProcess, make_escrow

pytestmark = pytest.mark.slow
AGE = "escrow_share_drill_age_seconds"
DAY = 86400.0


@pytest.fixture(scope="module")
def escrow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EscrowProcess]:
    server = make_escrow(tmp_path_factory.mktemp("drill"))
    for name in ("alice", "bob", "carol"):
        server.custodian(name)
    server.start()
    yield server
    assert server.stop() == 0


def paper(escrow: EscrowProcess, custodian: str, cluster: Cluster) -> str:
    """The custodian's share of the newest version, as `escrow share export` prints it."""
    exported = escrow.as_custodian(custodian, "share", "export", "--cluster", cluster.cluster_id)
    assert exported.returncode == 0, exported.stderr
    return exported.stdout


def drill_as(escrow: EscrowProcess, custodian: str, cluster: Cluster, mnemonic: str,
             *extra: str) -> Any:
    return escrow.as_custodian(custodian, "share", "verify", "--cluster", cluster.cluster_id,
                               *extra, stdin=mnemonic)


def audited(escrow: EscrowProcess, cluster: Cluster) -> list[tuple[str, str, dict[str, Any]]]:
    """(event, actor, details) of the cluster's drill records, oldest first."""
    shown = escrow.cli("audit", "show", "--json", "--limit", "100000", "--cluster",
                       cluster.cluster_id)
    assert shown.returncode == 0, shown.stderr
    return [(r["event"], r["actor"], r["details"]) for r in json.loads(shown.stdout)
            if r["event"].startswith("share.drill")]


def listed(escrow: EscrowProcess, custodian: str, cluster: Cluster) -> list[dict[str, Any]]:
    shown = escrow.as_custodian(custodian, "share", "drills", "--cluster", cluster.cluster_id,
                                "--json")
    assert shown.returncode == 0, shown.stderr
    rows: list[dict[str, Any]] = json.loads(shown.stdout)
    return rows


def made_long_ago(escrow: EscrowProcess, cluster: Cluster, days: int) -> None:
    """Date the cluster's key versions back, as if deposited ``days`` ago."""
    moment = timestamp(datetime.now(UTC) - timedelta(days=days))
    with closing(sqlite3.connect(escrow.data_dir / "escrow.db", timeout=10)) as db:
        db.execute("UPDATE key_versions SET created_at = ? WHERE cluster_id = ?",
                   (moment, cluster.cluster_id))
        db.commit()


def test_a_correct_paper_share_is_ok_audited_listed_and_resets_the_drill_age(
        escrow: EscrowProcess) -> None:
    cluster, _, _ = enrolled(escrow, 2, "auto,alice,bob")
    made_long_ago(escrow, cluster, 100)
    # Never drilled: the shares are as old as their version, past a 90-day alert.
    assert escrow.metric(AGE, cluster=cluster.cluster_id) >= 100 * DAY - 60
    alices = paper(escrow, "alice", cluster)

    ok = drill_as(escrow, "alice", cluster, alices)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"ok: your share matches version 1 slot 1 of {cluster.cluster_id}"
    assert audited(escrow, cluster) == [
        ("share.drill", "custodian:alice", {"version": 1, "slot": 1, "outcome": "ok"})]
    rows = {r["custodian"]: r for r in listed(escrow, "bob", cluster)}
    assert set(rows) == {"alice", "bob"}  # custodian slots only, never the auto ones
    assert rows["alice"]["last_ok_at"]
    assert rows["alice"]["age_seconds"] < 60
    assert rows["bob"]["last_ok_at"] is None
    assert rows["bob"]["age_seconds"] >= 100 * DAY - 60
    assert (rows["alice"]["yours"], rows["bob"]["yours"]) == (False, True)
    # Bob has not drilled: the oldest still counts.
    assert escrow.metric(AGE, cluster=cluster.cluster_id) >= 100 * DAY - 60

    assert drill_as(escrow, "bob", cluster, paper(escrow, "bob", cluster)).returncode == 0
    assert 0 < escrow.metric(AGE, cluster=cluster.cluster_id) < 60  # present, and fresh
    table = escrow.as_custodian("alice", "share", "drills", "--cluster", cluster.cluster_id)
    assert table.returncode == 0, table.stderr
    assert "never" not in table.stdout
    assert {"alice", "bob"} <= set(table.stdout.split())


def test_the_share_of_an_older_version_is_named_and_the_newest_is_to_be_exported(
        escrow: EscrowProcess) -> None:
    cluster, node, _ = enrolled(escrow, 2, "auto,alice,bob")
    old = paper(escrow, "alice", cluster)
    assert run(deposit(escrow, node, UnlockKey(os.urandom(32)))) == 2

    stale = drill_as(escrow, "alice", cluster, old)
    assert stale.returncode == 1
    assert ("does not match version 2 slot 1 of " + cluster.cluster_id) in stale.stderr
    assert "it matches version 1 slot 1, an older retained version" in stale.stderr
    assert f"escrow share export --cluster {cluster.cluster_id}" in stale.stderr
    assert [d for _, _, d in audited(escrow, cluster)] == [
        {"version": 2, "slot": 1, "outcome": "mismatch"},
        {"version": 1, "slot": 1, "outcome": "ok"}]

    asked = drill_as(escrow, "alice", cluster, old, "--version", "1")
    assert asked.returncode == 0, asked.stderr
    assert "ok: your share matches version 1 slot 1" in asked.stdout
    wrong = drill_as(escrow, "alice", cluster, old, "--version", "2")
    assert wrong.returncode == 1
    assert "does not match version 2 slot 1" in wrong.stderr
    newest = drill_as(escrow, "alice", cluster, paper(escrow, "alice", cluster))
    assert newest.returncode == 0, newest.stderr
    assert "ok: your share matches version 2 slot 1" in newest.stdout
    rows = {(r["version"], r["custodian"]): r["last_ok_at"]
            for r in listed(escrow, "alice", cluster)}
    assert [bool(rows[(2, "alice")]), bool(rows[(1, "alice")]), bool(rows[(2, "bob")])] == [
        True, True, False]


def test_another_custodian_s_share_does_not_match_and_counts_as_no_drill(
        escrow: EscrowProcess) -> None:
    cluster, _, _ = enrolled(escrow, 2, "auto,alice,bob")
    wrong = drill_as(escrow, "bob", cluster, paper(escrow, "alice", cluster))
    assert wrong.returncode == 1
    assert f"does not match version 1 slot 2 of {cluster.cluster_id}" in wrong.stderr
    assert audited(escrow, cluster) == [
        ("share.drill", "custodian:bob", {"version": 1, "slot": 2, "outcome": "mismatch"})]
    assert all(r["last_ok_at"] is None for r in listed(escrow, "bob", cluster))


def test_a_custodian_without_a_slot_is_refused_and_audited(escrow: EscrowProcess) -> None:
    cluster, _, _ = enrolled(escrow, 2, "auto,alice,bob")
    alices = paper(escrow, "alice", cluster)
    refused = drill_as(escrow, "carol", cluster, alices)
    assert refused.returncode == 1
    assert "refused (403): carol holds no share" in refused.stderr
    listing = escrow.as_custodian("carol", "share", "drills", "--cluster", cluster.cluster_id)
    assert listing.returncode == 1
    assert "carol holds no share" in listing.stderr
    # Straight at the API, with a proof made from alice's share for alice's slot.
    carol = escrow.api_as("carol")
    nonce = protocol.b64d(carol.call("POST", "/v1/nonce", NonceResponse).nonce)
    proof = drill.proof(shares.parse_share(alices, "alice").share, nonce, cluster.cluster_id,
                        1, 1, "carol")
    with pytest.raises(IdentityError) as answer:
        carol.call("POST", "/v1/shares/verify", ShareVerifyResponse, ShareVerifyRequest(
            cluster_id=cluster.cluster_id, nonce=protocol.b64e(nonce),
            proofs=[ShareProof(version=1, slot=1, proof=protocol.b64e(proof))]))
    assert (answer.value.status, answer.value.reason) == (403, "not_a_custodian")
    assert [(e, d["reason"], d["custodian"]) for e, _, d in audited(escrow, cluster)] == [
        ("share.drills.refused", "not_a_custodian", "carol"),
        ("share.drills.refused", "not_a_custodian", "carol"),
        ("share.drill.refused", "not_a_custodian", "carol")]


def test_a_cluster_without_a_key_or_unknown_is_a_404(escrow: EscrowProcess) -> None:
    keyless = escrow.cluster(1, "alice")
    alice = escrow.api_as("alice")
    for cluster_id in (keyless.cluster_id, "z" * 25):
        with pytest.raises(IdentityError) as answer:
            alice.call("GET", drills_path(cluster_id), ShareDrills)
        assert answer.value.status == 404
    told = drill_as(escrow, "alice", keyless, shares.split(UnlockKey(os.urandom(32)), 1, 1)[0])
    assert told.returncode == 1
    assert "has no key deposited yet" in told.stderr


def test_a_typo_is_told_locally_naming_what_to_check_and_nothing_is_sent(
        escrow: EscrowProcess) -> None:
    cluster, _, _ = enrolled(escrow, 2, "auto,alice,bob")
    words = paper(escrow, "alice", cluster).split()

    def verify_at_a_dead_url(mnemonic: str) -> Any:
        # Any attempt to send would fail as unreachable, never as a typo.
        return run_escrow("share", "verify", "--cluster", cluster.cluster_id, "--url",
                          f"https://localhost:{free_port()}", "--ca", str(escrow.ca), "--key",
                          str(escrow.base / "alice"), "--passphrase-file",
                          str(escrow.base / "pass"), stdin=mnemonic)

    typo = verify_at_a_dead_url(" ".join([*words[:6], "qqqq", *words[7:]]))
    assert typo.returncode == 1
    assert "word 7: 'qqqq' is not a SLIP-39 word" in typo.stderr
    assert "check that word against the paper share" in typo.stderr
    runs = [" ".join(words[i:i + 3]) for i in range(len(words) - 2)]
    for bad in (" ".join([*words[:6], words[8], words[7], words[6], *words[9:]]),
                " ".join(words[:-1])):
        told = verify_at_a_dead_url(bad)
        assert told.returncode == 1
        assert "the words do not form a valid share" in told.stderr
        assert "compare each word with the paper" in told.stderr
        for result in (typo, told):
            assert "cannot reach" not in result.stderr
            assert not any(run in result.stderr for run in runs)
    assert audited(escrow, cluster) == []


def test_a_replayed_nonce_is_refused_and_audited(escrow: EscrowProcess) -> None:
    cluster, _, _ = enrolled(escrow, 2, "auto,alice,bob")
    share = shares.parse_share(paper(escrow, "alice", cluster), "alice").share
    alice = escrow.api_as("alice")
    listing = alice.call("GET", drills_path(cluster.cluster_id), ShareDrills)
    nonce = protocol.b64d(alice.call("POST", "/v1/nonce", NonceResponse).nonce)
    body = verify_request(share, listing, nonce, mine(listing, None))
    first = alice.call("POST", "/v1/shares/verify", ShareVerifyResponse, body)
    assert [(r.version, r.slot, r.match) for r in first.results] == [(1, 1, True)]
    # The same proof in a newly signed request: the custodian's signature is fresh, the
    # drill's nonce is not.
    for replayed in (body, verify_request(share, listing, bytes(32), mine(listing, None))):
        with pytest.raises(IdentityError) as answer:
            alice.call("POST", "/v1/shares/verify", ShareVerifyResponse, replayed)
        assert (answer.value.status, answer.value.reason) == (401, "stale_nonce")
    assert [(e, d.get("reason", d.get("outcome"))) for e, _, d in audited(escrow, cluster)] == [
        ("share.drill", "ok"), ("share.drill.refused", "stale_nonce"),
        ("share.drill.refused", "stale_nonce")]


def test_the_share_never_leaves_the_custodian_s_machine(
        escrow: EscrowProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, _, _ = enrolled(escrow, 2, "auto,alice,bob")
    mnemonic = paper(escrow, "alice", cluster).strip()
    value = shares.parse_share(mnemonic, "alice").share.value
    sent: list[bytes] = []
    send = api_client.ApiClient._send

    async def recorded(self: api_client.ApiClient, origin: Origin, method: str, path: str,
                       raw: bytes, headers: Sequence[tuple[str, str]]) -> Response:
        sent.append(f"{method} {path} ".encode() + raw)
        return await send(self, origin, method, path, raw, headers)

    monkeypatch.setattr(api_client.ApiClient, "_send", recorded)
    result = CliRunner().invoke(cli, [
        "share", "verify", "--cluster", cluster.cluster_id, "--url", escrow.url, "--ca",
        str(escrow.ca), "--key", str(escrow.base / "alice"), "--passphrase-file",
        str(escrow.base / "pass")], input=mnemonic + "\n")
    assert result.exit_code == 0, result.output
    assert "ok: your share matches version 1 slot 1" in result.stdout
    assert [s.split(b" ")[:2] for s in sent] == [
        [b"GET", drills_path(cluster.cluster_id).encode()], [b"POST", b"/v1/nonce"],
        [b"POST", b"/v1/shares/verify"]]
    words = mnemonic.split()
    runs = [" ".join(words[i:i + 3]).encode() for i in range(len(words) - 2)]
    spellings = [value, value.hex().encode(), base64.b64encode(value)]
    # What the CLI sent, and all the escrow kept: its log, its database, its audit log.
    kept = [escrow.log().encode(), escrow.cli("audit", "show", "--json").stdout.encode()]
    kept += [path.read_bytes() for path in escrow.data_dir.glob("escrow.db*")]
    for where in [*sent, *kept]:
        assert not any(run in where.lower() for run in runs)
        assert not any(spelling in where for spelling in spellings)


# -- the store, on SQLite and PostgreSQL -----------------------------------------------------

def _cluster_with_versions(store: SqlStore, versions: int) -> str:
    cluster_id = "c" * 25
    policy = Policy(2, ("auto", "alice", "bob"))
    store.add_cluster(ClusterRecord(cluster_id, "pem", policy, "2026-12-01T00:00:00Z"),
                      AuditEvent("cluster.add", "test", cluster_id))
    for number in range(versions):
        store.add_key_version(
            cluster_id, f"fingerprint-{number}", policy,
            lambda version: [ShareRecord(cluster_id, version, slot, holder, b"wrapped")
                             for slot, holder in enumerate(policy.slots)],
            AuditEvent("key.deposit", "test", cluster_id))
    return cluster_id


def _drilled(cluster_id: str, version: int, slot: int, custodian: str, at: str
             ) -> tuple[DrillRecord, AuditEvent]:
    return (DrillRecord(cluster_id, version, slot, custodian, at),
            AuditEvent("share.drill", f"custodian:{custodian}", cluster_id,
                       {"version": version, "slot": slot, "outcome": "ok"}))


def test_a_drill_is_kept_once_per_slot_with_its_audit_record_and_goes_with_its_version(
        store: SqlStore) -> None:
    cluster_id = _cluster_with_versions(store, 2)
    store.record_drill(*_drilled(cluster_id, 1, 1, "alice", "2026-12-01T01:00:00.000+00:00"))
    store.record_drill(*_drilled(cluster_id, 2, 1, "alice", "2026-12-01T02:00:00.000+00:00"))
    store.record_drill(*_drilled(cluster_id, 2, 1, "alice", "2026-12-01T03:00:00.000+00:00"))
    store.record_drill(*_drilled(cluster_id, 2, 2, "bob", "2026-12-01T04:00:00.000+00:00"))
    assert [(d.version, d.slot, d.custodian, d.last_ok_at[11:13])
            for d in store.list_drills(cluster_id)] == [
        (2, 1, "alice", "03"), (2, 2, "bob", "04"), (1, 1, "alice", "01")]
    assert [r.event for r in store.iter_audit()].count("share.drill") == 4
    store.delete_key_versions(cluster_id, [1], AuditEvent("key.prune", "test", cluster_id))
    assert [d.version for d in store.list_drills(cluster_id)] == [2, 2]
    # A drill of a version pruned meanwhile is audited, and keeps no row.
    store.record_drill(*_drilled(cluster_id, 1, 1, "alice", "2026-12-01T05:00:00.000+00:00"))
    assert [d.version for d in store.list_drills(cluster_id)] == [2, 2]
    assert [r.event for r in store.iter_audit()][-1] == "share.drill"
