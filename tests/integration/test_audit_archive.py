"""`escrow audit archive`: old audit records move to archive files, the database keeps a checkpoint,
and `escrow audit verify` still checks the chain, alone or with the archives; reading the log
streams, so a flooded log costs no memory.

The escrow is set up through the real CLI with its clock moved back (libfaketime), and the bulk
of old records is written straight into the database with correct hashes, as a flood of refused
requests would leave them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from escrow import audit, audit_journal, config
from escrow.audit import AuditEvent
from escrow.core.errors import Conflict
from escrow.core.hsm import HsmSettings
from escrow.core.timestamps import timestamp
from escrow.lock import DataDirLock
from escrow.store import sqlite as sqlite_store
from escrow.store.sqlite import SqliteStore
from lab import faketime
from lab.commands import REPO, run_escrow
from tests.conftest import fails, ok

pytestmark = pytest.mark.slow
CLUSTER = "abcdefghijklmnopqrstuvwx1"
NOW = datetime.now(UTC)




def days_ago(days: float) -> dict[str, str]:
    """Environment that runs the escrow with its clock ``days`` in the past (libfaketime)."""
    return faketime.moved(f"-{days}d")


def seed(db_path: Path, times: Iterable[datetime]) -> int:
    """Append records written at ``times`` straight into the database, hashes and all."""
    db = sqlite3.connect(db_path)
    last = db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    prev = last[0] if last else audit.GENESIS
    rows = []
    for n, moment in enumerate(times):
        record = audit.chained(AuditEvent("unseal.refused", "agent:node-1", CLUSTER,
                                       {"n": n, "reason": "stale_nonce"}),
                            timestamp(moment), prev, 0)
        rows.append((record.timestamp, record.event, record.actor, record.cluster_id,
                     record.details_json, record.prev_hash, record.hash))
        prev = record.hash
    with db:
        db.executemany("INSERT INTO audit (ts, event, actor, cluster_id, details, prev_hash,"
                       " hash) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    db.close()
    return len(rows)


def spread(start_days_ago: float, end_days_ago: float, count: int) -> list[datetime]:
    step = (start_days_ago - end_days_ago) / count
    return [NOW - timedelta(days=start_days_ago - i * step) for i in range(count)]


def rows(data: Path) -> list[tuple[int, str]]:
    db = sqlite3.connect(data / "escrow.db")
    try:
        return [(int(s), str(e)) for s, e in db.execute("SELECT seq, event FROM audit ORDER BY"
                                                         " seq")]
    finally:
        db.close()


def newest(data: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(ok(run_escrow("audit", "show", "--json", "--limit", "1",
                                                      data_dir=data)))[0]
    return record


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """An escrow initialised 40 days ago: 300 refusals over the following month, a backup 20
    days ago, and 20 records of the last 3 days."""
    directory = tmp_path / "data"
    ok(run_escrow("init", "--data-dir", str(directory), env=days_ago(40)))
    seed(directory / "escrow.db", spread(39, 21, 200))
    ok(run_escrow("backup", "--out", str(tmp_path / "old.backup"), data_dir=directory,
                  env=days_ago(20)))
    seed(directory / "escrow.db", spread(19, 8, 100))
    seed(directory / "escrow.db", spread(3, 0, 20))
    return directory


def test_archiving_moves_old_records_to_a_private_file_and_verify_names_the_checkpoint(
        data: Path, tmp_path: Path) -> None:
    before = rows(data)
    out = tmp_path / "archives" / "audit-1.jsonl"
    out.parent.mkdir()
    said = ok(run_escrow("audit", "archive", "--keep-days", "7", "--out", str(out),
                         data_dir=data))
    assert "archived records 1..304 (304)" in said

    after = rows(data)
    assert len(after) == len(before) - 304 + 1  # the database shrank, by the archived records
    assert after[0][0] == 305
    assert after[-1] == (len(before) + 1, "audit.archive")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(p.name for p in out.parent.iterdir()) == ["audit-1.jsonl"]  # no temp file

    lines = out.read_bytes().splitlines()
    header = json.loads(lines[0])
    assert (header["first_seq"], header["last_seq"], header["records"]) == (1, 304, 304)
    assert header["first_prev_hash"] == audit.GENESIS
    first = json.loads(lines[1])
    assert set(first) == {"seq", "timestamp", "event", "actor", "cluster_id", "details_json",
                          "prev_hash", "hash"}
    assert first["event"] == "escrow.init"
    assert header["last_hash"] == json.loads(lines[-1])["hash"]
    assert len(lines) == 305

    record = newest(data)
    assert record["event"] == "audit.archive"
    assert record["details"]["archive_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert (record["details"]["first_seq"], record["details"]["last_seq"]) == (1, 304)

    verified = ok(run_escrow("audit", "verify", data_dir=data))
    assert (f"records 305..{len(before) + 1} verified, starting from archive checkpoint at "
            f"seq 304, hash {header['last_hash']}") in verified
    report = json.loads(ok(run_escrow("audit", "verify", "--json", data_dir=data)))
    assert (report["ok"], report["start"]["seq"], report["records"]) == (True, 304, len(after))

    whole = ok(run_escrow("audit", "verify", "--archive", str(out), data_dir=data))
    assert (f"records 1..{len(before) + 1} verified across 1 archive(s) and the database, "
            "starting from the first record") in whole
    shown = run_escrow("audit", "show", "--limit", "1000", data_dir=data)
    assert "audit.archive" in ok(shown)
    assert "records 304 and older are archived (the last in audit-1.jsonl)" in shown.stderr


def test_archiving_again_writes_a_second_archive_and_the_chain_continues(
        data: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a1.jsonl", tmp_path / "a2.jsonl"
    cut = (NOW - timedelta(days=25)).strftime("%Y-%m-%dT%H:%M:%S")
    assert "archived records 1.." in ok(run_escrow("audit", "archive", "--before", cut, "--out",
                                                   str(first), data_dir=data))
    last_of_first = json.loads(first.read_bytes().splitlines()[0])["last_seq"]
    assert f"archived records {last_of_first + 1}.." in ok(run_escrow(
        "audit", "archive", "--keep-days", "7", "--out", str(second), data_dir=data))
    header = json.loads(second.read_bytes().splitlines()[0])
    assert header["first_prev_hash"] == json.loads(first.read_bytes().splitlines()[0])[
        "last_hash"]
    total = rows(data)[-1][0]

    assert "starting from archive checkpoint at seq" in ok(run_escrow("audit", "verify",
                                                                      data_dir=data))
    assert f"records 1..{total} verified across 2 archive(s)" in ok(run_escrow(
        "audit", "verify", "--archive", str(first), "--archive", str(second), data_dir=data))
    # The second alone continues from the first's checkpoint.
    assert (f"starting from archive checkpoint at seq {last_of_first}" in ok(run_escrow(
        "audit", "verify", "--archive", str(second), data_dir=data)))
    # The first alone leaves a gap before the database: named, as a deletion.
    fails(run_escrow("audit", "verify", "--archive", str(first), data_dir=data), 1,
          f"problem: records between record {last_of_first} and record {header['last_seq'] + 1}",
          "were deleted", f"the archives given end at record {last_of_first}",
          "(archived last in a2.jsonl): give every archive up to it")
    fails(run_escrow("audit", "verify", "--archive", str(second), "--archive", str(first),
                     data_dir=data), 1, "problem:")

    assert "nothing to archive" in ok(run_escrow("audit", "archive", "--keep-days", "7",
                                                 "--out", str(tmp_path / "a3.jsonl"),
                                                 data_dir=data))
    assert not (tmp_path / "a3.jsonl").exists()
    assert [r["event"] for r in json.loads(ok(run_escrow(
        "audit", "show", "--json", "--limit", "2", data_dir=data)))] == ["audit.archive"] * 2


def test_an_edited_archive_line_and_a_deleted_database_record_are_caught(
        data: Path, tmp_path: Path) -> None:
    out = tmp_path / "a1.jsonl"
    ok(run_escrow("audit", "archive", "--keep-days", "7", "--out", str(out), data_dir=data))
    edited = tmp_path / "edited.jsonl"
    lines = out.read_bytes().splitlines(keepends=True)
    # lines[0] is the header; records 1 to 3 are escrow init's, 4 the first refusal.
    lines[4] = lines[4].replace(b'"actor":"agent:node-1"', b'"actor":"agent:node-2"')
    edited.write_bytes(b"".join(lines))
    fails(run_escrow("audit", "verify", "--archive", str(edited), data_dir=data), 1,
          "problem: record 4 (unseal.refused) was edited",
          "the records in edited.jsonl do not match the SHA-256 in its header",
          "edited.jsonl is not the file archived as a1.jsonl")

    db = sqlite3.connect(data / "escrow.db")
    victim = rows(data)[3][0]
    with pytest.raises(sqlite3.DatabaseError, match="only records an archive checkpoint covers"):
        db.execute("DELETE FROM audit WHERE seq = ?", (victim,))
    db.execute("DROP TRIGGER audit_no_delete")  # as an attacker with the file would
    db.execute("DELETE FROM audit WHERE seq = ?", (victim,))
    db.commit()
    db.close()
    fails(run_escrow("audit", "verify", data_dir=data), 1,
          f"problem: records between record {victim - 1} and record {victim + 1}",
          "were deleted")
    fails(run_escrow("audit", "verify", "--archive", str(out), data_dir=data), 1, "deleted")


def test_the_database_lets_only_checkpointed_records_go_and_a_forged_checkpoint_is_named(
        data: Path, tmp_path: Path) -> None:
    db = sqlite3.connect(data / "escrow.db")
    with pytest.raises(sqlite3.DatabaseError, match="the audit log is append-only"):
        db.execute("DELETE FROM audit WHERE seq = 5")
    with pytest.raises(sqlite3.DatabaseError, match="names a record in the log"):
        db.execute("INSERT INTO audit_checkpoints VALUES (5, ?, 1, 5, 'x', 'y', 'z')",
                   ("f" * 64,))
    # The rule holds in the database, so someone with the file can still forge a checkpoint
    # for a real record and then delete everything before it...
    hash5 = db.execute("SELECT hash FROM audit WHERE seq = 5").fetchone()[0]
    db.execute("INSERT INTO audit_checkpoints VALUES (5, ?, 1, 5, 'x', 'y', 'z')", (hash5,))
    db.execute("DELETE FROM audit WHERE seq <= 5")
    db.commit()
    with pytest.raises(sqlite3.DatabaseError, match="audit checkpoints are append-only"):
        db.execute("DELETE FROM audit_checkpoints")
    with pytest.raises(sqlite3.DatabaseError, match="audit checkpoints are append-only"):
        db.execute("UPDATE audit_checkpoints SET seq = 1")
    db.close()
    # ... but not the audit.archive record that `escrow audit archive` writes with it.
    fails(run_escrow("audit", "verify", data_dir=data), 1,
          "problem: the archive checkpoint at seq 5", "has no audit.archive record after it")
    fails(run_escrow("audit", "archive", "--keep-days", "7", "--out",
                     str(tmp_path / "never.jsonl"), data_dir=data), 1, "refusing to archive")
    assert not (tmp_path / "never.jsonl").exists()


def test_archive_refuses_young_records_a_broken_chain_and_an_existing_file(
        data: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    fails(run_escrow("audit", "archive", "--keep-days", "3", "--out", str(out), data_dir=data),
          1, "refusing to archive records younger than 7 days", "--keep-days 7 or more")
    recent = (NOW - timedelta(days=2)).strftime("%Y-%m-%d")
    fails(run_escrow("audit", "archive", "--before", recent, "--out", str(out), data_dir=data),
          1, "younger than 7 days")
    fails(run_escrow("audit", "archive", "--out", str(out), data_dir=data), 2,
          "--before DATE or --keep-days N")
    out.write_text("mine")
    fails(run_escrow("audit", "archive", "--keep-days", "7", "--out", str(out), data_dir=data),
          1, "already exists")
    assert out.read_text() == "mine"

    before = rows(data)
    db = sqlite3.connect(data / "escrow.db")
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("UPDATE audit SET actor = 'someone-else' WHERE seq = 3")
    db.commit()
    db.close()
    fresh = tmp_path / "b.jsonl"
    fails(run_escrow("audit", "archive", "--keep-days", "7", "--out", str(fresh),
                     data_dir=data), 1, "problem: record 3", "refusing to archive")
    assert not fresh.exists()
    assert rows(data) == before


def test_a_backup_of_an_archived_escrow_restores_and_still_verifies(data: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "a1.jsonl"
    ok(run_escrow("audit", "archive", "--keep-days", "7", "--out", str(out), data_dir=data))
    backup = tmp_path / "escrow.backup"
    ok(run_escrow("backup", "--out", str(backup), data_dir=data))
    restored = tmp_path / "restored"
    ok(run_escrow("restore", "--data-dir", str(restored), "--from", str(backup)))
    assert "starting from archive checkpoint at seq" in ok(run_escrow("audit", "verify",
                                                                      data_dir=restored))
    ok(run_escrow("audit", "verify", "--archive", str(out), data_dir=restored))
    assert newest(restored)["event"] == "escrow.restore"


def test_archive_runs_beside_a_serving_escrow_and_concurrent_writes(data: Path,
                                                                    tmp_path: Path) -> None:
    """`escrow serve` holds the data directory's lock and writes audit records at any time:
    the archive needs neither to stop, and the chain stays whole."""
    stop = threading.Event()
    written: list[int] = []
    errors: list[BaseException] = []

    def write() -> None:
        store = SqliteStore.open(data / "escrow.db", lambda: timestamp(datetime.now(UTC)))
        try:
            while not stop.wait(0.002):
                written.append(store.append_audit(AuditEvent("test.write", "writer")).seq)
        except BaseException as exc:  # reported by the test, not lost with the thread
            errors.append(exc)
        finally:
            store.close()

    with DataDirLock(data, "escrow serve (test)"):
        writer = threading.Thread(target=write)
        writer.start()
        try:
            ok(run_escrow("audit", "archive", "--keep-days", "7", "--out",
                          str(tmp_path / "a1.jsonl"), data_dir=data))
        finally:
            stop.set()
            writer.join()
        assert not errors, errors
        fails(run_escrow("audit", "archive", "--keep-days", "7", "--vacuum", "--out",
                         str(tmp_path / "a2.jsonl"), data_dir=data), 1, "is in use by")
    assert written
    ok(run_escrow("audit", "verify", "--archive", str(tmp_path / "a1.jsonl"), data_dir=data))
    assert {seq for seq, event in rows(data) if event == "test.write"} == set(written)


def test_vacuum_gives_the_archived_space_back(tmp_path: Path) -> None:
    data = minimal_data_dir(tmp_path / "data")
    seed(data / "escrow.db", spread(30, 20, 20_000))
    seed(data / "escrow.db", spread(1, 0, 10))
    flooded = (data / "escrow.db").stat().st_size
    ok(run_escrow("audit", "archive", "--keep-days", "7", "--vacuum", "--out",
                  str(tmp_path / "a1.jsonl"), data_dir=data))
    assert (data / "escrow.db").stat().st_size < flooded / 10
    assert len(rows(data)) == 11
    ok(run_escrow("audit", "verify", "--archive", str(tmp_path / "a1.jsonl"), data_dir=data))


def test_the_store_refuses_an_archive_whose_records_changed_and_continues_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal: list[audit.AuditRecord] = []
    monkeypatch.setattr(audit_journal, "send", journal.append)
    store = SqliteStore.open(tmp_path / "escrow.db", lambda: "2026-11-01T00:00:00.000+00:00",
                             create=True)
    try:
        records = [store.append_audit(AuditEvent(f"event.{n}", "test")) for n in range(3)]
        last = records[-1]
        checkpoint = audit.Checkpoint(last.seq, last.hash, 1, 3, "a.jsonl", "ab" * 32, "t")
        with pytest.raises(Conflict, match="changed while the archive was written"):
            store.archive_audit(replace(checkpoint, records=2), AuditEvent("audit.archive", "t"))
        assert sum(1 for _ in store.iter_audit()) == 3
        assert journal == records  # the refused archive sent nothing to the journal
        # Everything archived: the next record continues from the checkpoint.
        anchor = store.archive_audit(checkpoint, AuditEvent(audit.ARCHIVE_EVENT, "test"))
        assert anchor.prev_hash == last.hash
        assert journal == [*records, anchor]  # the journal copy keeps the archived records
        assert [r.seq for r in store.iter_audit()] == [4]
        assert store.audit_checkpoints() == [checkpoint]
        with store.audit_snapshot():
            assert audit.verify(store.iter_audit(), store.audit_checkpoints()[-1]) == []
        assert store.latest_audit(5) == [anchor]
        assert store.latest_audit(5, cluster_id="other") == []
    finally:
        store.close()


def test_an_existing_database_is_upgraded_and_can_be_archived(tmp_path: Path) -> None:
    """A database of the schema before archiving (append-only trigger, no checkpoints)."""
    data = minimal_data_dir(tmp_path / "data", create_db=False)
    index = next(i for i, m in enumerate(sqlite_store.MIGRATIONS)
                 if any("audit_checkpoints" in s for s in m))
    db = sqlite3.connect(data / "escrow.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    for statements in sqlite_store.MIGRATIONS[:index]:
        for statement in statements:
            db.execute(statement)
    db.execute(f"PRAGMA user_version = {index}")
    db.close()
    seed(data / "escrow.db", spread(60, 30, 50))
    seed(data / "escrow.db", spread(1, 0, 5))
    ok(run_escrow("audit", "verify", data_dir=data))  # opening migrates
    db = sqlite3.connect(data / "escrow.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == sqlite_store.SCHEMA_VERSION
    db.close()
    out = tmp_path / "a.jsonl"
    assert "archived records 1..50 (50)" in ok(run_escrow(
        "audit", "archive", "--keep-days", "7", "--out", str(out), data_dir=data))
    ok(run_escrow("audit", "verify", "--archive", str(out), data_dir=data))


# -- memory ----------------------------------------------------------------------------------

def minimal_data_dir(directory: Path, *, create_db: bool = True) -> Path:
    """A data directory with a config and a database, no token: the audit commands need none."""
    directory.mkdir(mode=0o700, parents=True)
    config.write(directory, HsmSettings("/nonexistent/libpkcs11.so", "t", "k", None, None), 30)
    if create_db:
        SqliteStore.open(directory / "escrow.db", lambda: "init", create=True).close()
    return directory


# A child's peak RSS starts at its parent's at fork, and this test process is bigger than the
# escrow command: a small launcher starts it and reports its rusage (wait4).
_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stderr=subprocess.STDOUT)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status), file=sys.stderr)
"""


