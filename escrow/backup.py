"""Backups of a data directory: one tar file with a consistent SQLite snapshot, the config and
the TLS certificates, and a manifest of their SHA-256 hashes.

An escrow on PostgreSQL (store.url) is backed up in two parts: its database by PostgreSQL's
own tools (pg_dump, whose dump keeps the schema's append-only triggers; README says how), and
its data directory's config and certificates here, without a database. Its manifest names the
store, and the audit log's length and head when the backup was made, read from the database
and verified.

No private key is ever in a backup: a TLS key (`tls/server.key`, any `*.key` file or PEM
private key under `tls/`) would let whoever holds a stolen backup pass for the escrow for as
long as the certificate is valid (825 days for the quickstart). A restored escrow gets a new
server key and certificate (docs/runbooks/escrow-rebuilt.md).

Shares stay wrapped: the token that holds the wrapping key, and its PIN, are never in a backup
(an embedded SoftHSM token's `softhsm/` directory and `hsm-pin` are left out). Backing the
token up is the operator's job, apart from this file; a backup without it restores nothing that
can be unwrapped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sqlite3
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

from escrow import audit
from escrow.audit import AuditEvent
from escrow.config import CONFIG_NAME, DB_NAME, Settings
from escrow.core.errors import ConfigError, InputError, StoreError
from escrow.core.timestamps import timestamp
from escrow.store import StoreKind, opening
from escrow.store.sql import SqlStore
from escrow.store.sqlite import SqliteStore

FORMAT = 1
MANIFEST = "MANIFEST.json"
STORES: tuple[StoreKind, ...] = ("sqlite", "postgresql")
TLS_DIR = "tls"
# Any PEM private key (PKCS#8, EC, RSA, encrypted), and the usual names of key files.
_PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_KEY_SUFFIXES = (".key", ".p12", ".pfx")


def holds_private_key(path: Path) -> bool:
    """True for a file a backup must leave out: a private key by its name or its content."""
    return path.name.endswith(_KEY_SUFFIXES) or bool(_PEM_PRIVATE_KEY.search(path.read_bytes()))


@dataclass(frozen=True)
class Manifest:
    created_at: str
    audit_records: int
    audit_head: str
    files: dict[str, str]  # name in the backup -> SHA-256
    # "postgresql": the database is not in the backup (pg_dump's); older backups say nothing,
    # and are SQLite's.
    store: StoreKind = "sqlite"

    def to_json(self) -> bytes:
        return json.dumps({"format": FORMAT, "created_at": self.created_at,
                           "audit_records": self.audit_records, "audit_head": self.audit_head,
                           "files": self.files, "store": self.store}, indent=2,
                          sort_keys=True).encode()


def _snapshot(db_path: Path, target: Path) -> None:
    """A consistent copy of a live database (SQLite's online backup), WAL included."""
    if not db_path.is_file():
        raise StoreError(f"the database {db_path} does not exist",
                         "give the data directory of an initialised escrow")
    try:
        source = sqlite3.connect(db_path)
        try:
            copy = sqlite3.connect(target)
            try:
                source.backup(copy)
            finally:
                copy.close()
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot snapshot {db_path}: {exc}",
                         "check that the data directory is readable and the disk not full"
                         ) from None


def _chain(store: SqlStore) -> tuple[int, str]:
    """The audit record count and head hash of the database (whose chain starts at its last
    archive checkpoint, if records were archived), read in one streaming pass; refuses a broken
    chain."""
    with store.audit_snapshot():
        chain = audit.verify_log(store.audit_checkpoints(), store.iter_audit())
    problems = chain.problems
    if problems:
        raise StoreError(f"the audit log has {len(problems)} problem(s): {problems[0].message}",
                         "run `escrow audit verify` and investigate before relying on a backup")
    return chain.records, chain.head


def _open(db_path: Path, now: Callable[[], datetime]) -> SqliteStore:
    return SqliteStore.open(db_path, lambda: timestamp(now()))


