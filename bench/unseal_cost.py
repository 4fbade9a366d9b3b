"""Unseal cost: the escrow's CPU per step of an unseal, one request at a time, so each figure is
one step's alone (the storm, bench/unseal_storm.py, measures them all together, concurrent).

Run from the repository root:  .venv/bin/python -m bench.unseal_cost --requests 1000

One `escrow serve` (SQLite, SoftHSM, auto policy t=2) in a temporary directory, removed at the
end, with `--requests` agents enrolled. One client then makes, in turn, `--requests` of each
of: a nonce on a kept-alive TLS connection; a nonce on a new TLS connection each; a whole
unseal (nonce, then the signed request that the policy answers with two shares) on a
kept-alive connection; and a whole unseal on a new connection each, which is what every agent
of a storm does. The server's CPU (user and system, all threads) over each run, divided by the
requests, is the figure. Prints a Markdown table; --out FILE also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from agent.client import EscrowClient
from bench.machine import Machine, invocation, preamble, this_machine
from bench.proc import cpu_seconds
from bench.unseal_storm import enroll_all
from escrow.core.unlockkey import UnlockKey
from lab.server import BOOT_ID, EscrowProcess, Node, make_escrow

TITLE = "Unseal cost: the escrow's CPU per step of an unseal"


@dataclass(frozen=True)
class Step:
    name: str
    requests: int
    server_cpu_seconds: float

    @property
    def per_request_ms(self) -> float:
        return 1000 * self.server_cpu_seconds / self.requests


def _client(escrow: EscrowProcess) -> EscrowClient:
    return EscrowClient(escrow.url, escrow.ca, connections=1, keepalive=600)


async def _nonce(client: EscrowClient, node: Node) -> None:
    await client.nonce()


async def _unseal(client: EscrowClient, node: Node) -> None:
    status, _ = await client.unseal(node.cluster_id, node.node_id, node.cert_pem,
                                    node.agent_key, node.hostname, BOOT_ID)
    if len(status.releases) != 2:
        raise RuntimeError(f"an unseal got {len(status.releases)} shares, not 2")


async def _kept_alive(escrow: EscrowProcess, nodes: list[Node],
                      step: Callable[[EscrowClient, Node], Awaitable[None]]) -> None:
    async with _client(escrow) as client:
        for node in nodes:
            await step(client, node)


async def _fresh(escrow: EscrowProcess, nodes: list[Node],
                 step: Callable[[EscrowClient, Node], Awaitable[None]]) -> None:
    for node in nodes:
        async with _client(escrow) as client:
            await step(client, node)


def measure(requests: int) -> list[Step]:
    with tempfile.TemporaryDirectory(prefix="escrow-cost-") as workdir:
        # Every node unseals twice (kept alive, then fresh): well within its limits.
        escrow = make_escrow(Path(workdir) / "a", ESCROW_REQUESTS_RATE_LIMIT="10")
        escrow.start()
        try:
            assert escrow.process is not None
            pid = escrow.process.pid
            cluster = escrow.cluster(2, "auto,auto", "--allow-no-paper-recovery")
            nodes = [cluster.node() for _ in range(requests)]
            asyncio.run(enroll_all(escrow, nodes, UnlockKey(os.urandom(32))))
            steps = []
            for name, run, step in (
                    ("nonce, kept-alive connection", _kept_alive, _nonce),
                    ("nonce, new TLS connection", _fresh, _nonce),
                    ("unseal (nonce + request), kept-alive connection", _kept_alive, _unseal),
                    ("unseal (nonce + request), new TLS connection", _fresh, _unseal)):
                before = cpu_seconds(pid)
                asyncio.run(run(escrow, nodes, step))
                steps.append(Step(name, requests, cpu_seconds(pid) - before))
            return steps
        finally:
            escrow.stop()


def table(steps: list[Step]) -> str:
    return "\n".join([
        "| step | requests | server CPU s | server CPU per request, ms |",
        "| --- | --- | --- | --- |",
        *(f"| {s.name} | {s.requests:,} | {s.server_cpu_seconds:.2f} | "
          f"{s.per_request_ms:.3f} |" for s in steps),
    ])


def document(steps: list[Step], machine: Machine, command: str) -> str:
    by_name = {s.name: s.per_request_ms for s in steps}
    connection = (by_name["nonce, new TLS connection"]
                  - by_name["nonce, kept-alive connection"])
    request = (by_name["unseal (nonce + request), kept-alive connection"]
               - by_name["nonce, kept-alive connection"])
    return "\n".join([
        preamble(TITLE, machine, command),
        __doc__.split("\n\n", 2)[2].replace("\n", " ").strip(),
        "",
        table(steps),
        "",
        f"A new TLS connection (accept, handshake, close) costs the escrow {connection:.3f} ms "
        f"more than a nonce on an open one; the signed unseal request itself, "
        f"{request:.3f} ms (checking the node, recording the request and its release, "
        "unwrapping and encrypting two shares).",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000,
                        help="requests of each step (and agents enrolled)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    text = document(measure(args.requests), this_machine(), invocation("bench.unseal_cost"))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
