"""``escrow audit ...``: read, verify and archive the hash-chained audit log.

Nothing here loads the whole log: `show` asks the database for the newest records only, and
`verify` and `archive` stream the chain in batches, so a log of millions of records needs no more
memory than a short one.

`archive` moves the oldest records into a file (docs/runbooks/audit-archive.md): the file is
written, synced and renamed into place first; only then, in one transaction, are the records
deleted, a checkpoint kept (the last archived record's seq and hash, the file's SHA-256) and an
``audit.archive`` record appended. It runs safely next to `escrow serve`: the records it moves
can no longer change (the database's triggers), and the transaction re-checks them under the
write lock, so a concurrent write or archive either lands before or after it, never inside.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from escrow import audit as chain
from escrow import config
from escrow.audit import ArchiveHeader, ArchiveReader, AuditEvent, AuditRecord, Checkpoint
from escrow.cli.context import (
    actor,
    data_dir_option,
    json_option,
    now,
    open_store,
    print_json,
    table,
)
from escrow.core.errors import AuditChainBroken, EscrowError, InputError, StoreError
from escrow.core.files import atomic_file
from escrow.core.timestamps import timestamp
from escrow.lock import DataDirLock
from escrow.store import Store

# Records younger than this never leave the database: the last week stays where `escrow audit
# show` and an investigation look first, and an archive run by mistake cannot empty the log.
MIN_KEEP_DAYS = 7


@click.group()
def audit() -> None:
    """The append-only, hash-chained audit log."""


# -- verify ----------------------------------------------------------------------------------

def _open_archive(path: Path, stack: ExitStack) -> ArchiveReader:
    try:
        handle = stack.enter_context(path.open("rb"))
    except OSError as exc:
        raise InputError(f"cannot read the archive {path}: {exc.strerror}",
                         "check the path and its permissions") from None
    try:
        return ArchiveReader(path.name, handle)
    except ValueError as exc:
        raise InputError(f"{path} is not an audit archive ({exc})",
                         "give files written by `escrow audit archive`, oldest first") from None


def _verify(store: Store, archives: Sequence[Path]) -> tuple[
        chain.ChainVerifier, list[dict[str, Any]], Checkpoint | None]:
    """Archives (in order) and then the database as one chain, in one streaming pass; the
    verifier, what each archive held, and the checkpoint the database starts from."""
    read: list[dict[str, Any]] = []
    with store.audit_snapshot(), ExitStack() as stack:
        checkpoints = store.audit_checkpoints()
        latest = checkpoints[-1] if checkpoints else None
        readers = [_open_archive(path, stack) for path in archives]
        if readers:
            first = readers[0].header
            start = next((c for c in checkpoints if c.seq == first.first_seq - 1
                          and c.hash == first.first_prev_hash), None)
        else:
            start = latest
        verifier = chain.ChainVerifier(start)
        by_seq = {c.seq: c for c in checkpoints}
        for path, reader in zip(archives, readers, strict=True):
            header = reader.header
            checkpoint = by_seq.get(header.last_seq)
            if checkpoint is None or checkpoint.hash != header.last_hash:
                verifier.report(chain.ChainProblem(
                    header.last_seq, "archive",
                    f"{path.name} ends at record {header.last_seq}, where this database has no "
                    "archive checkpoint: it is not an archive of this log",
                ))
            else:
                verifier.expect_archive_record(checkpoint)
            for record in reader.records():
                verifier.add(record)
            for problem in reader.problems:
                verifier.report(problem)
            if checkpoint is not None and reader.file_sha256 != checkpoint.archive_sha256:
                verifier.report(chain.ChainProblem(
                    header.last_seq, "archive",
                    f"{path.name} is not the file archived as {checkpoint.archive_name}: its "
                    f"SHA-256 {reader.file_sha256} differs from {checkpoint.archive_sha256} in "
                    f"the checkpoint at seq {checkpoint.seq}",
                ))
            read.append({"file": str(path), "records": header.records,
                         "first_seq": header.first_seq, "last_seq": header.last_seq,
                         "sha256": reader.file_sha256})
        if latest is not None:
            verifier.expect_archive_record(latest)
        for record in store.iter_audit():
            verifier.add(record)
    verifier.finish()
    return verifier, read, latest


def _starting(start: Checkpoint | None) -> str:
    return (f"starting from {start.describe()}" if start is not None
            else "starting from the first record")


@audit.command()
@data_dir_option
@json_option
@click.option("--archive", "archives", multiple=True,
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="An archive written by `escrow audit archive`; repeat, oldest first, to "
                   "verify the archives and the database as one chain.")
def verify(data_dir: Path, as_json: bool, archives: tuple[Path, ...]) -> None:
    """Check the whole chain; name every edited, deleted or reordered record.

    Once records were archived, the database's chain starts at the archive checkpoint, and
    `--archive FILE ...` checks the archives with it.

    \b
    Example:
      escrow audit verify
      escrow audit verify --archive audit-2026-09-01.jsonl --archive audit-2026-12-01.jsonl
    """
    store = open_store(config.load(data_dir))
    try:
        checked, read, latest = _verify(store, archives)
    finally:
        store.close()
    problems = checked.problems
    start = checked.start
    if as_json:
        print_json({"records": checked.records, "first_seq": checked.first_seq,
                    "last_seq": checked.last_seq, "head": checked.head, "ok": not problems,
                    "start": None if start is None else {
                        "seq": start.seq, "hash": start.hash, "archive": start.archive_name,
                        "archive_sha256": start.archive_sha256},
                    "archives": read,
                    "problems": [{"seq": p.seq, "kind": p.kind, "message": p.message}
                                 for p in problems]})
    if problems:
        for problem in problems:
            click.echo(f"problem: {problem.message}", err=True)
        hint = ("treat the database as tampered with: compare with the journal copy, the "
                "archives and a backup")
        if read and latest is not None and read[-1]["last_seq"] != latest.seq:
            hint = (f"the archives given end at record {read[-1]['last_seq']}, the database "
                    f"continues after record {latest.seq} (archived last in "
                    f"{latest.archive_name}): give every archive up to it, oldest first; "
                    "otherwise " + hint)
        raise AuditChainBroken(
            f"the audit log has {len(problems)} problem(s) in {checked.records} records", hint)
    if as_json:
        return
    if (start is None and not archives) or checked.first_seq is None:
        click.echo(f"audit log intact: {checked.records} records, head {checked.head}")
    else:
        across = f" across {len(archives)} archive(s) and the database" if archives else ""
        click.echo(f"audit log intact: records {checked.first_seq}..{checked.last_seq} "
                   f"verified{across}, {_starting(start)}; head {checked.head}")
        if start is not None and not archives:
            click.echo(f"records {start.seq} and older are archived (the last in "
                       f"{start.archive_name}, sha256 {start.archive_sha256}): check them "
                       "with `escrow audit verify --archive FILE ...`, oldest first")
    click.echo("keep the head hash somewhere else: it proves later that no record was cut "
               "off the end")


# -- show ------------------------------------------------------------------------------------

@audit.command()
@data_dir_option
@json_option
@click.option("--cluster", "cluster_id", help="Only records about this cluster.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True,
              help="Newest records to show.")
def show(data_dir: Path, as_json: bool, cluster_id: str | None, limit: int) -> None:
    """Show the newest audit records.

    \b
    Example:
      escrow audit show --cluster CLUSTER_ID --limit 20
    """
    store = open_store(config.load(data_dir))
    try:
        records = store.latest_audit(limit, cluster_id or None)
        checkpoints = store.audit_checkpoints() if len(records) < limit else []
    finally:
        store.close()
    if as_json:
        print_json([{"seq": r.seq, "time": r.timestamp, "event": r.event, "actor": r.actor,
                     "cluster_id": r.cluster_id, "details": r.details, "hash": r.hash}
                    for r in records])
        return
    table("Audit log", ["seq", "time", "event", "actor", "cluster", "details"],
          [[r.seq, r.timestamp, r.event, r.actor, r.cluster_id or "-", r.details_json]
           for r in records])
    if checkpoints:
        click.echo(f"records {checkpoints[-1].seq} and older are archived (the last in "
                   f"{checkpoints[-1].archive_name})", err=True)


# -- archive ---------------------------------------------------------------------------------

def _written_before(record: AuditRecord, cutoff: datetime) -> bool:
    try:
        moment = datetime.fromisoformat(record.timestamp)
    except ValueError:
        return False  # a time we cannot read is never old enough
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment < cutoff


def _write_archive(out: Path, header: ArchiveHeader, records: Iterable[AuditRecord]) -> str:
    """Write the archive to ``out`` (a new file, 0600) atomically and durably. Checks that the
    records written are exactly those ``header`` describes. Returns the file's SHA-256."""
    whole, body, count = hashlib.sha256(), hashlib.sha256(), 0
    try:
        with atomic_file(out, 0o600, new=True) as handle:
            line = header.line()
            handle.write(line)
            whole.update(line)
            for record in records:
                line = chain.archive_line(record)
                handle.write(line)
                whole.update(line)
                body.update(line)
                count += 1
            if (count, body.hexdigest()) != (header.records, header.records_sha256):
                raise StoreError("the audit records changed while the archive was written: "
                                 "nothing was deleted", "run `escrow audit verify`, then "
                                 "archive again")
    except FileExistsError:
        raise InputError(f"{out} already exists", "choose a new file name") from None
    except OSError as exc:
        raise InputError(f"writing the archive {out} failed: {exc.strerror}; nothing was "
                         "deleted", "choose a writable directory with free space for the archive"
                         ) from None
    return whole.hexdigest()


