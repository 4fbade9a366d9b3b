"""Hostile floods: what callers who never prove who they are cost an `escrow serve`, for a
checkout before a change (--baseline) and after it (--checkout), side by side in one run.

Run from the repository root:

    git worktree add /tmp/bench-before HEAD
    .venv/bin/python -m bench.hostile_flood --baseline /tmp/bench-before
    git worktree remove --force /tmp/bench-before

Each checkout runs its own code: its own `escrow init`, `escrow cluster add` and `escrow serve`
(`DIR/.venv/bin/python`, else this Python, with cwd=DIR and PYTHONPATH=DIR, checked by printing
`escrow.__file__` in that environment first). The current checkout runs twice: with its default
per-source rate limit, and with ESCROW_REQUESTS_SOURCE_RATE=0 (none). Two measurements:

1. unseal requests that fail identification (well-formed bodies for a node id nobody enrolled,
   in a registered cluster), `--requests` of them with `--concurrency` in flight, split into
   `--audit-rounds` slices run alternately on each escrow; audit rows (sqlite3 on
   DATA/escrow.db) and database size before and after.
2. `POST /v1/nonce` as fast as `--concurrency` requests in flight allow for `--flood-seconds`,
   against a freshly restarted escrow, while another process GETs /healthz every 50 ms on a
   connection of its own; the same probe first measures the idle escrow.

Every escrow works in a temporary directory (data dir, SoftHSM token) removed at the end, even
when the run fails. Prints a Markdown document; --out FILE also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import shutil
import sqlite3
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import cast

import aiohttp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench.checkout import REPO, Checkout, Server, checkout
from bench.machine import Machine, invocation, preamble, this_machine
from bench.proc import cpu_seconds
from bench.stats import percentile
from lab.certs import Issued, make_node_cert, make_root_ca
from lab.server import swarm_id

TITLE = "Hostile floods: what unauthenticated callers cost the escrow"
PROBE_INTERVAL = 0.05  # seconds between /healthz probes
IDLE_SECONDS = 2.0  # of /healthz probing before each flood
EDGE_SECONDS = 2.0  # nonces issued in the flood's first and last this-many seconds
CLIENT_TIMEOUT = 120.0  # long, so slow answers stay in the figures instead of becoming errors
NO_LIMIT = {"ESCROW_REQUESTS_SOURCE_RATE": "0"}


# -- the escrows under test -----------------------------------------------------------------

_SOURCE_LIMIT = """\
import escrow.config as c
s = c.ServerSettings()
print(getattr(s, "source_rate", ""))
print(getattr(s, "source_burst", ""))
"""


def source_limit(owner: Checkout) -> tuple[float, float] | None:
    """The checkout's default per-source rate limit (requests.source_rate, source_burst);
    None if it has no such limit."""
    rate, burst = owner.run_python(_SOURCE_LIMIT).splitlines()
    return (float(rate), float(burst)) if rate else None


@dataclass(frozen=True)
class Target:
    """One escrow configuration measured: a checkout and its environment overrides."""

    key: str  # short and unique, for directories
    checkout: Checkout
    source_limit: tuple[float, float] | None = None  # the checkout's default, if it has one
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.checkout.role == "baseline":
            return self.checkout.label
        if self.source_limit is None:
            return "current"
        if self.extra_env == NO_LIMIT:
            return "current, per-source limit off (ESCROW_REQUESTS_SOURCE_RATE=0)"
        rate, burst = self.source_limit
        return f"current, default per-source limit ({rate:g}/s, burst {burst:g})"


def targets(baseline: Checkout | None, current: Checkout) -> list[Target]:
    found = [Target("baseline", baseline)] if baseline is not None else []
    limit = source_limit(current)
    found.append(Target("current", current, limit))
    if limit is not None:  # a checkout with the per-source limit: also without
        found.append(Target("current-nolimit", current, limit, dict(NO_LIMIT)))
    return found


class Escrow(Server):
    """A target's data directory and, while started, its `escrow serve` on loopback, with one
    registered cluster whose root CA we hold."""

    def __init__(self, target: Target, base: Path) -> None:
        super().__init__(target.checkout, base, target.extra_env, target.label)
        self.target = target
        self.cluster_id = ""
        self.cluster_ca: Issued | None = None

    @property
    def db(self) -> Path:
        return self.data_dir / "escrow.db"

    def init(self) -> None:
        """`escrow init`, then a cluster (auto policy, t=2) whose root CA we hold."""
        super().init()
        self.cluster_id = swarm_id()
        self.cluster_ca = make_root_ca()
        root = self.base / "swarm-root-ca.pem"
        root.write_bytes(self.cluster_ca.pem)
        self.escrow("cluster", "add", self.cluster_id, "--root-ca", str(root), "--threshold",
                    "2", "--slots", "auto,auto", "--allow-no-paper-recovery")

    def restart(self) -> None:
        """A fresh `escrow serve` on the same data (and a new port): nothing a previous flood
        left in memory."""
        self.stop()
        self.start()

    def unidentified_metric(self) -> int | None:
        """escrow_unauthenticated_refusals_total summed over its labels; None if this escrow
        has no such metric."""
        status, body = self.get("/metrics")
        if status != 200:
            return None
        values = [float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                  if line.startswith("escrow_unauthenticated_refusals_total{")]
        return round(sum(values)) if values or b"escrow_unauthenticated_refusals" in body else None

    def audit_rows(self) -> int:
        """Committed audit rows, read from the database directly (WAL: a reader sees every
        commit without waiting for the escrow)."""
        with sqlite3.connect(self.db) as db:
            return int(db.execute("SELECT COUNT(*) FROM audit").fetchone()[0])

    def db_bytes(self) -> int:
        """escrow.db's size once its WAL is checkpointed: pages in use, times the page size."""
        with sqlite3.connect(self.db) as db:
            pages = int(db.execute("PRAGMA page_count").fetchone()[0])
            return pages * int(db.execute("PRAGMA page_size").fetchone()[0])

    def log_bytes(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0


# -- the flood clients ----------------------------------------------------------------------

def _session(ca: Path, connections: int) -> aiohttp.ClientSession:
    context = ssl.create_default_context(cafile=str(ca))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections, ssl=context),
                                 timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT))


