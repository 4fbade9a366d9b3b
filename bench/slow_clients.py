"""Slow clients: /healthz latency from a good client while 1,000 slow connections are held
open against one `escrow serve`.

Run from the repository root, with the last commit as the baseline:

    git worktree add /tmp/bench-before HEAD
    .venv/bin/python -m bench.slow_clients --baseline /tmp/bench-before
    git worktree remove --force /tmp/bench-before

Each slow connection comes from 127.0.0.2, completes its TLS handshake, sends the start of a
request (`GET /healthz HTTP/1.1`, a header line that never ends) and then one more header byte
every --interval seconds, never finishing; one the server cuts is opened again at once, so
--slow of them stay open as far as the server lets them. Meanwhile the good client, from
127.0.0.1, opens a fresh TLS connection for each `GET /healthz`, one after the other for
--seconds, each given --timeout seconds. The slow connections run in a process of their own.

The --baseline checkout (if given) and then --checkout (default: this one) each serve from a
fresh data directory (SoftHSM token) in a temporary directory removed at the end, with their
own code: `python -m escrow` (DIR/.venv/bin/python if there is one, else this Python) with cwd
and PYTHONPATH set to the checkout, checked to import the escrow from there; the clients are
this file's. The server starts with a soft open-files limit of --server-open-files (1,000, so
that 1,000 slow connections are enough to take every file of a server that keeps it, as 1,012
did with 1,024 in the report); what it does with the limit is up to its code. Prints a
Markdown table; --out FILE also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import resource
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.checkout import REPO, Checkout, Server, checkout
from bench.machine import Machine, invocation, preamble, this_machine
from bench.proc import allow_open_files
from bench.stats import percentile

TITLE = "Slow clients: /healthz latency while slow connections are held open"
GOOD_SOURCE, SLOW_SOURCE = "127.0.0.1", "127.0.0.2"
REQUEST_START = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: "


class SlowClients:
    """``count`` connections from ``source``, each TLS-connected and sending the start of a
    request, then one header byte every ``interval`` s, never finishing; one the server closes
    is opened again at once. Runs on an event loop in a thread of its own (start, stop)."""

    def __init__(self, port: int, ca: Path, count: int, interval: float,
                 source: str = SLOW_SOURCE, host: str = "127.0.0.1", ramp: int = 64) -> None:
        self.port, self.ca, self.count, self.interval = port, ca, count, interval
        self.source, self.host, self.ramp = source, host, ramp
        self.open = 0  # connected (TLS done) right now
        self.opened = 0  # connections that completed their handshake, in all
        self.cut = 0  # of which the server closed
        self.failed = 0  # attempts that never got connected (refused, reset, timed out)
        self._longest = 0.0  # seconds, the longest a closed one lived
        self._since: dict[int, float] = {}  # when each open one connected
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def longest(self) -> float:
        """Seconds the longest-lived slow connection lived, or has lived so far if open."""
        oldest = min(tuple(self._since.values()), default=None)  # a copy, made in one go
        now = time.monotonic()
        return max(self._longest, 0.0 if oldest is None else now - oldest)

    def start(self) -> None:
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),),
                                        name="slow-clients", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(60)

    def wait_open(self, count: int, seconds: float) -> bool:
        """Wait until at least ``count`` are open at once; False if not within ``seconds``."""
        deadline = time.monotonic() + seconds
        while self.open < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def __enter__(self) -> SlowClients:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        context = ssl.create_default_context(cafile=str(self.ca))
        gate = asyncio.Semaphore(self.ramp)  # so the accept queue is not flooded at once
        tasks = [asyncio.create_task(self._slot(context, gate)) for _ in range(self.count)]
        self._ready.set()
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _slot(self, context: ssl.SSLContext, gate: asyncio.Semaphore) -> None:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation.
        while True:
            try:
                async with gate, asyncio.timeout(10):
                    reader, writer = await asyncio.open_connection(
                        self.host, self.port, ssl=context, server_hostname="localhost",
                        local_addr=(self.source, 0))
            except (OSError, TimeoutError):
                self.failed += 1
                await asyncio.sleep(min(self.interval, 0.5))
                continue
            began = time.monotonic()
            self._since[id(writer)] = began
            self.open += 1
            self.opened += 1
            try:
                writer.write(REQUEST_START)
                while True:
                    try:
                        async with asyncio.timeout(self.interval):
                            if not await reader.read(4096):
                                break  # closed by the server
                    except TimeoutError:
                        writer.write(b"a")
                        await writer.drain()
            except OSError:  # reset by the server
                pass
            finally:
                self.open -= 1
                self._longest = max(self._longest, time.monotonic() - began)
                del self._since[id(writer)]
                writer.transport.abort()
            self.cut += 1


def _hold(port: int, ca: str, count: int, interval: float, status: Any, stop: Any) -> None:
    """The slow connections, in a process of their own; ``status`` (a shared char array)
    mirrors their counters (see _pack) until ``stop`` (a shared flag) is set."""
    with SlowClients(port, Path(ca), count, interval) as clients:
        while not stop.value:
            status.value = _pack(clients)
            time.sleep(0.1)
        status.value = _pack(clients)


def _pack(clients: SlowClients) -> bytes:
    """open, opened, cut, failed, longest."""
    return (f"{clients.open} {clients.opened} {clients.cut} {clients.failed} "
            f"{clients.longest:.3f}").encode()


# -- the server under test ----------------------------------------------------------------------


@contextlib.contextmanager
def soft_open_files(limit: int) -> Iterator[None]:
    """This process's soft open-files limit set to ``limit`` (0: unchanged) while inside, so
    that a child started meanwhile inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if not limit:
        yield
        return
    if hard != resource.RLIM_INFINITY and limit > hard:
        raise RuntimeError(f"an open-files limit of {limit} is above the hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def serve(owner: Checkout, workdir: Path, open_files: int) -> Iterator[Server]:
    """`escrow init` and `escrow serve` of ``owner`` on loopback, started with a soft
    open-files limit of ``open_files``; stopped on the way out."""
    server = Server(owner, workdir)
    server.init()
    try:
        with soft_open_files(open_files):  # inherited by `escrow serve`
            server.start()
        yield server
    finally:
        server.stop()


async def probe(port: int, context: ssl.SSLContext, timeout: float) -> float | None:
    """Seconds one `GET /healthz` took on a fresh TLS connection, or None if it did not answer
    200 within ``timeout``."""
    began = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                GOOD_SOURCE, port, ssl=context, server_hostname="localhost",
                local_addr=(GOOD_SOURCE, 0))
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            status = await reader.readline()
            await reader.read()  # the rest, to the server's close
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.transport.abort()
    return time.perf_counter() - began if status.startswith(b"HTTP/1.1 200") else None


