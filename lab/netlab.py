"""Several dockerd, each in a network namespace of its own, on a bridge in a private hub namespace.

The bridge lives in the hub rather than in the host's namespace so that the host's network and
firewall are never touched (a FORWARD policy of DROP set by some other dockerd would also cut a
host bridge). Names carry a random suffix, so parallel runs and leftovers of killed runs never
collide. close() leaves nothing behind and says so, or raises (docs/design.md, "The lab").
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from lab.dockerd import Dockerd, new_dockerd

PREFIX = "swlab-"


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check()` holds; exceptions count as "not yet"."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(Exception):  # a daemon busy or restarting: look again
            if check():
                return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def ready_managers(leader: Dockerd) -> set[str]:
    """Hostnames of the managers `leader` sees ready and reachable."""
    return {node["Description"]["Hostname"] for node in leader.api(timeout=10).nodes()
            if node["Status"]["State"] == "ready"
            and node.get("ManagerStatus", {}).get("Reachability") == "reachable"}


def run_all(calls: list[Callable[[], Any]]) -> list[BaseException]:
    """Run every call in its own thread; the errors, after all have finished."""
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=max(len(calls), 1)) as pool:
        for future in [pool.submit(call) for call in calls]:
            error = future.exception()
            if error is not None:
                errors.append(error)
    return errors


class NetLab:
    """A hub namespace with bridge br0 and `nodes` node namespaces on 10.213.X.0/24."""

    def __init__(self, nodes: int = 3) -> None:
        self.tag = secrets.token_hex(3)
        self.name = f"{PREFIX}{self.tag}"
        self.hub = f"{self.name}-hub"
        self.subnet = random.randrange(256)
        self.nodes = [f"{self.name}-n{index + 1}" for index in range(nodes)]
        self.daemons: list[Dockerd] = []
        self._created: list[str] = []
        self._closed = False
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def address(self, index: int) -> str:
        """Node `index`'s (0-based) address on eth0."""
        return f"10.213.{self.subnet}.{index + 1}"

    def _create(self) -> None:
        ip("netns", "add", self.hub)
        self._created.append(self.hub)
        ip("-n", self.hub, "link", "set", "lo", "up")
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        for index, node in enumerate(self.nodes):
            ip("netns", "add", node)
            self._created.append(node)
            # Made in place inside both namespaces: the pair never appears on the host. The hub
            # end's name carries the tag so that a leaked one would be recognisable.
            port = f"sw{self.tag}v{index + 1}"
            ip("link", "add", port, "netns", self.hub, "type", "veth",
               "peer", "name", "eth0", "netns", node)
            ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
            ip("-n", node, "link", "set", "lo", "up")
            ip("-n", node, "addr", "add", f"{self.address(index)}/24", "dev", "eth0")
            ip("-n", node, "link", "set", "eth0", "up")

    def start_daemon(self, index: int) -> Dockerd:
        """A started dockerd in node `index`, named after the node, owned by this lab."""
        daemon = new_dockerd(netns=self.nodes[index], advertise_addr=self.address(index))
        self.daemons.append(daemon)
        daemon.start()
        return daemon

    def managers(self, count: int | None = None) -> list[Dockerd]:
        """`count` (default: all nodes) daemons in one autolocked swarm, all managers, each seen
        ready and reachable by the first, which created the swarm."""
        count = len(self.nodes) if count is None else count
        if not 0 < count <= len(self.nodes):
            raise ValueError(f"{count} managers do not fit in {len(self.nodes)} nodes")
        with ThreadPoolExecutor(max_workers=count) as pool:
            daemons = list(pool.map(self.start_daemon, range(count)))
        first = daemons[0]
        first.init_swarm()
        # One at a time: each new manager changes the raft quorum the next join depends on.
        for number, daemon in enumerate(daemons[1:], start=2):
            daemon.join(first)
            _wait_ready(first, daemons[:number])
        return daemons

    def leftovers(self) -> list[str]:
        """What of this lab still exists on the host; empty once close() has done its work."""
        found: list[str] = []
        names = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                   check=True).stdout.split())
        found += [f"namespace {name}" for name in self._created if name in names]
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                               check=True).stdout
        found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines()
                  if self.tag in line]
        roots = tuple(f"{daemon.root}/" for daemon in self.daemons)
        found += [f"mount {line.split()[1]}"
                  for line in Path("/proc/mounts").read_text().splitlines()
                  if (line.split()[1] + "/").startswith(roots)
                  or line.split()[1].startswith(f"/run/netns/{self.name}-")]
        found += [f"directory {daemon.root}" for daemon in self.daemons if daemon.root.exists()]
        found += [f"process {pid}" for pid in pids_mentioning(roots)]
        return found

    def close(self, stop_timeout: float = 30) -> None:
        """Stop and remove every daemon (in parallel), delete the namespaces, then check that
        nothing is left; raises if something is."""
        if self._closed:
            return
        self._closed = True
        errors = run_all([functools.partial(_remove, daemon, stop_timeout)
                           for daemon in self.daemons])
        for name in reversed(self._created):
            # Anything still in one of these namespaces was started by this lab (the names are
            # its own); a process left there would keep the namespace alive unseen.
            try:
                _kill_namespace_pids(name)
                ip("netns", "del", name)
            except (AssertionError, RuntimeError) as error:
                errors.append(error)
        left = self.leftovers()
        if left or errors:
            raise RuntimeError(f"lab {self.name} left {left} behind; errors: {errors!r}")

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def _wait_ready(first: Dockerd, daemons: list[Dockerd]) -> None:
    wanted = {daemon.hostname for daemon in daemons}
    wait_for(lambda: ready_managers(first) >= wanted, 60,
             f"{len(daemons)} managers ready and reachable")


def _remove(daemon: Dockerd, stop_timeout: float) -> None:
    daemon.stop(timeout=stop_timeout)
    daemon.remove()


def _kill_namespace_pids(name: str) -> None:
    result = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                            check=False)
    pids = [int(pid) for pid in result.stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, f"processes in {name} gone")


def pids_mentioning(roots: tuple[str, ...]) -> list[int]:
    """Live processes whose command line names a path under one of `roots` (dockerd and the
    containerd it started both do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if any(arg.startswith(roots) or f"{arg}/" in roots for arg in argv) \
                and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie has exited (its parent, not us, will reap it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] != "Z"