def peak_rss_kib(*args: str) -> tuple[int, str]:
    """Peak resident memory (KiB) of one real `escrow` run, and what it printed."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("SOFTHSM2_CONF", "ESCROW_DATA_DIR", "ESCROW_HSM_PIN")}
    result = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "escrow",
                             *args], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300, check=False)
    maxrss, code = (int(n) for n in result.stderr.split())
    assert code == 0, result.stdout
    return maxrss, result.stdout


def test_verifying_and_showing_a_flooded_log_keeps_memory_flat(tmp_path: Path) -> None:
    """200,000 records (a night of refused requests) need about the memory of 1,000: the log is
    streamed, never loaded (loading them as a list took about 175 MiB more)."""
    small = minimal_data_dir(tmp_path / "small")
    big = minimal_data_dir(tmp_path / "big")
    seed(small / "escrow.db", spread(2, 1, 1_000))
    seed(big / "escrow.db", spread(2, 1, 200_000))
    small_verify, said = peak_rss_kib("audit", "verify", "--data-dir", str(small))
    assert "1000 records" in said
    big_verify, said = peak_rss_kib("audit", "verify", "--data-dir", str(big))
    assert "200000 records" in said
    small_show, _ = peak_rss_kib("audit", "show", "--json", "--data-dir", str(small))
    big_show, _ = peak_rss_kib("audit", "show", "--json", "--data-dir", str(big))
    print(f"peak RSS verify: {small_verify} KiB for 1,000 records, {big_verify} KiB for "
          f"200,000; show: {small_show} / {big_show} KiB")
    assert big_verify - small_verify < 16 * 1024, (small_verify, big_verify)
    assert big_show - small_show < 16 * 1024, (small_show, big_show)


def test_the_archive_needs_no_more_memory_than_a_short_log(tmp_path: Path) -> None:
    big = minimal_data_dir(tmp_path / "big")
    seed(big / "escrow.db", spread(30, 20, 100_000))
    seed(big / "escrow.db", spread(1, 0, 10))
    small = minimal_data_dir(tmp_path / "small")
    seed(small / "escrow.db", spread(30, 20, 1_000))
    seed(small / "escrow.db", spread(1, 0, 10))
    small_archive, _ = peak_rss_kib("audit", "archive", "--keep-days", "7", "--out",
                                    str(tmp_path / "small.jsonl"), "--data-dir", str(small))
    big_archive, said = peak_rss_kib("audit", "archive", "--keep-days", "7", "--out",
                                     str(tmp_path / "big.jsonl"), "--data-dir", str(big))
    assert "archived records 1..100000" in said
    print(f"peak RSS archive: {small_archive} KiB for 1,000 records, {big_archive} KiB for "
          "100,000")
    assert big_archive - small_archive < 16 * 1024, (small_archive, big_archive)
    shutil.rmtree(big)


def test_a_long_backlog_is_archived_in_bounded_steps_that_chain(data: Path,
                                                                tmp_path: Path) -> None:
    """One run deletes at most --max-records, so the serving escrow never waits long for the
    write lock; the runs' archives verify as one chain."""
    files = [tmp_path / f"a{n}.jsonl" for n in range(3)]
    first = run_escrow("audit", "archive", "--keep-days", "7", "--max-records", "150", "--out",
                       str(files[0]), data_dir=data)
    assert "archived records 1..150 (150)" in ok(first)
    assert "older records remain" in first.stderr
    second = run_escrow("audit", "archive", "--keep-days", "7", "--max-records", "150", "--out",
                        str(files[1]), data_dir=data)
    assert "archived records 151..300 (150)" in ok(second)
    third = run_escrow("audit", "archive", "--keep-days", "7", "--max-records", "150", "--out",
                       str(files[2]), data_dir=data)
    assert "archived records 301..304 (4)" in ok(third)
    assert "older records remain" not in third.stderr
    args = [part for f in files for part in ("--archive", str(f))]
    ok(run_escrow("audit", "verify", *args, data_dir=data))
