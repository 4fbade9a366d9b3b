"""Unseal storm: N simulated enrolled agents send concurrent unseal requests over TLS to one
`escrow serve` (auto policy, t=2), and each rebuilds the key from its released shares.

Run from the repository root:  .venv/bin/python -m bench.unseal_storm --agents 10,100,1000

Each count gets an escrow of its own, started afresh in a temporary directory (data dir,
SoftHSM token) that is removed at the end; with `--stores sqlite,postgresql,postgresql-2` each
count runs once per store, side by side, the PostgreSQL ones on a server of their own in that
directory (lab/postgres.py, on a unix socket), `postgresql-2` with two replicas of the escrow
(README, "Run several replicas"), half of the agents preferring each. Prints a Markdown table;
--out FILE also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from agent.client import EscrowClient
from agent.errors import EscrowRejected
from agent.release import candidate_keys
from bench.machine import Machine, invocation, preamble, this_machine
from bench.proc import allow_open_files, cpu_seconds, listen_overflows, memory_mib
from bench.stats import percentile
from escrow.core.unlockkey import UnlockKey
from lab import postgres as lab_postgres
from lab.server import BOOT_ID, EscrowProcess, Node, make_escrow, make_replica

TITLE = "Unseal storm: unseal latency against concurrent agents"
STORES = ("sqlite", "postgresql", "postgresql-2")
# Open files besides the agents' sockets: Python, SoftHSM, SQLite, the enrolling connections.
SPARE_FILES = 1000


@dataclass(frozen=True)
class Storm:
    store: str  # one of STORES
    agents: int
    latencies: tuple[float, ...]  # seconds, of the agents that rebuilt the right key
    errors: dict[str, int]  # what went wrong for the others, by kind
    seconds: float  # from the start signal to the last agent done
    enroll_seconds: float
    server_cpu_seconds: float  # during the storm only
    generator_cpu_seconds: float
    server_peak_rss_mib: float  # of all replicas together
    listen_overflows: int  # connections the kernel dropped during the storm, accept queue full


def agent_counts(text: str) -> list[int]:
    """`10,100,1000` as an argparse type."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}"
                                         ) from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"agent counts must be at least 1: {text}")
    return counts


async def enroll_all(escrow: EscrowProcess, nodes: list[Node], key: UnlockKey) -> None:
    async with EscrowClient(escrow.url, escrow.ca, connections=16) as client:
        gate = asyncio.Semaphore(16)

        async def one(node: Node) -> None:
            async with gate:
                await client.enroll(node.cluster_id, node.node_id, node.cert_pem, node.cert.key,
                                    node.agent_key, node.hostname)

        await asyncio.gather(*(one(n) for n in nodes))
        await client.deposit(nodes[0].cluster_id, nodes[0].node_id, nodes[0].agent_key, key,
                             await client.deposit_key_sha256())


def _kind(error: Exception) -> str:
    if isinstance(error, EscrowRejected):
        return f"refused ({error.status} {error.reason})"
    return f"{type(error).__name__}: {error}"[:160]


async def storm(replicas: list[EscrowProcess], ca: Path, nodes: list[Node], key: UnlockKey
                ) -> tuple[list[float], Counter[str], float]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    # One connection per agent, as N agents on N machines would have; the long timeouts keep
    # slow answers in the latency figures instead of turning them into errors. With several
    # replicas, agent i prefers replica i mod n.
    urls = [r.url for r in replicas]
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(EscrowClient(
            urls[i:] + urls[:i], ca, connections=len(nodes), timeout=600, connect_timeout=600))
            for i in range(len(urls))]
        start = asyncio.Event()

        async def one(index: int, node: Node) -> None:
            client = clients[index % len(clients)]
            await start.wait()
            began = time.perf_counter()
            try:
                status, ephemeral = await client.unseal(node.cluster_id, node.node_id,
                                                        node.cert_pem, node.agent_key,
                                                        node.hostname, BOOT_ID)
                (_, rebuilt), = candidate_keys(status, ephemeral)
                if rebuilt != key:
                    raise ValueError("wrong key")
                latencies.append(time.perf_counter() - began)
            except Exception as error:  # counted and reported; the storm goes on
                errors[_kind(error)] += 1

        tasks = [asyncio.create_task(one(i, n)) for i, n in enumerate(nodes)]
        await asyncio.sleep(0.1)
        began = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        return latencies, errors, time.perf_counter() - began