def _archive(store: Store, cutoff: datetime, out: Path,
             max_records: int) -> tuple[Checkpoint | None, bool]:
    """Archive the records older than ``cutoff`` (the longest such run from the oldest on, up
    to ``max_records``): the checkpoint (None when no record is old enough), and whether older
    records remain. Refuses unless the whole chain in the database verifies."""
    with store.audit_snapshot():
        checkpoints = store.audit_checkpoints()
        verifier = chain.ChainVerifier(checkpoints[-1] if checkpoints else None)
        body = hashlib.sha256()
        first: AuditRecord | None = None
        last: AuditRecord | None = None
        count = 0
        cutting = more = True
        for record in store.iter_audit():
            verifier.add(record)
            if cutting:
                old = _written_before(record, cutoff)
                cutting = old and count < max_records
                more = old
            if cutting:
                body.update(chain.archive_line(record))
                first = first or record
                last = record
                count += 1
        problems = verifier.finish()
        if problems:
            for problem in problems:
                click.echo(f"problem: {problem.message}", err=True)
            raise AuditChainBroken(
                f"refusing to archive: the audit log has {len(problems)} problem(s)",
                "run `escrow audit verify` and investigate before moving any record out of "
                "the database",
            )
        if first is None or last is None:
            return None, False
        header = ArchiveHeader(first.seq, last.seq, count, first.prev_hash, last.hash,
                               body.hexdigest(), timestamp(now()))
        sha256 = _write_archive(out, header, store.iter_audit(through_seq=last.seq))
    checkpoint = Checkpoint(last.seq, last.hash, first.seq, count, out.name, sha256,
                            header.created_at)
    try:
        store.archive_audit(checkpoint, AuditEvent(chain.ARCHIVE_EVENT, actor(), "", {
            "before": timestamp(cutoff), "first_prev_hash": first.prev_hash}))
    except EscrowError:
        click.echo(f"note: {out} was written, but no record was removed from the database; "
                   "delete the file before you archive again", err=True)
        raise
    return checkpoint, more and not cutting


