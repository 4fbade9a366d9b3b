"""Every benchmark in turn, with its results in bench/results/.

Run from the repository root, as root (the agent benchmark starts dockerd):

    .venv/bin/python -m bench [--agents 10,100,1000,5000]

Writes vault.md, unseal_storm.md, agent_overhead.md, hostile_flood.md, slow_clients.md,
unseal_latency.png and SUMMARY.md (the machine, each benchmark's table, how long each took).
Needs the `bench` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from bench import agent_overhead, hostile_flood, slow_clients, unseal_storm, vault_bench
from bench.checkout import REPO
from bench.machine import Machine, invocation, this_machine
from bench.plot import plot_unseal_latency

RESULTS = Path(__file__).resolve().parent / "results"
PLOT = "unseal_latency.png"
T = TypeVar("T")


def timed(name: str, durations: dict[str, float], run: Callable[[], T]) -> T:
    """Run one benchmark, note its wall time and say so on stderr (a full run takes minutes)."""
    print(f"{name}: running", file=sys.stderr, flush=True)
    began = time.monotonic()
    result = run()
    durations[name] = time.monotonic() - began
    print(f"{name}: done in {durations[name]:.0f} s", file=sys.stderr, flush=True)
    return result


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def summary(machine: Machine, command: str, vault: list[vault_bench.Operation],
            storms: list[unseal_storm.Storm], overhead: agent_overhead.Overhead,
            flood: hostile_flood.Result, slow: list[slow_clients.Run],
            durations: dict[str, float]) -> str:
    return "\n".join([
        "# Benchmark summary",
        "",
        f"Taken {datetime.now(UTC):%Y-%m-%d} by `{command}` in "
        f"{_minutes(sum(durations.values()))}, all on one machine: every load generator "
        "(simulated agents, dockerd restarts) ran on the same host as the escrow it loads.",
        "",
        "| machine | |",
        "| --- | --- |",
        f"| host | {machine.hostname} |",
        f"| CPU | {machine.cores} cores, {machine.cpu_model} (from /proc/cpuinfo) |",
        f"| RAM | {machine.ram_gib:.1f} GiB |",
        f"| virtualization | {machine.virtualization} (systemd-detect-virt) |",
        f"| kernel | Linux {machine.kernel} |",
        f"| Python | {machine.python} |",
        "",
        "## Unseal latency against concurrent agents",
        "",
        f"![unseal latency against concurrent agents]({PLOT})",
        "",
        unseal_storm.table(storms),
        "",
        "How it is measured: [unseal_storm.md](unseal_storm.md).",
        "",
        "## Deposits and share unwrapping",
        "",
        vault_bench.table(vault),
        "",
        "How it is measured: [vault.md](vault.md).",
        "",
        "## Agent overhead against a plaintext baseline",
        "",
        agent_overhead.table(overhead),
        "",
        "## Idle agent footprint",
        "",
        agent_overhead.footprint(overhead),
        "",
        "How both are measured: [agent_overhead.md](agent_overhead.md).",
        "",
        "## Hostile floods",
        "",
        hostile_flood.tables(flood),
        "",
        "How they are measured: [hostile_flood.md](hostile_flood.md).",
        "",
        "## Slow clients",
        "",
        slow_clients.table(slow),
        "",
        "How it is measured: [slow_clients.md](slow_clients.md).",
        "",
        "## Run time",
        "",
        "| benchmark | wall time |",
        "| --- | --- |",
        *(f"| {name} | {_minutes(seconds)} |" for name, seconds in durations.items()),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=unseal_storm.agent_counts, default=[10, 100, 1000, 5000],
                        help="comma-separated counts of concurrent agents, one storm each")
    parser.add_argument("--deposits", type=int, default=200, help="deposits per policy size")
    parser.add_argument("--unwrap-seconds", type=float, default=5.0)
    parser.add_argument("--restarts", type=int, default=20, help="dockerd restarts per unlocker")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--flood-baseline", type=Path,
                        help="a checkout the hostile floods compare against (default: none)")
    parser.add_argument("--flood-requests", type=int, default=10_000,
                        help="unidentified unseal requests per escrow")
    parser.add_argument("--flood-seconds", type=float, default=20.0,
                        help="length of each nonce flood")
    parser.add_argument("--slow-baseline", type=Path,
                        help="a checkout the slow clients compare against (default: none)")
    parser.add_argument("--slow-connections", type=int, default=1000,
                        help="slow connections held open while /healthz is probed")
    parser.add_argument("--slow-seconds", type=float, default=30.0,
                        help="seconds of /healthz probing under them")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    machine, command = this_machine(), invocation("bench")
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    durations: dict[str, float] = {}
    # Each file is written as soon as its benchmark ends, so a later failure keeps it.
    vault = timed("vault", durations,
                  lambda: vault_bench.measure(args.deposits, args.unwrap_seconds))
    (out / "vault.md").write_text(vault_bench.document(vault, machine, command))
    storms = [timed(f"unseal storm, {count:,} agents", durations,
                    functools.partial(unseal_storm.measure, count)) for count in args.agents]
    (out / "unseal_storm.md").write_text(unseal_storm.document(storms, machine, command))
    plot_unseal_latency(storms, machine, out / PLOT)
    overhead = timed("agent overhead and idle footprint", durations,
                     lambda: agent_overhead.measure(args.restarts, args.idle_seconds))
    (out / "agent_overhead.md").write_text(agent_overhead.document(overhead, machine, command))
    flood = timed("hostile floods", durations, lambda: hostile_flood.measure(
        REPO, args.flood_baseline, requests=args.flood_requests,
        seconds=args.flood_seconds))
    (out / "hostile_flood.md").write_text(hostile_flood.document(flood, machine, command))
    slow = timed("slow clients", durations, lambda: slow_clients.measure(
        REPO, args.slow_baseline, slow=args.slow_connections,
        seconds=args.slow_seconds))
    (out / "slow_clients.md").write_text(slow_clients.document(slow, machine, command))
    (out / "SUMMARY.md").write_text(summary(machine, command, vault, storms, overhead, flood,
                                            slow, durations))
    print(f"results in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