async def _answer(response: aiohttp.ClientResponse) -> str:
    """`404 unknown_node`: the status and, for an error body, the escrow's error code."""
    body = await response.read()
    if response.status < 400:
        return str(response.status)
    try:
        code = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        code = ""
    return f"{response.status} {code}".strip()


def _error_kind(error: Exception) -> str:
    return f"client error: {type(error).__name__}"


def unknown_node_bodies(count: int, cluster_id: str, ca: Issued) -> list[bytes]:
    """Unseal requests valid for both checkouts' request models (a DNS host name, a lower-case
    UUID boot id, base64 of the right sizes) from nodes nobody enrolled: each names a node id
    of its own, carries a node certificate the cluster's CA did issue (to another id) and a
    well-formed signature, so the escrow refuses it only when it looks the node up."""
    issued = make_node_cert(ca, swarm_id(), cluster_id)
    signature = issued.key.sign(b"not the unseal payload", ec.ECDSA(hashes.SHA256()))

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return [json.dumps({
        "cluster_id": cluster_id,
        "node_id": swarm_id(),
        "node_cert": issued.pem.decode("ascii"),
        "ephemeral_public_key": b64(os.urandom(32)),
        "hostname": "manager-1",
        "boot_id": str(uuid.uuid4()),
        "kek_version": "",
        "nonce": b64(os.urandom(32)),
        "signature": b64(signature),
    }).encode() for _ in range(count)]


async def _post_all(url: str, ca: Path, bodies: Sequence[bytes], concurrency: int
                    ) -> tuple[Counter[str], float]:
    """POST every body to /v1/unseal, `concurrency` in flight; answers by kind, and seconds."""
    answers: Counter[str] = Counter()
    pending = iter(bodies)
    headers = {"Content-Type": "application/json"}
    async with _session(ca, concurrency) as session:

        async def worker() -> None:
            for body in pending:  # one iterator shared by every worker: each body sent once
                try:
                    async with session.post(url + "/v1/unseal", data=body,
                                            headers=headers) as response:
                        answers[await _answer(response)] += 1
                except (aiohttp.ClientError, TimeoutError) as error:
                    answers[_error_kind(error)] += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return answers, time.perf_counter() - began