def store_names(text: str) -> list[str]:
    """`sqlite,postgresql` as an argparse type."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or set(names) - set(STORES):
        raise argparse.ArgumentTypeError(f"stores are {' and '.join(STORES)}: {text}")
    return names


def measure(agents: int, store: str = "sqlite") -> Storm:
    """Enroll `agents` simulated managers with a fresh escrow on `store`, then unseal them all
    at once."""
    # Every agent holds a socket in this process and one in the server, which inherits the limit.
    allow_open_files(agents + SPARE_FILES)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="escrow-storm-")))
        init: list[str] = []
        # All the agents come from one address here, where a fleet comes from one each: the
        # connection caps are raised to let them all in at once.
        room = str(max(8192, agents + SPARE_FILES))
        env = {"ESCROW_REQUESTS_RATE_LIMIT": str(agents * 10),
               "ESCROW_SERVER_MAX_CONNECTIONS": room,
               "ESCROW_SERVER_MAX_CONNECTIONS_PER_SOURCE": room}
        if store.startswith("postgresql"):
            server = stack.enter_context(lab_postgres.running())
            url = server.url(stack.enter_context(server.database()))
            init = ["--store-url", url, "--store-password-file", str(server.password_file)]
        escrow = make_escrow(workdir / "a", *init, **env)
        replicas = [escrow]
        if store == "postgresql-2":
            replicas.append(make_replica(escrow, workdir / "b", url, server.password_file,
                                         **env))
        ca = workdir / "escrow-ca.pem"
        try:
            for replica in replicas:
                replica.start()
            ca.write_text("".join(r.ca.read_text() for r in replicas))
            pids = [r.process.pid for r in replicas if r.process is not None]
            cluster = escrow.cluster(2, "auto,auto", "--allow-no-paper-recovery")
            nodes = [cluster.node() for _ in range(agents)]
            key = UnlockKey(os.urandom(32))
            began = time.perf_counter()
            asyncio.run(enroll_all(escrow, nodes, key))
            enroll_seconds = time.perf_counter() - began
            server_cpu = sum(cpu_seconds(pid) for pid in pids)
            generator_cpu = time.process_time()
            overflows = listen_overflows()
            latencies, errors, seconds = asyncio.run(storm(replicas, ca, nodes, key))
            server_cpu = sum(cpu_seconds(pid) for pid in pids) - server_cpu
            generator_cpu = time.process_time() - generator_cpu
            overflows = listen_overflows() - overflows
            rss = sum(memory_mib(pid, "VmHWM") for pid in pids)
        finally:
            for replica in replicas:
                replica.stop()
    return Storm(store, agents, tuple(latencies), dict(errors), seconds, enroll_seconds,
                 server_cpu, generator_cpu, rss, overflows)


def _latency(storm: Storm, fraction: float) -> str:
    return f"{percentile(storm.latencies, fraction):.2f}" if storm.latencies else "-"


def table(storms: list[Storm]) -> str:
    lines = [
        "| store | agents | unsealed | errors | total s | unseals/s | p50 s | p99 s | max s "
        "| server CPU s | load generator CPU s | server peak RSS | accept queue overflows "
        "| enrolling s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {s.store} | {s.agents:,} | {len(s.latencies):,} | {sum(s.errors.values())} | "
          f"{s.seconds:.2f} | {len(s.latencies) / s.seconds:.0f} | {_latency(s, 0.5)} | "
          f"{_latency(s, 0.99)} | {_latency(s, 1.0)} | {s.server_cpu_seconds:.1f} | "
          f"{s.generator_cpu_seconds:.1f} | {s.server_peak_rss_mib:.0f} MiB | "
          f"{s.listen_overflows:,} | {s.enroll_seconds:.1f} |" for s in storms),
    ]
    lines += [f"\nErrors at {storm.agents:,} agents on {storm.store}: " + "; ".join(
        f"{count} of {kind}" for kind, count in sorted(storm.errors.items()))
        for storm in storms if storm.errors]
    return "\n".join(lines)


def document(storms: list[Storm], machine: Machine, command: str) -> str:
    return "\n".join([
        preamble(TITLE, machine, command),
        "One `escrow serve` (SoftHSM token, the store the first column names, auto policy t=2, "
        "one key version), started afresh for each row, with the agents enrolled beforehand; "
        "a PostgreSQL store is a server of its own on the same machine, reached over a unix "
        "socket, whose CPU the server column does not count; `postgresql-2` is two replicas of "
        "the escrow on that server, half of the agents preferring each (server CPU and peak "
        "RSS are the two replicas' together). Then every agent, at the same "
        "signal, opens its own TLS connection over loopback, fetches a nonce, sends its signed "
        "unseal request, opens the two released shares (HPKE) and rebuilds the key (SLIP-39). "
        "Latency is that whole round trip, per agent. The simulated agents all run in one "
        "asyncio process on the same machine as the escrow, so the work that N real agents "
        "would do on N machines (TLS, ECDSA signing, HPKE, SLIP-39) competes with the server "
        "for the same cores: the CPU columns show how the time was shared. Accept queue "
        "overflows is the kernel's ListenOverflows counter over the storm: handshake packets "
        "dropped because the server's accept queue was full, each costing its connection a "
        "retransmission 1 s later (then 2 s, 4 s...); it counts the whole network namespace, in "
        "which nothing else listens meanwhile.",
        "",
        table(storms),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=agent_counts, default=[1000],
                        help="comma-separated counts of concurrent agents, one storm each")
    parser.add_argument("--stores", type=store_names, default=["sqlite"],
                        help="comma-separated: sqlite, postgresql, postgresql-2 (two replicas); "
                             "each count on each store")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = document([measure(count, store) for count in args.agents for store in args.stores],
                    this_machine(), invocation("bench.unseal_storm"))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