def probes(port: int, ca: Path, seconds: float, timeout: float) -> list[float]:
    """Probe after probe for ``seconds``; a probe that failed counts as infinitely slow."""
    context = ssl.create_default_context(cafile=str(ca))
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        latency = asyncio.run(probe(port, context, timeout))
        latencies.append(float("inf") if latency is None else latency)
        time.sleep(0.05)
    return latencies


# -- the measurement --------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    checkout: str  # its role and revision
    server_open_files: int
    slow: int  # slow connections asked for
    held: int  # of which open when probing began
    latencies: tuple[float, ...]  # seconds; inf for a probe that got no answer in time
    cut: int  # slow connections the server closed while probing
    failed: int  # slow connection attempts that never got connected
    longest: float  # seconds the longest-lived slow connection lived (or had, if still open)
    timeout: float


def run_one(owner: Checkout, slow: int = 1000, interval: float = 5.0, seconds: float = 30.0,
            timeout: float = 5.0, server_open_files: int = 1000) -> list[Run]:
    """Two runs against one fresh `escrow serve` of ``owner``: the good client alone, then
    with ``slow`` slow connections held open."""
    allow_open_files(slow + 1000)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="escrow-slow-") as workdir, \
            serve(owner, Path(workdir), server_open_files) as served:
        alone = probes(served.port, served.ca, min(seconds, 10.0), timeout)
        runs.append(Run(owner.label, server_open_files, 0, 0, tuple(alone), 0, 0, 0.0, timeout))
        spawn = multiprocessing.get_context("spawn")
        status: Any = spawn.Array("c", 128)  # a char array: .value is its bytes
        stop = spawn.Value("b", 0)
        holder = spawn.Process(target=_hold, args=(served.port, str(served.ca), slow, interval,
                                                   status, stop), daemon=True)
        holder.start()
        try:
            # Up to a minute to connect them all (fewer if the server runs out of files).
            deadline = time.monotonic() + 60
            while _unpack(status.value)[0] < slow and time.monotonic() < deadline:
                time.sleep(0.2)
            before = _unpack(status.value)
            latencies = probes(served.port, served.ca, seconds, timeout)
            after = _unpack(status.value)
        finally:
            stop.value = 1
            holder.join(60)
            if holder.is_alive():
                holder.kill()
        runs.append(Run(owner.label, server_open_files, slow, before[0], tuple(latencies),
                        after[2] - before[2], after[3], after[4], timeout))
    return runs