async def _nonce_flood(url: str, ca: Path, seconds: float, concurrency: int
                       ) -> tuple[list[float], Counter[str]]:
    """POST /v1/nonce from `concurrency` loops until `seconds` are over: when (seconds since
    the start) each nonce was issued, and every answer by kind."""
    issued: list[float] = []
    answers: Counter[str] = Counter()
    async with _session(ca, concurrency) as session:
        began = time.perf_counter()
        deadline = began + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                try:
                    async with session.post(url + "/v1/nonce") as response:
                        kind = await _answer(response)
                except (aiohttp.ClientError, TimeoutError) as error:
                    kind = _error_kind(error)
                answers[kind] += 1
                if kind == "200":
                    issued.append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return issued, answers


# -- the /healthz probe, in a process of its own --------------------------------------------

def probe_main(url: str, ca: str, conn: Connection) -> None:
    """Child process: on one connection of its own, GET /healthz every PROBE_INTERVAL for as
    many seconds as each message asks (None ends it); answer with the latencies and the count
    of answers other than 200."""
    asyncio.run(_probe_loop(url, Path(ca), conn))


async def _probe_loop(url: str, ca: Path, conn: Connection) -> None:
    async with _session(ca, 1) as session:
        await _healthz(session, url)  # the TLS handshake, out of the figures
        conn.send("ready")
        while (seconds := cast(float | None, conn.recv())) is not None:
            latencies: list[float] = []
            failed = 0
            now = time.perf_counter()
            deadline, due = now + seconds, now
            while due < deadline:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                began = time.perf_counter()
                ok = await _healthz(session, url)
                latencies.append(time.perf_counter() - began)
                failed += not ok
                # Every 50 ms; after an answer slower than that, the next probe goes at once.
                due = max(due + PROBE_INTERVAL, time.perf_counter())
            conn.send((latencies, failed))


async def _healthz(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url + "/healthz") as response:
            await response.read()
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


class Probe:
    """The /healthz prober for one escrow: a spawned process with its own event loop."""

    def __init__(self, escrow: Escrow) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=probe_main,
                                        args=(escrow.url, str(escrow.ca), child), daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(60) or self._conn.recv() != "ready":
            self.close()
            raise RuntimeError("the /healthz probe did not start")

    def begin(self, seconds: float) -> None:
        self._conn.send(seconds)

    def result(self) -> tuple[list[float], int]:
        return cast(tuple[list[float], int], self._conn.recv())

    def measure(self, seconds: float) -> tuple[list[float], int]:
        self.begin(seconds)
        return self.result()

    def close(self) -> None:
        with suppress(OSError):
            self._conn.send(None)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


# -- the measurements -----------------------------------------------------------------------

@dataclass
class AuditFlood:
    """Unidentified unseal requests against one target, over every round."""

    label: str
    requests: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    rates: list[float] = field(default_factory=list)  # requests/s, one per round
    rows: int = 0
    db_bytes: int = 0
    server_cpu: float = 0.0  # CPU seconds the escrow used, over every round
    machine_busy: list[float] = field(default_factory=list)  # cores busy, one per round
    log_bytes: int = 0
    counted: int | None = None  # escrow_unauthenticated_refusals_total added, if it exists


@dataclass
class NonceFlood:
    """POST /v1/nonce floods against one target, one entry per round in every list."""

    label: str
    seconds: float
    first: list[float] = field(default_factory=list)  # nonces/s in the first EDGE_SECONDS
    last: list[float] = field(default_factory=list)  # ...and in the last
    overall: list[float] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    idle_p50: list[float] = field(default_factory=list)  # /healthz, seconds
    p50: list[float] = field(default_factory=list)
    p95: list[float] = field(default_factory=list)
    worst: list[float] = field(default_factory=list)
    probes: int = 0
    probe_failures: int = 0
    server_cpu: list[float] = field(default_factory=list)  # cores busy on average, 0..cores
    generator_cpu: list[float] = field(default_factory=list)  # the flood client's, likewise
    machine_busy: list[float] = field(default_factory=list)  # the whole machine's, likewise


