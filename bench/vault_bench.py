"""Vault benchmark: deposit latency (n=5 and n=16) and share unwrap throughput on SoftHSM.

Run from the repository root:  .venv/bin/python -m bench.vault_bench [--deposits N]

It makes a SoftHSM token and a SQLite database in a temporary directory (removed afterwards),
and prints a Markdown table; `--out FILE` also writes it there.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.machine import Machine, invocation, preamble, this_machine
from bench.stats import percentile
from escrow.core.encoding import share_aad
from escrow.core.hsm import HsmSettings, Pin
from escrow.core.timestamps import timestamp
from escrow.core.unlockkey import UnlockKey
from escrow.softhsm import create_token, default_module
from escrow.store.sqlite import SqliteStore
from escrow.vault import Vault
from escrow.wrapping import Token
from lab.certs import make_root_ca

TITLE = "Vault: deposits and share unwrapping"


@dataclass(frozen=True)
class Operation:
    name: str
    count: int
    seconds: float  # spent in the operations alone, for the rate
    median: float
    p99: float | None  # None where single operations are too short to time one by one


def bench_deposits(vault: Vault, cluster_id: str, count: int) -> list[float]:
    timings = []
    for _ in range(count):
        key = UnlockKey(os.urandom(32))
        started = time.perf_counter()
        vault.deposit(cluster_id, key)
        timings.append(time.perf_counter() - started)
    return timings


def bench_unwrap(token: Token, seconds: float) -> tuple[int, float]:
    aad = share_aad("b" * 25, 1, 0)
    wrapped = token.wrap(b"x" * 250, aad)  # a 33-word mnemonic is about 250 bytes
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            token.unwrap(wrapped, aad)
        done += 100
    return done, time.perf_counter() - started


def measure(deposits: int, unwrap_seconds: float) -> list[Operation]:
    """Deposits under a t=2 n=5 and a t=3 n=16 policy, then unwraps for `unwrap_seconds`."""
    operations = []
    workdir = Path(tempfile.mkdtemp(prefix="escrow-bench-"))
    try:
        pin = secrets.token_urlsafe(16)
        conf = create_token(workdir / "softhsm", "bench", pin)
        settings = HsmSettings(default_module(), "bench", "wrap", softhsm_conf=conf)
        with Token(settings, Pin(pin, "bench")) as token:
            token.create_wrapping_key()
            store = SqliteStore.open(workdir / "escrow.db",
                                     lambda: timestamp(datetime.now(UTC)), create=True)
            vault = Vault(store, token, lambda: datetime.now(UTC), "bench")
            root = make_root_ca().pem
            for threshold, slots in ((2, 5), (3, 16)):
                cluster_id = f"bench{slots:02d}".ljust(25, "0")
                vault.add_cluster(cluster_id, root, threshold, ["auto"] * slots,
                                  allow_no_paper=True)
                timings = bench_deposits(vault, cluster_id, deposits)
                operations.append(Operation(f"deposit, t={threshold} n={slots}", len(timings),
                                            sum(timings), statistics.median(timings),
                                            percentile(timings, 0.99)))
            done, elapsed = bench_unwrap(token, unwrap_seconds)
            operations.append(Operation("share unwrap (AES-GCM in token)", done, elapsed,
                                        elapsed / done, None))
            store.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return operations


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


def table(operations: list[Operation]) -> str:
    return "\n".join([
        "| operation | count | median | p99 | rate |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {op.name} | {op.count} | {_duration(op.median)} | "
          f"{'-' if op.p99 is None else _duration(op.p99)} | {op.count / op.seconds:,.0f}/s |"
          for op in operations),
    ])


def document(operations: list[Operation], machine: Machine, command: str) -> str:
    return "\n".join([
        preamble(TITLE, machine, command),
        "SoftHSM2 file token, SQLite in WAL mode with synchronous=FULL. A deposit splits a fresh "
        "key with SLIP-39, wraps every share in the token and commits them with an audit "
        "record; the unwrap rate is for one thread opening a 250-byte share (the size of a "
        "33-word mnemonic) over and over, timed in batches of 100, so its median column is "
        "the mean.",
        "",
        table(operations),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deposits", type=int, default=200, help="deposits per policy size")
    parser.add_argument("--unwrap-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    text = document(measure(args.deposits, args.unwrap_seconds), this_machine(),
                    invocation("bench.vault_bench"))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
