"""Heartbeat load: what a fleet's heartbeats cost one escrow, and whether an unseal waits for
them. N simulated enrolled agents beat over TLS as `unseal-agent run` does (nonce, the
escrow's deposit key checked against the pin, signed beat), every `--interval` seconds with
the agent's own jitter; meanwhile one probe agent unseals again and again. The same probe runs
first against the same escrow with no beats: the side-by-side baseline.

Run from the repository root:

    .venv/bin/python -m bench.heartbeat_load --agents 1000 --interval 6 --seconds 30

1,000 agents every 6 s offer the escrow what 5,000 managers at the default heartbeat_seconds
(30) do: about 167 beats a second. The escrow (SoftHSM, SQLite) is started afresh in a
temporary directory that is removed at the end. Prints a Markdown table; --out FILE also
writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from agent.client import EscrowClient
from agent.heartbeat import beat_request, pause
from agent.release import candidate_keys
from agent.swarm_identity import NodeIdentity
from bench.machine import Machine, invocation, preamble, this_machine
from bench.proc import allow_open_files, cpu_seconds, memory_mib
from bench.stats import percentile
from bench.unseal_storm import SPARE_FILES, enroll_all
from escrow import config
from escrow.core.states import LockState
from escrow.core.unlockkey import UnlockKey
from lab.server import BOOT_ID, EscrowProcess, Node, make_escrow

TITLE = "Heartbeat load: a fleet's heartbeats against one escrow, and an unseal meanwhile"


@dataclass(frozen=True)
class Phase:
    name: str
    beats: tuple[float, ...]  # seconds per delivered heartbeat (three requests each)
    beat_errors: dict[str, int]
    unseals: tuple[float, ...]  # seconds per unseal of the probe agent
    seconds: float
    server_cpu_seconds: float
    server_rss_mib: float
    database_growth_kib: float
    audit_records: int  # added during the phase


def _kind(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"[:160]


async def beating(escrow: EscrowProcess, nodes: list[Node], interval: float, pinned: str,
                  until: float, beats: list[float], errors: Counter[str]) -> None:
    # One connection per agent, as N managers would hold.
    async with EscrowClient(escrow.url, escrow.ca, connections=len(nodes), timeout=60,
                            keepalive=interval * 3) as client:
        async def one(node: Node) -> None:
            identity = NodeIdentity(node.node_id, node.cluster_id, "swarm-manager",
                                    node.cert_pem, "")
            started = time.monotonic()
            # Agents come up at different times: the first beats are spread over an interval.
            await asyncio.sleep(random.uniform(0, interval))  # noqa: S311
            while time.monotonic() < until:
                due = time.monotonic() + pause(interval, random.random())  # noqa: S311
                began = time.perf_counter()
                try:
                    await client.heartbeat(lambda nonce: beat_request(
                        identity, LockState.UNLOCKED, nonce, boot=BOOT_ID,
                        uptime=time.monotonic() - started, interval=interval, goodbye=False,
                        agent_key=node.agent_key), pinned)
                    beats.append(time.perf_counter() - began)
                except Exception as error:  # counted and reported; the load goes on
                    errors[_kind(error)] += 1
                await asyncio.sleep(max(0.0, due - time.monotonic()))

        await asyncio.gather(*(one(node) for node in nodes))


async def probing(escrow: EscrowProcess, node: Node, key: UnlockKey, until: float,
                  unseals: list[float]) -> None:
    async with EscrowClient(escrow.url, escrow.ca) as client:
        while time.monotonic() < until:
            began = time.perf_counter()
            status, ephemeral = await client.unseal(node.cluster_id, node.node_id,
                                                    node.cert_pem, node.agent_key,
                                                    node.hostname, BOOT_ID)
            (_, rebuilt), = candidate_keys(status, ephemeral)
            if rebuilt != key:
                raise RuntimeError("the probe rebuilt the wrong key")
            unseals.append(time.perf_counter() - began)
            await asyncio.sleep(0.5)


def phase(name: str, escrow: EscrowProcess, beaters: list[Node], probe: Node, key: UnlockKey,
          interval: float, pinned: str, seconds: float) -> Phase:
    assert escrow.process is not None
    pid = escrow.process.pid
    database = escrow.data_dir / config.DB_NAME
    size = database.stat().st_size + _wal(database)
    audit = _audit_count(escrow)
    beats: list[float] = []
    errors: Counter[str] = Counter()
    unseals: list[float] = []
    cpu = cpu_seconds(pid)
    began = time.perf_counter()

    async def run() -> None:
        until = time.monotonic() + seconds
        work = [probing(escrow, probe, key, until, unseals)]
        if beaters:
            work.append(beating(escrow, beaters, interval, pinned, until, beats, errors))
        await asyncio.gather(*work)

    asyncio.run(run())
    return Phase(name, tuple(beats), dict(errors), tuple(unseals), time.perf_counter() - began,
                 cpu_seconds(pid) - cpu, memory_mib(pid, "VmRSS"),
                 (database.stat().st_size + _wal(database) - size) / 1024,
                 _audit_count(escrow) - audit)


def _wal(database: Path) -> int:
    wal = database.with_name(database.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def _audit_count(escrow: EscrowProcess) -> int:
    """The newest audit record's sequence number: records added is its difference."""
    newest = json.loads(escrow.cli("audit", "show", "--json", "--limit", "1").stdout)
    return int(newest[0]["seq"]) if newest else 0