@dataclass(frozen=True)
class Result:
    checkouts: list[Checkout]
    audit: list[AuditFlood]
    nonce: list[NonceFlood]
    requests: int
    concurrency: int
    audit_rounds: int
    flood_rounds: int
    seconds: float


def _slices(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _alternating(items: Sequence[Escrow], rounds: int) -> Iterator[tuple[int, Escrow]]:
    """(round, escrow), forwards then backwards (A B C C B A A B C ...), so drift over the
    run weighs on every target alike."""
    for number in range(rounds):
        for escrow in (items if number % 2 == 0 else list(reversed(items))):
            yield number, escrow


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent on anything but idling so far, from
    /proc/stat: against the escrow's and the flood client's own, what else was running (on a
    shared machine, other people's work)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _say(text: str) -> None:
    print(f"hostile flood: {text}", file=sys.stderr, flush=True)


def audit_flood(escrows: Sequence[Escrow], requests: int, concurrency: int, rounds: int
                ) -> list[AuditFlood]:
    results = {e.target.key: AuditFlood(e.target.label) for e in escrows}
    metric_before = {e.target.key: e.unidentified_metric() for e in escrows}
    for number, escrow in _alternating(escrows, rounds):
        assert escrow.cluster_ca is not None
        count = _slices(requests, rounds)[number]
        bodies = unknown_node_bodies(count, escrow.cluster_id, escrow.cluster_ca)
        rows, size, log = escrow.audit_rows(), escrow.db_bytes(), escrow.log_bytes()
        _say(f"round {number + 1}: {count:,} unidentified unseal requests to "
             f"{escrow.target.label}")
        cpu, busy = cpu_seconds(escrow.pid), machine_busy_seconds()
        answers, seconds = asyncio.run(_post_all(escrow.url, escrow.ca, bodies, concurrency))
        result = results[escrow.target.key]
        result.server_cpu += cpu_seconds(escrow.pid) - cpu
        result.machine_busy.append((machine_busy_seconds() - busy) / seconds)
        result.requests += count
        result.answers.update(answers)
        result.rates.append(count / seconds)
        result.rows += escrow.audit_rows() - rows
        result.db_bytes += escrow.db_bytes() - size
        result.log_bytes += escrow.log_bytes() - log
    for escrow in escrows:
        before, after = metric_before[escrow.target.key], escrow.unidentified_metric()
        if before is not None and after is not None:
            results[escrow.target.key].counted = after - before
    return [results[e.target.key] for e in escrows]


def nonce_flood(escrows: Sequence[Escrow], seconds: float, concurrency: int, rounds: int
                ) -> list[NonceFlood]:
    results = {e.target.key: NonceFlood(e.target.label, seconds) for e in escrows}
    # Backwards first, continuing the audit flood's alternation.
    for number, escrow in _alternating(list(reversed(escrows)), rounds):
        escrow.restart()
        result = results[escrow.target.key]
        probe = Probe(escrow)
        try:
            idle, _ = probe.measure(IDLE_SECONDS)
            _say(f"round {number + 1}: {seconds:g} s nonce flood on {escrow.target.label}")
            cpu, generator = cpu_seconds(escrow.pid), time.process_time()
            busy = machine_busy_seconds()
            probe.begin(seconds)
            issued, answers = asyncio.run(_nonce_flood(escrow.url, escrow.ca, seconds,
                                                       concurrency))
            result.server_cpu.append((cpu_seconds(escrow.pid) - cpu) / seconds)
            result.generator_cpu.append((time.process_time() - generator) / seconds)
            result.machine_busy.append((machine_busy_seconds() - busy) / seconds)
            latencies, failed = probe.result()
        finally:
            probe.close()
        result.first.append(sum(1 for t in issued if t < EDGE_SECONDS) / EDGE_SECONDS)
        result.last.append(sum(1 for t in issued if t >= seconds - EDGE_SECONDS) / EDGE_SECONDS)
        result.overall.append(len(issued) / seconds)
        result.answers.update(answers)
        result.idle_p50.append(percentile(idle, 0.5))
        result.p50.append(percentile(latencies, 0.5))
        result.p95.append(percentile(latencies, 0.95))
        result.worst.append(max(latencies))
        result.probes += len(latencies)
        result.probe_failures += failed
    return [results[e.target.key] for e in escrows]


def measure(current: Path, baseline: Path | None = None, *, requests: int = 10_000,
            concurrency: int = 50, audit_rounds: int = 3, seconds: float = 20.0,
            flood_rounds: int = 1) -> Result:
    """Both floods against every target of `baseline` (if given) and `current`."""
    if seconds < 2 * EDGE_SECONDS or min(requests, concurrency, audit_rounds, flood_rounds) < 1:
        raise ValueError(f"floods last at least {2 * EDGE_SECONDS:g} s, and counts are at least 1")
    checkouts = [checkout("baseline", baseline)] if baseline is not None else []
    checkouts.append(checkout("current", current))
    chosen = targets(checkouts[0] if baseline is not None else None, checkouts[-1])
    with tempfile.TemporaryDirectory(prefix="escrow-flood-") as workdir, ExitStack() as stack:
        escrows = []
        for target in chosen:
            escrow = Escrow(target, Path(workdir) / target.key)
            stack.callback(escrow.stop)
            _say(f"setting up {target.label} from {target.checkout.escrow_file}")
            escrow.init()
            escrow.start()
            escrows.append(escrow)
        audit = audit_flood(escrows, requests, concurrency, audit_rounds)
        nonce = nonce_flood(escrows, seconds, concurrency, flood_rounds)
    return Result(checkouts, audit, nonce, requests, concurrency, audit_rounds, flood_rounds,
                  seconds)


# -- the report -----------------------------------------------------------------------------

def _answers(answers: Counter[str]) -> str:
    return "; ".join(f"{count:,} x {kind}" for kind, count in answers.most_common())


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _ms(values: Sequence[float]) -> str:
    return f"{_median(values) * 1000:.1f}"


def _bytes(count: int) -> str:
    if abs(count) >= 1024 * 1024:
        return f"{count / 1024 / 1024:.1f} MiB"
    if abs(count) >= 1024:
        return f"{count / 1024:.0f} KiB"
    return f"{count} B"


def audit_table(floods: Sequence[AuditFlood]) -> str:
    return "\n".join([
        "| escrow | requests | requests/s | answers | audit rows added | rows per 10,000 "
        "| database growth | log growth | counted in escrow_unauthenticated_refusals_total "
        "| escrow CPU s | machine busy, cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {f.label} | {f.requests:,} | {_median(f.rates):,.0f} | {_answers(f.answers)} | "
          f"{f.rows:,} | {f.rows * 10_000 / f.requests:,.0f} | {_bytes(f.db_bytes)} | "
          f"{_bytes(f.log_bytes)} | {'-' if f.counted is None else f'{f.counted:,}'} | "
          f"{f.server_cpu:.1f} | {_median(f.machine_busy):.2f} |" for f in floods),
    ])


def nonce_table(floods: Sequence[NonceFlood]) -> str:
    return "\n".join([
        f"| escrow | nonces/s, first {EDGE_SECONDS:g} s | nonces/s, last {EDGE_SECONDS:g} s "
        "| nonces/s, whole flood | answers | /healthz idle p50 ms | /healthz p50 ms | p95 ms "
        "| max ms | probes (failed) | escrow CPU, cores | flood client CPU, cores "
        "| machine busy, cores |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {f.label} | {_median(f.first):,.0f} | {_median(f.last):,.0f} | "
          f"{_median(f.overall):,.0f} | {_answers(f.answers)} | {_ms(f.idle_p50)} | "
          f"{_ms(f.p50)} | {_ms(f.p95)} | {_ms(f.worst)} | {f.probes:,} ({f.probe_failures}) | "
          f"{_median(f.server_cpu):.2f} | {_median(f.generator_cpu):.2f} | "
          f"{_median(f.machine_busy):.2f} |" for f in floods),
    ])


