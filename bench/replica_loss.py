"""Replica loss: the time an agent loses when the escrow replica it is talking to dies in the
middle of its request (goal: at most 2 s).

Run from the repository root:  .venv/bin/python -m bench.replica_loss --agents 100 --runs 5

Two replicas of one escrow on a PostgreSQL server of their own (README, "Run several
replicas"), in a temporary directory removed at the end. Each run is a pair of storms with the
same schedule (lab/replica_storm.py: every agent unseals as its agent would, half preferring
each replica, starting over 2 s, retrying after the agent's first back-off): one undisturbed,
one with the first replica SIGKILLed 1 s in (and started again afterwards). For every agent
that was mid-request at the killed replica, the time lost is its unseal time in the storm with
the kill minus its unseal time in the storm without, side by side. Prints a Markdown table;
--out FILE also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.machine import Machine, invocation, preamble, this_machine
from bench.stats import percentile
from lab import postgres as lab_postgres
from lab import replica_storm
from lab.server import EscrowProcess, Node, make_escrow, make_replica

TITLE = "Replica loss: what an agent loses when its escrow replica dies mid-request"
GOAL_SECONDS = 2.0


@dataclass(frozen=True)
class Pair:
    cut: int  # agents mid-request at the killed replica
    refused: int  # agents that met a refusal in the storm with the kill
    lost: tuple[float, ...]  # seconds, per cut agent
    baseline_p50: float  # the cut agents' unseal time without the kill


def measure(agents: int, runs: int) -> list[Pair]:
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="escrow-loss-")))
        server = stack.enter_context(lab_postgres.running())
        url = server.url(stack.enter_context(server.database()))
        env = {"ESCROW_REQUESTS_RATE_LIMIT": str(agents * runs * 10)}
        first = make_escrow(workdir / "a", "--store-url", url, "--store-password-file",
                            str(server.password_file), **env)
        second = make_replica(first, workdir / "b", url, server.password_file, **env)
        replicas = [first, second]
        for replica in replicas:
            replica.start()
            stack.callback(replica.stop)
        crowd = replica_storm.fleet(replicas, agents, workdir)
        return [_pair(replicas, crowd.ca, crowd.nodes) for _ in range(runs)]


def _pair(replicas: list[EscrowProcess], ca: Path, nodes: list[Node]) -> Pair:
    first = replicas[0]

    def kill() -> None:
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)

    baseline = asyncio.run(replica_storm.run(nodes, replicas, ca, lambda: None))
    killed = asyncio.run(replica_storm.run(nodes, replicas, ca, kill))
    first.stop()
    first.start()
    cut = sorted(i for i in killed.in_flight if i % 2 == 0)  # even agents prefer the first
    return Pair(len(cut), len(killed.met),
                tuple(killed.seconds[i] - baseline.seconds[i] for i in cut),
                percentile([baseline.seconds[i] for i in cut], 0.5) if cut else 0.0)


def table(pairs: list[Pair]) -> str:
    lines = [
        "| run | agents mid-request at the killed replica | of all agents, refused at least "
        "once | their unseal time without the kill, p50 s | time lost p50 s | time lost max s |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {n} | {p.cut} | {p.refused} | {p.baseline_p50:.2f} | "
          f"{percentile(p.lost, 0.5):.2f} | {max(p.lost):.2f} |" if p.lost else
          f"| {n} | 0 | {p.refused} | - | - | - |" for n, p in enumerate(pairs, 1)),
    ]
    worst = max((max(p.lost) for p in pairs if p.lost), default=0.0)
    lines.append(f"\nWorst time lost over all runs: {worst:.2f} s (goal: at most "
                 f"{GOAL_SECONDS:g} s).")
    return "\n".join(lines)


def document(pairs: list[Pair], agents: int, machine: Machine, command: str) -> str:
    return "\n".join([
        preamble(TITLE, machine, command),
        f"Two `escrow serve` replicas on one PostgreSQL server (unix socket), {agents} "
        "simulated agents in one asyncio process on the same 2 cores, each listing both "
        "replicas (half of them the first one first). Every run is two storms with the same "
        "schedule, without and with a SIGKILL of the first replica 1 s in; time lost is, per "
        "agent that was mid-request at the killed replica, its unseal time with the kill "
        "minus without. Negative values are the load's noise: the storm with the kill has one "
        "replica fewer to share the cores with.",
        "",
        table(pairs),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = document(measure(args.agents, args.runs), args.agents, this_machine(),
                    invocation("bench.replica_loss"))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