def measure(agents: int, interval: float, seconds: float) -> list[Phase]:
    allow_open_files(agents + SPARE_FILES)
    with tempfile.TemporaryDirectory(prefix="escrow-heartbeats-") as workdir:
        # The probe unseals every half second: the per-node request limit must not stop it.
        escrow = make_escrow(Path(workdir), ESCROW_REQUESTS_RATE_LIMIT="100000")
        escrow.start()
        try:
            cluster = escrow.cluster(2, "auto,auto", "--allow-no-paper-recovery")
            nodes = [cluster.node() for _ in range(agents + 1)]
            key = UnlockKey(os.urandom(32))
            asyncio.run(enroll_all(escrow, nodes, key))

            async def pin() -> str:
                async with EscrowClient(escrow.url, escrow.ca) as client:
                    return await client.deposit_key_sha256()
            pinned = asyncio.run(pin())
            probe, beaters = nodes[0], nodes[1:]
            return [phase("no heartbeats (baseline)", escrow, [], probe, key, interval, pinned,
                          seconds),
                    phase(f"{agents:,} agents beating every {interval:g} s", escrow, beaters,
                          probe, key, interval, pinned, seconds)]
        finally:
            escrow.stop()


def _ms(values: tuple[float, ...], fraction: float) -> str:
    return f"{percentile(values, fraction) * 1000:.0f}" if values else "-"


def table(phases: list[Phase]) -> str:
    lines = ["| phase | beats delivered | beats/s | beat errors | beat p50 ms | beat p99 ms "
             "| probe unseals | unseal p50 ms | unseal p99 ms | server CPU share "
             "| server CPU ms per beat (above the baseline) | server RSS | database growth "
             "| audit records |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- |"]
    # The probe's unseals cost the same in every phase: the baseline phase's CPU rate is
    # taken off before dividing by the beats.
    base_rate = phases[0].server_cpu_seconds / phases[0].seconds
    for p in phases:
        above = p.server_cpu_seconds - base_rate * p.seconds
        per_beat = f"{above * 1000 / len(p.beats):.2f}" if p.beats else "-"
        lines.append(
            f"| {p.name} | {len(p.beats):,} | {len(p.beats) / p.seconds:.0f} | "
            f"{sum(p.beat_errors.values())} | {_ms(p.beats, 0.5)} | {_ms(p.beats, 0.99)} | "
            f"{len(p.unseals)} | {_ms(p.unseals, 0.5)} | {_ms(p.unseals, 0.99)} | "
            f"{100 * p.server_cpu_seconds / p.seconds:.0f} % | {per_beat} | "
            f"{p.server_rss_mib:.0f} MiB | {p.database_growth_kib:,.0f} KiB | "
            f"{p.audit_records:,} |")
    lines += [f"\nBeat errors ({p.name}): " + "; ".join(
        f"{count} of {kind}" for kind, count in sorted(p.beat_errors.items()))
        for p in phases if p.beat_errors]
    return "\n".join(lines)


def document(phases: list[Phase], seconds: float, machine: Machine, command: str) -> str:
    return "\n".join([
        preamble(TITLE, machine, command),
        "One `escrow serve` (SoftHSM token, SQLite, auto policy t=2), its agents enrolled "
        f"beforehand; each phase lasts {seconds:g} s. A beat is what `unseal-agent run` "
        "sends: `GET /v1/info` (the deposit key, checked against the agent's pin), "
        "`POST /v1/nonce`, `POST /v1/heartbeat` signed over the nonce, each agent on a TLS "
        "connection of its own kept open between beats; its time is those three requests. "
        "The probe agent meanwhile sends an unseal request every half second and rebuilds "
        "the key from the released shares. The simulated agents and the probe run in one "
        "asyncio process on the same 2 cores as the escrow, so their signing and TLS compete "
        "with the server: the server's own CPU is reported apart. The database grows by the "
        "write-ahead log (the heartbeat rows are updated in place); audit records come only "
        "from state changes (each agent's first beat) and the probe's requests.",
        "",
        table(phases),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=6.0,
                        help="seconds between one agent's beats (the agents' heartbeat_seconds)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = document(measure(args.agents, args.interval, args.seconds), args.seconds,
                    this_machine(), invocation("bench.heartbeat_load"))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