def tables(result: Result) -> str:
    return "\n".join([
        f"### {result.requests:,} unidentified unseal requests, {result.concurrency} in flight",
        "",
        audit_table(result.audit),
        "",
        f"### {result.seconds:g} s of POST /v1/nonce, {result.concurrency} in flight, with "
        f"/healthz probed every {PROBE_INTERVAL * 1000:.0f} ms",
        "",
        nonce_table(result.nonce),
    ])


def document(result: Result, machine: Machine, command: str) -> str:
    rounds = (f"median of {result.audit_rounds} rounds"
              if result.audit_rounds > 1 else "one round")
    flood_rounds = (f"medians of {result.flood_rounds} rounds, each against a freshly "
                    "restarted escrow" if result.flood_rounds > 1
                    else "one round, against a freshly restarted escrow")
    return "\n".join([
        preamble(TITLE, machine, command),
        "Code measured (each checkout's own `escrow init`, `escrow cluster add` and "
        "`escrow serve`, run with cwd and PYTHONPATH set to the checkout):",
        "",
        *(f"- {c.role}: `{c.path}` at {c.revision}, importing `{c.escrow_file}`"
          for c in result.checkouts),
        "",
        "Every escrow has its own data directory (SoftHSM token, SQLite in WAL mode with "
        "`synchronous=FULL`) and one registered cluster (auto policy, t=2). Unidentified "
        "requests are well-formed `POST /v1/unseal` bodies (valid for both checkouts' request "
        "models) for node ids nobody enrolled in that cluster; each checkout refuses them when "
        f"it looks the node up. The {result.requests:,} are split into "
        f"{result.audit_rounds} slices sent to each escrow in turn, forwards then backwards; "
        f"requests/s is the {rounds}, the other columns are totals. Audit rows are counted "
        "with sqlite3 on DATA/escrow.db; database growth is its page count times page size (its "
        "size once the WAL is checkpointed); log growth is what `escrow serve` wrote to "
        "stderr; escrow CPU s is the CPU time `escrow serve` used over all the slices. Neither "
        "escrow sent audit records to journald here (no journald), which in production stores "
        "every audit row a second time.",
        "",
        f"The nonce flood: {flood_rounds}, the targets in reverse order, each preceded by "
        f"{IDLE_SECONDS:g} s of probing the idle escrow. A separate process probes /healthz "
        "on a kept-alive connection of its own; a probe slower than 50 ms is followed by the "
        "next at once. Nonces/s counts only 200 answers; every answer is listed by kind, totals "
        "over the rounds (the figures beside them are medians of the rounds). "
        "CPU columns are CPU time over the flood divided by its length (1.00: one core busy "
        "throughout), for the escrow and for the flood client (one asyncio process, this "
        "one). Both run on the same cores, so the rates are what the two together reach, not "
        "the escrow's ceiling. Machine busy (here and above) is every core's non-idle time "
        "from /proc/stat over the same span, median of the rounds: what it shows beyond the "
        "escrow, the flood client and the probe is other work on the machine competing for the "
        "same cores.",
        "",
        tables(result),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=REPO,
                        help="the checkout measured as current (default: this repository)")
    parser.add_argument("--baseline", type=Path,
                        help="a checkout to compare against, e.g. a worktree of HEAD")
    parser.add_argument("--requests", type=int, default=10_000,
                        help="unidentified unseal requests per escrow")
    parser.add_argument("--concurrency", type=int, default=50, help="requests in flight")
    parser.add_argument("--audit-rounds", type=int, default=3,
                        help="slices the requests are sent in, alternating between escrows")
    parser.add_argument("--flood-seconds", type=float, default=20.0,
                        help="length of each nonce flood")
    parser.add_argument("--flood-rounds", type=int, default=1,
                        help="nonce floods per escrow, alternating between escrows")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.flood_seconds < 2 * EDGE_SECONDS or min(args.requests, args.concurrency,
                                                    args.audit_rounds, args.flood_rounds) < 1:
        parser.error(f"--flood-seconds must be at least {2 * EDGE_SECONDS:g}, and the counts "
                     "at least 1")
    if shutil.which("softhsm2-util") is None:
        parser.error("softhsm2-util is not installed (./scripts/setup installs it)")
    result = measure(args.checkout, args.baseline, requests=args.requests,
                     concurrency=args.concurrency, audit_rounds=args.audit_rounds,
                     seconds=args.flood_seconds, flood_rounds=args.flood_rounds)
    text = document(result, this_machine(), invocation("bench.hostile_flood"))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