def create(settings: Settings, out: Path, now: Callable[[], datetime]) -> Manifest:
    """Write a backup of the data directory of ``settings`` to ``out`` (created 0600, never
    overwritten): with a snapshot of its SQLite database, or for a PostgreSQL store without
    the database, whose audit log it reads for the manifest."""
    data_dir = settings.data_dir
    members: dict[str, Path] = {CONFIG_NAME: data_dir / CONFIG_NAME}
    tls = data_dir / TLS_DIR
    if tls.is_dir():
        members |= {f"{TLS_DIR}/{p.name}": p for p in sorted(tls.iterdir())
                    if p.is_file() and not holds_private_key(p)}
    kind: StoreKind = "postgresql" if settings.store.url else "sqlite"
    with tempfile.TemporaryDirectory(prefix="escrow-backup-") as tmp:
        if kind == "postgresql":
            store: SqlStore = opening.open_store(settings, lambda: timestamp(now()))
        else:
            snapshot = Path(tmp) / DB_NAME
            _snapshot(data_dir / DB_NAME, snapshot)
            store = _open(snapshot, now)
            members[DB_NAME] = snapshot
        try:
            count, head = _chain(store)
        finally:
            store.close()
        contents = {name: path.read_bytes() for name, path in members.items()}
        manifest = Manifest(now().isoformat(), count, head,
                            {n: hashlib.sha256(c).hexdigest() for n, c in contents.items()},
                            kind)
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise InputError(f"{out} already exists", "choose a new file name") from None
        except OSError as exc:
            raise InputError(f"cannot create {out}: {exc.strerror}",
                             "choose a writable place for the backup") from None
        try:
            with os.fdopen(fd, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
                for name, content in [(MANIFEST, manifest.to_json()), *contents.items()]:
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(content), 0o600, 0
                    tar.addfile(info, io.BytesIO(content))
        except OSError as exc:
            out.unlink(missing_ok=True)
            raise InputError(f"writing {out} failed: {exc.strerror}",
                             "check free space where the backup goes") from None
    return manifest


def _read(backup: Path) -> tuple[Manifest, dict[str, bytes]]:
    """The backup's files, each checked against the manifest."""
    try:
        with tarfile.open(backup, "r:gz") as tar:
            contents: dict[str, bytes] = {}
            for member in tar.getmembers():
                path = PurePosixPath(member.name)
                if not member.isfile() or path.is_absolute() or ".." in path.parts:
                    raise InputError(f"{backup} holds an unexpected entry {member.name!r}",
                                     "restore only backups made by `escrow backup`")
                extracted = tar.extractfile(member)
                contents[member.name] = extracted.read() if extracted else b""
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise InputError(f"{backup} is not a readable backup: {exc}",
                         "check the file; it may be truncated") from None
    try:
        raw = json.loads(contents.pop(MANIFEST))
        if not isinstance(raw, dict):
            raise TypeError("the manifest is a JSON object")
        kind = raw.get("store", "sqlite")
        if kind not in STORES:
            raise ValueError(f"store {kind!r}")
        manifest = Manifest(raw["created_at"], int(raw["audit_records"]), raw["audit_head"],
                            dict(raw["files"]), kind)
        texts = [manifest.created_at, manifest.audit_head, *manifest.files,
                 *manifest.files.values()]
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("the manifest's times, names and hashes are strings")
        if raw["format"] != FORMAT:
            raise InputError(f"{backup} has backup format {raw['format']}; this escrow reads "
                             f"format {FORMAT}", "restore with the escrow version that made it")
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError):
        raise InputError(f"{backup} has no valid {MANIFEST}",
                         "restore only backups made by `escrow backup`") from None
    if set(contents) != set(manifest.files) or (DB_NAME in contents) != (
            manifest.store == "sqlite"):
        raise InputError(f"{backup} does not hold the files its manifest lists",
                         "the backup is incomplete or was altered: use another one")
    for name, content in contents.items():
        if hashlib.sha256(content).hexdigest() != manifest.files[name]:
            raise InputError(f"{name} in {backup} does not match its SHA-256 in the manifest",
                             "the backup was altered or damaged: use another one")
    return manifest, contents


def restore(backup: Path, data_dir: Path, now: Callable[[], datetime], actor: str) -> Manifest:
    """Recreate ``data_dir`` from ``backup``: all or nothing, and only into a directory that is
    not an escrow data directory already (the token's files may already be there). The
    database of a PostgreSQL escrow is pg_restore's, not touched here."""
    if (data_dir / CONFIG_NAME).exists() or (data_dir / DB_NAME).exists():
        raise ConfigError(f"{data_dir} already holds an escrow",
                          "restore into a new directory, or move this one away first")
    manifest, contents = _read(backup)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=data_dir))
    try:
        for name, content in contents.items():
            target = staging / name
            target.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
                os.fsync(handle.fileno())
        if manifest.store == "sqlite":
            _check_restored(staging / DB_NAME, backup, manifest, now, actor)
        # The config goes last: a directory is an escrow only once everything else is there.
        for name in [*(n for n in contents if n != CONFIG_NAME), CONFIG_NAME]:
            (data_dir / name).parent.mkdir(mode=0o700, exist_ok=True)
            os.replace(staging / name, data_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _check_restored(db_path: Path, backup: Path, manifest: Manifest,
                    now: Callable[[], datetime], actor: str) -> None:
    """The restored database's chain is the manifest's; the restore is its next record."""
    store = _open(db_path, now)
    try:
        count, head = _chain(store)
        if (count, head) != (manifest.audit_records, manifest.audit_head):
            raise InputError(f"the audit log in {backup} ends at record {count} "
                             f"({head[:16]}), the manifest says {manifest.audit_records} "
                             f"({manifest.audit_head[:16]})", "use another backup")
        store.append_audit(AuditEvent("escrow.restore", actor, "", {
            "backup": backup.name, "backup_created_at": manifest.created_at,
            "backup_audit_head": manifest.audit_head}))
    finally:
        store.close()
