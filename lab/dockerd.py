"""A real dockerd with its own data root, socket and swarm.

It never touches the host's network: no bridge, no iptables, no masquerading. Without a network
namespace the swarm listens on 127.0.0.1; with one (see netlab.py) the daemon runs inside it under
a hostname of its own and the swarm listens on the namespace's address. The API socket stays on
the host's filesystem either way. Stopping it waits for the daemon to exit; removing it also
unmounts what it left under its directory and removes the directory (docs/design.md, "The lab").
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker

from lab.net import free_port

SWARM_PORT = 2377


@dataclass
class Dockerd:
    root: Path
    process: subprocess.Popen[bytes] | None = None
    swarm_port: int = 0
    # Name under /run/netns to run in; None keeps the host's network namespace (loopback only).
    netns: str | None = None
    # Set in a UTS namespace of the daemon's own, so swarm nodes get distinct names; only with
    # netns. Defaults to the namespace's name.
    hostname: str | None = None
    # The swarm's listen and advertise address; None means 127.0.0.1 on a free port.
    advertise_addr: str | None = None

    def __post_init__(self) -> None:
        if self.hostname is not None and self.netns is None:
            raise ValueError("a hostname of its own needs a network namespace (netns)")
        if self.hostname is None:
            self.hostname = self.netns

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def socket(self) -> str:
        return f"unix://{self.root}/sock"

    def api(self, timeout: int = 60) -> docker.APIClient:
        return docker.APIClient(base_url=self.socket, version="1.41", timeout=timeout)

    def command(self) -> list[str]:
        """The argv that start() runs."""
        dockerd = ["dockerd", "--data-root", str(self.data_root), "--exec-root",
                   str(self.root / "exec"), "--pidfile", str(self.root / "pid"), "-H",
                   self.socket, "--bridge=none", "--iptables=false", "--ip-masq=false",
                   "--ip6tables=false", "--config-file", str(self.root / "daemon.json")]
        if self.netns is None:
            return dockerd
        # `ip netns exec` would remount /sys and dockerd dies ("Devices cgroup isn't mounted").
        # nsenter and unshare (without --fork) exec, and setsid execs too because Popen's child
        # is not a process group leader, so the pid Popen holds ends up being dockerd's.
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", "unshare", "--uts", "--",
                "setsid", "sh", "-c", f'hostname "$1" && exec {shlex.join(dockerd)}', "sh",
                self.hostname or self.netns]

    def start(self) -> None:
        (self.root / "daemon.json").write_text(json.dumps(
            {"deprecated-key-path": str(self.root / "key.json")}))
        with contextlib.suppress(FileNotFoundError):
            (self.root / "pid").unlink()  # a stale one would pass the check below
        with (self.root / "dockerd.log").open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=log,
                                            start_new_session=self.netns is None)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("dockerd exited:\n" + self.log())
            try:
                self.api(timeout=5).ping()
            except Exception:  # not up yet, whatever the error
                time.sleep(0.1)
                continue
            self._check_pid()
            return
        raise RuntimeError("dockerd did not answer:\n" + self.log())

    def _check_pid(self) -> None:
        # stop() signals and reaps the pid we hold: if that were a wrapper that forked, dockerd
        # would outlive stop() and its mounts would be busy when remove() runs.
        assert self.process is not None
        written = int((self.root / "pid").read_text())
        if written != self.process.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(written, signal.SIGKILL)
            raise RuntimeError(f"dockerd runs as pid {written}, not {self.process.pid}")

    def state(self) -> str:
        return str(self.api().info()["Swarm"]["LocalNodeState"])

    def wait_state(self, wanted: str, timeout: float = 60) -> float:
        """Seconds until the node's LocalNodeState is `wanted`."""
        started = time.monotonic()
        seen = "?"
        while time.monotonic() - started < timeout:
            with contextlib.suppress(Exception):  # dockerd busy or restarting: look again
                seen = self.state()
                if seen == wanted:
                    return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"swarm state stayed {seen!r}, never {wanted!r}:\n" + self.log())

    def _listen(self) -> tuple[str, int]:
        if self.advertise_addr is not None:
            return self.advertise_addr, SWARM_PORT
        return "127.0.0.1", free_port()

    def init_swarm(self) -> dict[str, Any]:
        """A new autolocked swarm with this daemon as its only manager."""
        api = self.api()
        address, self.swarm_port = self._listen()
        api.init_swarm(advertise_addr=address, listen_addr=f"{address}:{self.swarm_port}",
                       swarm_spec=api.create_swarm_spec(autolock_managers=True))
        return dict(api.info()["Swarm"])

    def join(self, manager: Dockerd) -> None:
        """Join `manager`'s swarm as a manager."""
        token = manager.api().inspect_swarm()["JoinTokens"]["Manager"]
        remote = f"{manager.advertise_addr or '127.0.0.1'}:{manager.swarm_port}"
        api = self.api()
        address, self.swarm_port = self._listen()
        for attempt in range(2):
            try:
                api.join_swarm(remote_addrs=[remote], join_token=token,
                               listen_addr=f"{address}:{self.swarm_port}",
                               advertise_addr=address)
            except docker.errors.APIError as error:
                # A first join has been seen to time out (docs/design.md, "The lab"). dockerd
                # keeps on trying in the background, so leave that attempt before a fresh one.
                if attempt or "Timeout was reached" not in str(error):
                    raise
                self.leave(force=True)
            else:
                return

    def leave(self, force: bool = False) -> None:
        self.api().leave_swarm(force=force)

    def stop(self, timeout: float = 60) -> None:
        """Stop dockerd (SIGTERM, SIGKILL after `timeout` seconds) and wait until it is gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        path = self.root / "dockerd.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def remove(self) -> None:
        self.stop()
        prefix = str(self.root) + "/"
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(prefix)]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def new_dockerd(netns: str | None = None, hostname: str | None = None,
                advertise_addr: str | None = None) -> Dockerd:
    """A daemon with a fresh directory of its own, not started yet."""
    # Short path: dockerd's unix sockets under exec-root must stay below 108 characters.
    return Dockerd(Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp")), netns=netns,
                   hostname=hostname, advertise_addr=advertise_addr)
