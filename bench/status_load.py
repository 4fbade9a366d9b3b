"""Status load: what the status page costs the escrow, alone and while a storm of unseals runs.

Run from the repository root:  .venv/bin/python -m bench.status_load --agents 1000 --viewers 4

One `escrow serve` (SQLite, SoftHSM, auto policy t=2) in a temporary directory, removed at the
end, with `--agents` managers enrolled (so the page lists them all). `--viewers` clients, each
signed in with a viewer token, then fetch the page's redraw (`/status/panel`, what every open
page asks for every 5 s) back to back: first alone for `--seconds`, then while every agent
unseals at once, next to the same storm with no viewer (side by side, in one run). Prints a
Markdown table; --out FILE also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.machine import Machine, invocation, preamble, this_machine
from bench.proc import cpu_seconds
from bench.stats import percentile
from bench.unseal_storm import enroll_all, storm
from escrow.core.unlockkey import UnlockKey
from lab.server import EscrowProcess, Node, make_escrow

TITLE = "Status load: the status page alone and during an unseal storm"


@dataclass(frozen=True)
class Run:
    name: str
    pages: int
    seconds: float
    page_latencies: tuple[float, ...]
    unseal_latencies: tuple[float, ...]  # empty without a storm
    unseal_errors: int
    server_cpu_seconds: float

    @property
    def pages_per_second(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0


async def _view(escrow: EscrowProcess, token: str, stop: asyncio.Event,
                latencies: list[float]) -> None:
    context = ssl.create_default_context(cafile=str(escrow.ca))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=1),
                                     cookies={"escrow_viewer": token}) as session:
        while not stop.is_set():
            began = time.perf_counter()
            async with session.get(escrow.url + "/status/panel") as answer:
                await answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"/status/panel answered {answer.status}")
            latencies.append(time.perf_counter() - began)


async def _viewers(escrow: EscrowProcess, token: str, count: int, stop: asyncio.Event
                   ) -> list[float]:
    latencies: list[float] = []
    await asyncio.gather(*(_view(escrow, token, stop, latencies) for _ in range(count)))
    return latencies


async def _alone(escrow: EscrowProcess, token: str, viewers: int, seconds: float
                 ) -> list[float]:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return await _viewers(escrow, token, viewers, stop)


async def _during_storm(escrow: EscrowProcess, token: str, viewers: int,
                        nodes: list[Node], key: UnlockKey
                        ) -> tuple[list[float], list[float], int, float]:
    stop = asyncio.Event()
    watching = asyncio.ensure_future(_viewers(escrow, token, viewers, stop))
    latencies, errors, seconds = await storm([escrow], escrow.ca, nodes, key)
    stop.set()
    return await watching, latencies, sum(errors.values()), seconds


def measure(agents: int, viewers: int, seconds: float) -> list[Run]:
    with tempfile.TemporaryDirectory(prefix="escrow-status-") as workdir:
        room = str(max(8192, agents + 1000))
        escrow = make_escrow(Path(workdir) / "a", ESCROW_REQUESTS_RATE_LIMIT="20",
                             ESCROW_SERVER_MAX_CONNECTIONS=room,
                             ESCROW_SERVER_MAX_CONNECTIONS_PER_SOURCE=room)
        escrow.start()
        try:
            assert escrow.process is not None
            pid = escrow.process.pid
            cluster = escrow.cluster(2, "auto,auto", "--allow-no-paper-recovery")
            nodes = [cluster.node() for _ in range(agents)]
            key = UnlockKey(os.urandom(32))
            asyncio.run(enroll_all(escrow, nodes, key))
            token = escrow.viewer("bench")
            runs = []

            before = cpu_seconds(pid)
            pages = asyncio.run(_alone(escrow, token, viewers, seconds))
            runs.append(Run(f"{viewers} viewers, no storm", len(pages), seconds,
                            tuple(pages), (), 0, cpu_seconds(pid) - before))

            before = cpu_seconds(pid)
            unseals, errors, took = asyncio.run(storm([escrow], escrow.ca, nodes, key))
            runs.append(Run(f"storm of {agents:,}, no viewer", 0, took, (), tuple(unseals),
                            sum(errors.values()), cpu_seconds(pid) - before))

            before = cpu_seconds(pid)
            pages, unseals, failed, took = asyncio.run(
                _during_storm(escrow, token, viewers, nodes, key))
            runs.append(Run(f"storm of {agents:,} with {viewers} viewers", len(pages), took,
                            tuple(pages), tuple(unseals), failed, cpu_seconds(pid) - before))
            return runs
        finally:
            escrow.stop()


def _p(values: tuple[float, ...], fraction: float) -> str:
    return f"{percentile(values, fraction):.3f}" if values else "-"


def table(runs: list[Run]) -> str:
    return "\n".join([
        "| run | pages | pages/s | page p50 s | page p99 s | unseals | unseal errors "
        "| unseal p50 s | unseal p99 s | seconds | server CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {r.name} | {r.pages:,} | {r.pages_per_second:.1f} | {_p(r.page_latencies, 0.5)} "
          f"| {_p(r.page_latencies, 0.99)} | {len(r.unseal_latencies):,} | {r.unseal_errors} "
          f"| {_p(r.unseal_latencies, 0.5)} | {_p(r.unseal_latencies, 0.99)} "
          f"| {r.seconds:.1f} | {r.server_cpu_seconds:.1f} |" for r in runs),
    ])


def document(runs: list[Run], machine: Machine, command: str) -> str:
    return "\n".join([preamble(TITLE, machine, command),
                      __doc__.split("\n\n", 2)[2].replace("\n", " ").strip(), "",
                      table(runs), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000,
                        help="managers enrolled (listed on the page), and unsealing in storms")
    parser.add_argument("--viewers", type=int, default=4,
                        help="clients fetching the page back to back")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="how long the viewers run alone")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if min(args.agents, args.viewers) < 1 or args.seconds <= 0:
        parser.error("--agents and --viewers must be at least 1, --seconds above 0")
    text = document(measure(args.agents, args.viewers, args.seconds), this_machine(),
                    invocation("bench.status_load"))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
