"""The agent's own overhead: from dockerd's /info first answering `locked` to the unlock call
reaching dockerd, over N restarts, next to a baseline that unlocks with the key read from a
plain file (the insecure thing users do today). Then the idle agent's RSS and CPU.

Run from the repository root:  .venv/bin/python -m bench.agent_overhead --restarts 20

Both unlockers talk to dockerd through a unix-socket tap that timestamps the first /info
answer saying `locked` that the unlocker receives and its `POST /swarm/unlock` as it arrives.
Both poll /info every 50 ms (the agent's docker_poll_seconds, the baseline's sleep); measuring
from the answer each one received takes that polling phase out, so the difference is what the
agent does on top:
nonce, signed unseal request over TLS, HPKE opening, SLIP-39 combining. Auto policy (t=2),
escrow on loopback. Rounds alternate agent / baseline so both see the same conditions.
Everything (dockerd, escrow, SoftHSM token) lives in a temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import docker

from bench.machine import Machine, invocation, preamble, this_machine
from bench.proc import cpu_seconds, memory_mib
from bench.stats import percentile
from lab.agent import agent_env
from lab.commands import REPO, terminate
from lab.dockerd import Dockerd
from lab.netlab import NetLab
from lab.server import EscrowProcess, make_escrow

TITLE = "unseal-agent overhead against a plaintext baseline, and its idle footprint"
POLL = 0.05
BASELINE = '''
import sys, time, docker
api = docker.APIClient(base_url=sys.argv[1], version="1.41", timeout=30)
while True:
    try:
        locked = api.info()["Swarm"]["LocalNodeState"] == "locked"
    except Exception:
        locked = False
    if locked:
        with open(sys.argv[2]) as handle:
            api.unlock_swarm(handle.read().strip())
    time.sleep(float(sys.argv[3]))
'''


class UnlockTap:
    """A unix-socket proxy in front of dockerd that notes when an unlocker is first told
    `locked` and when its unlock call arrives."""

    LOCKED = b'"LocalNodeState":"locked"'

    def __init__(self, path: Path, upstream: str) -> None:
        self.path = path
        self.upstream = upstream.removeprefix("unix://")
        self.unlocks: list[float] = []
        self.locked: list[float] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        tail = b""  # a marker may straddle two reads
        try:
            while data := source.recv(65536):
                seen = tail + data
                if requests and b"POST /v1.41/swarm/unlock " in seen:
                    self.unlocks.append(time.monotonic())
                if not requests and self.LOCKED in seen:
                    self.locked.append(time.monotonic())
                tail = seen[-64:]
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()


def restart_and_time(daemon: Dockerd, tap: UnlockTap) -> float:
    """Restart dockerd; seconds from the unlocker first being told `locked` to its unlock
    call reaching dockerd."""
    daemon.stop()
    stopped = time.monotonic()
    daemon.start()
    api = docker.APIClient(base_url=daemon.socket, version="1.41", timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        locked = [t for t in tap.locked if t >= stopped]
        unlocks = [t for t in tap.unlocks if locked and t >= locked[0]]
        if unlocks and api.info()["Swarm"]["LocalNodeState"] == "active":
            return unlocks[0] - locked[0]
        time.sleep(0.05)
    raise RuntimeError("the manager was not unlocked within 60 s")


def rss_and_cpu(pid: int, seconds: float) -> tuple[float, float]:
    """RSS in MiB after `seconds`, and the CPU percentage used over them."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return memory_mib(pid, "VmRSS"), 100 * (cpu_seconds(pid) - before) / seconds


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, cwd=REPO, env=agent_env(), stdout=subprocess.DEVNULL,
                            stderr=log.open("ab"))


def measure_unlocks(rounds: int, commands: dict[str, list[str]], daemon: Dockerd,
                    tap: UnlockTap, base: Path) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(rounds):
        for name, command in commands.items():
            process = start(command, base / f"{name}.log")
            time.sleep(1.5)  # let it come up and settle on `active`
            try:
                results[name].append(restart_and_time(daemon, tap))
            except RuntimeError:
                log = (base / f"{name}.log").read_text(errors="replace")
                raise RuntimeError(f"{name} did not unlock; its log ends:\n{log[-3000:]}"
                                   f"\ndockerd's log ends:\n{daemon.log()}") from None
            finally:
                terminate(process)
        print(f"round {round_ + 1}: " + ", ".join(
            f"{name} {values[-1] * 1000:.0f} ms" for name, values in results.items()),
            file=sys.stderr)
    return results


@dataclass(frozen=True)
class Overhead:
    restarts: int
    unlock_seconds: dict[str, list[float]]  # by unlocker: `agent`, `baseline`
    idle_seconds: float
    idle_rss_mib: float
    idle_cpu_percent: float


