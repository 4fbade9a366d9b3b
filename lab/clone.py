"""The clone drill's laboratory: managers as separate machines, and a live copy of one.

A machine here is a node namespace of a NetLab (netlab.py) with its dockerd, and an agent that
runs there too: in the node's network namespace, so the escrow sees each machine's own source
address, and in a mount and UTS namespace of its own, with a file bind-mounted over
/proc/sys/kernel/random/boot_id and the node's host name, so each machine (and each "boot" of
one) has a boot id of its own, as real machines do. Nothing of the host is changed: the bind
mount lives only in the agent's mount namespace and goes with its last process.

The escrow serves from the lab's hub namespace, on an address of the bridge (.254) that every
node reaches, with a certificate naming that address; the webhook receiver (receiver.py) runs
on the hub's loopback, in a thread of the test process that lives in the hub's network
namespace (NetnsLoop), so the host's network is never touched.

snapshot() copies a running manager's docker root and agent state directory into another node,
the way a disk snapshot would: whatever the files hold at that moment, node certificate, node
key, Raft log and the file agent key included.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from escrow import config
from escrow.core import tls
from lab.agent import AgentNode, NotifySocket, agent_env
from lab.commands import REPO
from lab.dockerd import Dockerd, new_dockerd
from lab.netlab import NetLab, ip
from lab.receiver import collector, receiving
from lab.server import EscrowProcess, make_escrow

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
HUB_HOST = 254  # the hub's address on the bridge: 10.213.X.254


class NetnsLoop:
    """An asyncio loop in a thread of its own that has joined network namespace `netns`:
    sockets made in that thread (a server started, a client connecting) are the namespace's,
    while the rest of the process stays where it was (setns(2) moves one thread only)."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"netns-{netns}", daemon=True)
        self._stack = contextlib.AsyncExitStack()

    def _run(self) -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    number = ctypes.get_errno()
                    raise OSError(number, f"setns {self.netns}: {os.strerror(number)}")
            finally:
                os.close(fd)
        except BaseException as error:
            self._error = error
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self._ready.set()
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run `coroutine` in the namespace's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, function: Callable[[], T], timeout: float = 60) -> T:
        """Run a blocking `function` in the namespace's thread (briefly: it holds the loop)."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as error:  # handed to the caller
                future.set_exception(error)
        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def enter(self, context: AbstractAsyncContextManager[T]) -> T:
        """Enter an async context manager in the namespace's loop; it is left on close()."""
        return self.run(self._stack.enter_async_context(context))

    def __enter__(self) -> NetnsLoop:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self.loop.close()
            raise self._error
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            self.run(self._stack.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
            if not self._thread.is_alive():
                self.loop.close()


@dataclass
class HubEscrow(EscrowProcess):
    """`escrow serve` in the lab's hub namespace, on the bridge address every node reaches."""
    netns: str = ""
    address: str = ""
    hub: NetnsLoop | None = None

    @property
    def url(self) -> str:
        return f"https://{self.address}:{self.port}"

    def command(self) -> list[str]:
        # nsenter execs (no --fork): the pid held is the server's.
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", sys.executable, "-m",
                "escrow", "serve", "--data-dir", str(self.data_dir), "--listen",
                f"{self.address}:{self.port}"]

    def health(self) -> tuple[int, dict[str, Any]]:
        assert self.hub is not None
        return self.hub.call(lambda: EscrowProcess.health(self))

    def last_beat(self, boot_id: str) -> str | None:
        """When the escrow last heard a beat from `boot_id` (beats are audited only when
        something changes); read from its database, read-only."""
        uri = f"file:{self.data_dir / config.DB_NAME}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            row = db.execute("SELECT max(last_at) FROM heartbeats WHERE boot_id = ?",
                             (boot_id,)).fetchone()
        return str(row[0]) if row and row[0] is not None else None