def measure(current: Path = REPO, baseline: Path | None = None, *, slow: int = 1000,
            interval: float = 5.0, seconds: float = 30.0, timeout: float = 5.0,
            server_open_files: int = 1000) -> list[Run]:
    """The baseline checkout's runs (if given), then the current one's."""
    owners = ([checkout("baseline", baseline)] if baseline is not None else [])
    owners.append(checkout("current", current))
    return [run for owner in owners
            for run in run_one(owner, slow, interval, seconds, timeout, server_open_files)]


def _unpack(value: bytes) -> tuple[int, int, int, int, float]:
    fields = value.split() if value else []
    if len(fields) != 5:
        return 0, 0, 0, 0, 0.0
    return int(fields[0]), int(fields[1]), int(fields[2]), int(fields[3]), float(fields[4])


def _ms(run: Run, fraction: float) -> str:
    value = percentile(run.latencies, fraction) if run.latencies else float("nan")
    if value == float("inf"):
        return f"> {run.timeout * 1000:.0f} (no answer)"
    return f"{value * 1000:.1f}"


def table(runs: list[Run]) -> str:
    return "\n".join([
        "| escrow | server open files | slow connections | open when probing began "
        "| probes | answered | /healthz p50 ms | /healthz p95 ms | slow ones cut while probing "
        "| longest-lived slow one s | slow attempts that failed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {r.checkout} | {r.server_open_files or 'inherited'} | {r.slow:,} | {r.held:,} | "
          f"{len(r.latencies)} | {sum(1 for x in r.latencies if x != float('inf'))} | "
          f"{_ms(r, 0.5)} | {_ms(r, 0.95)} | {r.cut:,} | {r.longest:.1f} | {r.failed:,} |"
          for r in runs),
    ])


def document(runs: list[Run], machine: Machine, command: str) -> str:
    return "\n".join([
        preamble(TITLE, machine, command),
        "One `escrow serve` per checkout (its own code; SoftHSM token, SQLite, default "
        "settings), started with the soft open-files limit shown (what it does with it is up "
        "to its code). The good client opens a fresh TLS connection over loopback from "
        "127.0.0.1 for each `GET /healthz`, one after another; a probe without a 200 within "
        "its timeout counts as slower than any other. The first row of each checkout is the "
        "good client alone; in the second, the slow connections (from 127.0.0.2: TLS done, "
        "one header byte every few seconds, never a whole request; one that is closed is "
        "opened again at once) were opened first and kept open while probing, by a process of "
        "their own on the same machine.",
        "",
        table(runs),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path,
                        help="a checkout to measure first, e.g. the last commit from "
                             "`git worktree add` (default: none)")
    parser.add_argument("--checkout", type=Path, default=REPO,
                        help="the checkout to measure as current (default: this one)")
    parser.add_argument("--slow", type=int, default=1000, help="slow connections to hold")
    parser.add_argument("--interval", type=float, default=5.0,
                        help="seconds between a slow connection's header bytes")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of probing")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per probe")
    parser.add_argument("--server-open-files", type=int, default=1000,
                        help="the server's soft open-files limit at start (0: this process's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    runs = measure(args.checkout, args.baseline, slow=args.slow, interval=args.interval,
                   seconds=args.seconds, timeout=args.timeout,
                   server_open_files=args.server_open_files)
    text = document(runs, this_machine(), invocation("bench.slow_clients"))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