def measure(restarts: int, idle_seconds: float) -> Overhead:
    """`restarts` timed unlocks per unlocker on a one-manager swarm, then the agent idling."""
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        base = Path(tmp)
        # Twenty restarts in a few minutes exceed the default 10 unseal requests per 600 s.
        escrow: EscrowProcess = make_escrow(base / "escrow", ESCROW_REQUESTS_RATE_LIMIT="1000")
        escrow.custodian("alice")
        escrow.custodian("bob")
        escrow.start()
        lab = NetLab(nodes=1)
        tap: UnlockTap | None = None
        try:
            daemon = lab.start_daemon(0)
            cluster = daemon.init_swarm()["Cluster"]["ID"]
            root_ca = daemon.data_root / "swarm" / "certificates" / "swarm-root-ca.crt"
            added = escrow.cli("cluster", "add", cluster, "--root-ca", str(root_ca),
                               "--threshold", "2", "--slots", "auto,auto,alice,bob")
            assert added.returncode == 0, added.stderr
            tap = UnlockTap(daemon.root / "tap.sock", daemon.socket)
            config = base / "agent.toml"
            config.write_text(f'escrow_url = "{escrow.url}"\nescrow_ca = "{escrow.ca}"\n'
                              f'docker_host = "unix://{tap.path}"\n'
                              f'docker_root = "{daemon.data_root}"\n'
                              f'state_dir = "{base / "state"}"\ndocker_poll_seconds = {POLL}\n')
            enrolled = subprocess.run([sys.executable, "-m", "agent", "enroll", "--config",
                                       str(config)], cwd=REPO, env=agent_env(),
                                      capture_output=True, text=True, check=False)
            assert enrolled.returncode == 0, enrolled.stderr
            key_file = base / "unlock-key"  # the baseline's plain file, removed with tmp
            key_file.write_text(daemon.api().get_unlock_key()["UnlockKey"])
            agent_cmd = [sys.executable, "-m", "agent", "run", "--config", str(config)]
            baseline_cmd = [sys.executable, "-c", BASELINE, f"unix://{tap.path}",
                            str(key_file), str(POLL)]
            results = measure_unlocks(restarts, {"agent": agent_cmd, "baseline": baseline_cmd},
                                      daemon, tap, base)
            agent = start(agent_cmd, base / "agent.log")
            try:
                time.sleep(5)
                rss, cpu = rss_and_cpu(agent.pid, idle_seconds)
            finally:
                terminate(agent)
        finally:
            if tap is not None:
                tap.close()
            lab.close()
            escrow.stop()
    return Overhead(restarts, results, idle_seconds, rss, cpu)


def overhead_ms(overhead: Overhead) -> float:
    """The agent's p50 less the baseline's."""
    return (percentile(overhead.unlock_seconds["agent"], 0.5)
            - percentile(overhead.unlock_seconds["baseline"], 0.5)) * 1000


def table(overhead: Overhead) -> str:
    def ms(values: list[float], fraction: float) -> str:
        return f"{percentile(values, fraction) * 1000:.0f}"

    return "\n".join([
        "| unlocker | restarts | p50 ms | p99 ms | min ms | max ms |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {name} | {len(values)} | {ms(values, 0.5)} | {ms(values, 0.99)} | "
          f"{ms(values, 0.0)} | {ms(values, 1.0)} |"
          for name, values in overhead.unlock_seconds.items()),
        "",
        f"Agent overhead at p50: {overhead_ms(overhead):.0f} ms (goal: at most 20 ms).",
    ])


def footprint(overhead: Overhead) -> str:
    return (f"Idle agent over {overhead.idle_seconds:.0f} s (manager unlocked, nothing to do): "
            f"RSS {overhead.idle_rss_mib:.1f} MiB, CPU {overhead.idle_cpu_percent:.2f} %.")


def document(overhead: Overhead, machine: Machine, command: str) -> str:
    return "\n".join([
        preamble(TITLE, machine, command),
        f"dockerd (one swarm manager with autolock, in a network namespace) restarted "
        f"{overhead.restarts} times per unlocker, alternating agent and baseline; time from the "
        f"unlocker receiving its first /info answer `locked` to its `POST /swarm/unlock` "
        f"reaching dockerd; both poll every {POLL * 1000:.0f} ms. The escrow (SoftHSM, auto "
        "policy t=2) runs on the same machine and is reached over TLS on loopback, so network "
        "latency to a remote escrow is not included.",
        "",
        table(overhead),
        "",
        footprint(overhead),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = document(measure(args.restarts, args.idle_seconds), this_machine(),
                    invocation("bench.agent_overhead"))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
