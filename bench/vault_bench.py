"""Vault benchmark: deposit latency (n=5 and n=16) and share unwrap throughput on SoftHSM.

Run from the repository root:  .venv/bin/python -m bench.vault_bench [--deposits N]

It makes a SoftHSM token and a SQLite database in a temporary directory (removed afterwards),
and prints a Markdown table; `--out FILE` also writes it there.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from escrow.encoding import share_aad
from escrow.hsm import HsmSettings, Pin, Token
from escrow.softhsm import create_token, default_module
from escrow.store.sqlite import SqliteStore
from escrow.unlockkey import UnlockKey
from escrow.vault import Vault, timestamp
from tests.helpers.certs import make_root_ca


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


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
    sealed = token.seal(b"x" * 250, aad)  # a 33-word mnemonic is about 250 bytes
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            token.open(sealed, aad)
        done += 100
    return done, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deposits", type=int, default=200, help="deposits per policy size")
    parser.add_argument("--unwrap-seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()

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
            rows = []
            for threshold, slots in ((2, 5), (3, 16)):
                cluster_id = f"bench{slots:02d}".ljust(25, "0")
                vault.add_cluster(cluster_id, root, threshold, ["auto"] * slots,
                                  allow_no_paper=True)
                timings = bench_deposits(vault, cluster_id, args.deposits)
                rows.append(f"| deposit, t={threshold} n={slots} | {len(timings)} | "
                            f"{statistics.median(timings) * 1000:.2f} ms | "
                            f"{percentile(timings, 0.99) * 1000:.2f} ms | "
                            f"{len(timings) / sum(timings):.0f}/s |")
            done, elapsed = bench_unwrap(token, args.unwrap_seconds)
            rows.append(f"| share unwrap (AES-GCM in token) | {done} | "
                        f"{elapsed / done * 1e6:.1f} µs | - | {done / elapsed:,.0f}/s |")
            store.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    table = "\n".join([
        f"Vault benchmark, {datetime.now(UTC):%Y-%m-%d}, {platform.node()}: "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, SoftHSM2 file token, "
        "SQLite WAL synchronous=FULL",
        "",
        "| operation | count | median | p99 | rate |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