@dataclass
class MachineAgent(AgentNode):
    """The agent of one machine: in node namespace `netns`, with boot id `boot_id` and host
    name `hostname` (a mount and a UTS namespace of the agent's own)."""
    netns: str = ""
    boot_id: str = ""
    hostname: str = ""

    def wrapped(self, argv: list[str]) -> list[str]:
        """`argv` run on this machine. nsenter and unshare (without --fork) exec and so does
        the shell, so the pid of the process started is the agent's."""
        boot = self.base / "boot_id"
        boot.write_text(self.boot_id + "\n")
        script = (f'hostname "$1" && mount --bind "$2" {BOOT_ID_PATH} && shift 2 && '
                  'exec "$@"')
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", "unshare", "--mount",
                "--uts", "--propagation", "private", "--", "sh", "-c", script, "sh",
                self.hostname, str(boot), *argv]

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.write_config()
        return subprocess.run(
            self.wrapped([sys.executable, "-m", "agent", *args, "--config", str(self.config)]),
            capture_output=True, text=True, cwd=REPO, env=agent_env(**self.env), timeout=180,
            check=False)

    def start(self, watchdog_usec: int = 2_000_000) -> NotifySocket:
        self.write_config()
        self.notify = NotifySocket()
        env = agent_env(NOTIFY_SOCKET=str(self.notify.path), WATCHDOG_USEC=str(watchdog_usec),
                        **self.env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.wrapped([sys.executable, "-m", "agent", "run", "--config",
                              str(self.config)]),
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
        self.notify.wait_for(lambda line: line == "READY=1", timeout=30)
        return self.notify

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Drill:
    """A NetLab whose nodes are machines, an escrow in its hub, and the webhook's alerts."""
    lab: NetLab
    escrow: HubEscrow
    alerts: list[dict[str, object]]
    agents: list[MachineAgent] = field(default_factory=list)

    def machine(self, index: int, base: Path, daemon: Dockerd, boot_id: str,
                hostname: str | None = None,
                settings: dict[str, float | str] | None = None) -> MachineAgent:
        """The agent of node `index` (not started), stopped when the drill ends."""
        agent = MachineAgent(base, daemon, self.escrow, dict(settings or {}), {},
                             netns=self.lab.nodes[index], boot_id=boot_id,
                             hostname=hostname or daemon.hostname or self.lab.nodes[index])
        self.agents.append(agent)
        return agent

    def manager(self, index: int, base: Path, boot_id: str, slots: str = "auto,auto,alice,bob",
                threshold: int = 2, *, enroll: bool = True,
                **settings: float | str) -> MachineAgent:
        """An autolocked single-manager swarm on node `index`, registered and, unless told
        otherwise, enrolled (its agent not started)."""
        daemon = self.lab.start_daemon(index)
        cluster_id = daemon.init_swarm()["Cluster"]["ID"]
        root_ca = daemon.data_root / "swarm" / "certificates" / "swarm-root-ca.crt"
        added = self.escrow.cli("cluster", "add", cluster_id, "--root-ca", str(root_ca),
                                "--threshold", str(threshold), "--slots", slots)
        assert added.returncode == 0, added.stderr
        agent = self.machine(index, base, daemon, boot_id, settings=settings)
        if enroll:
            agent.enroll()
        return agent

    def snapshot(self, original: MachineAgent, index: int, base: Path,
                 boot_id: str) -> MachineAgent:
        """A copy of `original`'s disk, taken as it runs, on node `index`: its docker root
        (swarm/ included) and the agent's state directory (state.json, the file agent key),
        with the same host name and settings. Neither the copy's dockerd nor its agent is
        started."""
        source = original.daemon
        copy = new_dockerd(netns=self.lab.nodes[index], hostname=source.hostname,
                           advertise_addr=self.lab.address(index))
        self.lab.daemons.append(copy)  # the lab stops and removes it
        copy_tree(source.data_root, copy.data_root)
        if (source.root / "key.json").exists():  # the engine's identity, on the same disk
            shutil.copy2(source.root / "key.json", copy.root / "key.json")
        base.mkdir(parents=True)
        copy_tree(original.state_dir, base / "agent-state")
        return self.machine(index, base, copy, boot_id, hostname=original.hostname,
                            settings=original.settings)


def copy_tree(source: Path, target: Path) -> None:
    """`source` copied as it is now, owners, modes and times kept (cp -a)."""
    result = subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(target)],
                            capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"cp -a {source} {target}: {result.stderr.strip()}")


def hub_address(lab: NetLab) -> str:
    """An address for the hub on its bridge, reachable from every node (made once)."""
    address = f"10.213.{lab.subnet}.{HUB_HOST}"
    ip("-n", lab.hub, "addr", "replace", f"{address}/24", "dev", "br0")
    return address


@contextlib.asynccontextmanager
async def _webhook(into: list[dict[str, object]]) -> AsyncIterator[str]:
    async with receiving("/hook", collector(into)) as url:
        yield url


@contextlib.contextmanager
def drill_lab(base: Path, nodes: int,
              custodians: tuple[str, ...] = ("alice", "bob")) -> Iterator[Drill]:
    """A NetLab of `nodes` machines with an escrow in its hub (custodians registered) calling
    a webhook receiver there. On the way out, whatever happened: the drill's agents stopped,
    the escrow stopped, the receiver closed, every dockerd and namespace removed (NetLab
    raises if anything is left)."""
    with NetLab(nodes=nodes) as lab, NetnsLoop(lab.hub) as hub:
        address = hub_address(lab)
        alerts: list[dict[str, object]] = []
        url = hub.enter(_webhook(alerts))
        made = make_escrow(base)
        made.webhook("drill", url)
        escrow = HubEscrow(made.base, made.port, made.env, netns=lab.hub, address=address,
                           hub=hub)
        # The quickstart certificate names this host; the agents reach the escrow at the hub.
        tls.make_quickstart_tls(escrow.data_dir / "tls", [address, "localhost", "127.0.0.1"])
        drill = Drill(lab, escrow, alerts)
        try:
            for name in custodians:
                escrow.custodian(name)
            escrow.start()
            yield drill
        finally:
            for agent in drill.agents:
                agent.stop()
            escrow.stop()