def _cutoff(before: datetime | None, keep_days: float | None, current: datetime) -> datetime:
    if (before is None) == (keep_days is None):
        raise click.UsageError("give either --before DATE or --keep-days N")
    if before is not None:
        cutoff = before if before.tzinfo is not None else before.replace(tzinfo=UTC)
    else:
        cutoff = current - timedelta(days=float(keep_days or 0))
    youngest = current - timedelta(days=MIN_KEEP_DAYS)
    if cutoff > youngest:
        raise InputError(
            f"refusing to archive records younger than {MIN_KEEP_DAYS} days (the cut "
            f"{timestamp(cutoff)} is after {timestamp(youngest)})",
            f"the last {MIN_KEEP_DAYS} days always stay in the database, for `escrow audit "
            f"show` and investigations: use --keep-days {MIN_KEEP_DAYS} or more",
        )
    return cutoff


@audit.command()
@data_dir_option
@click.option("--before", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S",
                                               "%Y-%m-%dT%H:%M:%S%z"]),
              help="Archive the records written before this date (UTC unless it says).")
@click.option("--keep-days", type=click.FloatRange(min=0),
              help=f"Archive the records older than this many days (at least {MIN_KEEP_DAYS}).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Archive file to write (a new file; created readable by you only).")
@click.option("--max-records", type=click.IntRange(min=1), default=500_000, show_default=True,
              help="Archive at most this many records in one run: the deletion holds the "
                   "database's write lock, which the serving escrow waits for up to 10 s.")
@click.option("--vacuum", is_flag=True,
              help="Afterwards give the freed space back to the file system (VACUUM); the "
                   "escrow must be stopped for it.")
def archive(data_dir: Path, before: datetime | None, keep_days: float | None, out: Path,
            max_records: int, vacuum: bool) -> None:
    """Move the oldest audit records out of the database into an archive file.

    The file (JSON lines: a header, then every record with all its hashed fields) is written
    and synced before anything is deleted; the database keeps a checkpoint so that `escrow
    audit verify` still checks its chain, and `--archive FILE` checks the archives with it.
    Records younger than 7 days are never archived; a chain that does not verify is not
    archived. Safe while `escrow serve` runs (but not with --vacuum).

    \b
    Example:
      escrow audit archive --keep-days 90 --out audit-$(date +%F).jsonl
    """
    cutoff = _cutoff(before, keep_days, now())
    if out.exists():
        raise InputError(f"{out} already exists", "choose a new file name")
    settings = config.load(data_dir)
    lock: AbstractContextManager[object] = (
        DataDirLock(data_dir, "escrow audit archive --vacuum") if vacuum else nullcontext())
    with lock:
        store = open_store(settings)
        try:
            checkpoint, more = _archive(store, cutoff, out, max_records)
            if checkpoint is not None and vacuum:
                store.compact()
        finally:
            store.close()
    if checkpoint is None:
        click.echo(f"nothing to archive: no record is older than {timestamp(cutoff)}")
        return
    click.echo(f"archived records {checkpoint.first_seq}..{checkpoint.seq} "
               f"({checkpoint.records}) to {out} (sha256 {checkpoint.archive_sha256}); the "
               f"database now starts after the {checkpoint.describe()}")
    if more:
        click.echo(f"older records remain (at most {max_records} are archived at a time): "
                   "run the command again with a new --out", err=True)
    click.echo(f"keep {out} apart from the escrow host, with its backups: `escrow audit verify "
               f"--archive {out}` checks it with the database, and nothing else holds these "
               "records now (besides the journal copy)", err=True)
