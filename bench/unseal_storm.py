"""Unseal storm: N simulated enrolled agents send concurrent unseal requests over TLS to one
`escrow serve` (auto policy, t=2), and each rebuilds the key from its released shares.

Run from the repository root:  .venv/bin/python -m bench.unseal_storm --agents 1000

Everything lives in a temporary directory (data dir, SoftHSM token) that is removed at the end.
Prints a Markdown table; --out FILE also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from agent.client import EscrowClient
from agent.release import candidate_keys
from escrow.unlockkey import UnlockKey
from tests.helpers.server import EscrowProcess, Node, make_escrow


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def enroll_all(escrow: EscrowProcess, nodes: list[Node], key: UnlockKey) -> None:
    async with EscrowClient(escrow.url, escrow.ca, connections=16) as client:
        gate = asyncio.Semaphore(16)

        async def one(node: Node) -> None:
            async with gate:
                await client.enroll(node.cluster_id, node.node_id, node.cert_pem, node.cert.key,
                                    node.agent_key, node.hostname)

        await asyncio.gather(*(one(n) for n in nodes))
        await client.deposit(nodes[0].cluster_id, nodes[0].node_id, nodes[0].agent_key, key)


async def storm(escrow: EscrowProcess, nodes: list[Node], key: UnlockKey
                ) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    async with EscrowClient(escrow.url, escrow.ca, connections=len(nodes),
                            timeout=600) as client:
        start = asyncio.Event()

        async def one(node: Node) -> None:
            nonlocal errors
            await start.wait()
            began = time.perf_counter()
            try:
                status, ephemeral = await client.unseal(node.cluster_id, node.node_id,
                                                        node.cert_pem, node.agent_key,
                                                        node.hostname, "bench-boot")
                (_, rebuilt), = candidate_keys(status, ephemeral)
                if rebuilt != key:
                    raise ValueError("wrong key")
                latencies.append(time.perf_counter() - began)
            except Exception:  # counted and reported; the storm goes on
                errors += 1

        tasks = [asyncio.create_task(one(n)) for n in nodes]
        await asyncio.sleep(0.1)
        began = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        return latencies, errors, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="escrow-storm-") as workdir:
        escrow = make_escrow(Path(workdir), ESCROW_REQUESTS_RATE_LIMIT=str(args.agents * 10))
        escrow.start()
        try:
            cluster = escrow.cluster(2, "auto,auto", "--allow-no-paper-recovery")
            nodes = [cluster.node() for _ in range(args.agents)]
            key = UnlockKey(os.urandom(32))
            began = time.perf_counter()
            asyncio.run(enroll_all(escrow, nodes, key))
            enroll_seconds = time.perf_counter() - began
            latencies, errors, total = asyncio.run(storm(escrow, nodes, key))
            assert escrow.process is not None
            rss = peak_rss_mib(escrow.process.pid)
        finally:
            escrow.stop()
    served = len(latencies)
    table = "\n".join([
        f"Unseal storm, {datetime.now(UTC):%Y-%m-%d}, {platform.node()}: {os.cpu_count()} "
        f"cores, Python {platform.python_version()}, escrow and load generator on the same "
        "machine, TLS on loopback, SoftHSM, auto policy t=2 (one key version)",
        "",
        "| agents | served | errors | total s | requests/s | p50 s | p99 s | server peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {args.agents} | {served} | {errors} | {total:.2f} | {served / total:.0f} | "
        f"{percentile(latencies, 0.5):.2f} | {percentile(latencies, 0.99):.2f} | "
        f"{rss:.0f} MiB |",
        "",
        f"(enrolling {args.agents} agents beforehand took {enroll_seconds:.1f} s)",
    ])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
