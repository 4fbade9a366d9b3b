"""A real dockerd with its own data root, socket and swarm, on loopback only.

It never touches the host's network: no bridge, no iptables, no masquerading, and the swarm
listens on 127.0.0.1. Stopping it waits for the daemon to exit, unmounts what it left under its
directory, and removes the directory (DESIGN section 6).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker

from tests.helpers.net import free_port


@dataclass
class Dockerd:
    root: Path
    process: subprocess.Popen[bytes] | None = None
    swarm_port: int = 0

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def socket(self) -> str:
        return f"unix://{self.root}/sock"

    def api(self, timeout: int = 60) -> docker.APIClient:
        return docker.APIClient(base_url=self.socket, version="1.41", timeout=timeout)

    def start(self) -> None:
        (self.root / "daemon.json").write_text(json.dumps(
            {"deprecated-key-path": str(self.root / "key.json")}))
        log = (self.root / "dockerd.log").open("ab")
        self.process = subprocess.Popen(
            ["dockerd", "--data-root", str(self.data_root), "--exec-root",
             str(self.root / "exec"), "--pidfile", str(self.root / "pid"), "-H", self.socket,
             "--bridge=none", "--iptables=false", "--ip-masq=false", "--ip6tables=false",
             "--config-file", str(self.root / "daemon.json")],
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("dockerd exited:\n" + self.log())
            try:
                self.api(timeout=5).ping()
            except Exception:  # not up yet, whatever the error
                time.sleep(0.1)
                continue
            return
        raise RuntimeError("dockerd did not answer:\n" + self.log())

    def state(self) -> str:
        return str(self.api().info()["Swarm"]["LocalNodeState"])

    def init_swarm(self) -> dict[str, Any]:
        api = self.api()
        self.swarm_port = free_port()
        api.init_swarm(advertise_addr="127.0.0.1", listen_addr=f"127.0.0.1:{self.swarm_port}",
                       swarm_spec=api.create_swarm_spec(autolock_managers=True))
        return dict(api.info()["Swarm"])

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
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


def new_dockerd() -> Dockerd:
    # Short path: dockerd's unix sockets under exec-root must stay below 108 characters.
    return Dockerd(Path(tempfile.mkdtemp(prefix="sw-", dir="/tmp")))
