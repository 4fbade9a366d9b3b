"""The real `unseal-agent` in a subprocess, with a notify socket of the test's own.

The host's PID 1 is not systemd, so the test plays systemd's part of the notify protocol: it
binds an AF_UNIX datagram socket, passes it as NOTIFY_SOCKET, and reads what the agent sends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab.commands import REPO
from lab.dockerd import Dockerd
from lab.server import EscrowProcess


class NotifySocket:
    """What a service manager would receive: (monotonic time, message) pairs."""

    def __init__(self) -> None:
        # Short path: AF_UNIX paths must stay below 108 characters.
        self.directory = Path(tempfile.mkdtemp(prefix="nfy-", dir="/tmp"))
        self.path = self.directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.extend((time.monotonic(), line)
                                     for line in data.decode().splitlines())

    def lines(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [line for _, line in self.messages if line.startswith(prefix)]

    def statuses(self) -> list[str]:
        return [line.removeprefix("STATUS=") for line in self.lines("STATUS=")]

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 60.0,
                 after: float = 0.0) -> tuple[float, str]:
        """The first message after `after` (a monotonic time) that satisfies predicate."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for when, line in self.messages:
                    if when >= after and predicate(line):
                        return when, line
            time.sleep(0.05)
        raise AssertionError(f"no matching notify message in {timeout} s; got "
                             f"{self.lines()[-20:]}")

    def waiting_for_approval(self) -> str:
        """The id of the request the agent says it waits for one more approval of."""
        _, line = self.wait_for(
            lambda line: line.startswith("STATUS=locked, waiting for 1 more approval"))
        return line.split("(request ")[1].split(",")[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self.directory.rmdir()


def agent_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SOFTHSM2_CONF", "NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
    env.update(extra)
    return env


@dataclass
class AgentNode:
    """One manager as the agent sees it: its dockerd, config and state directory."""
    base: Path
    daemon: Dockerd
    escrow: EscrowProcess
    settings: dict[str, float | str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    notify: NotifySocket | None = None

    @property
    def config(self) -> Path:
        return self.base / "agent.toml"

    @property
    def state_dir(self) -> Path:
        return self.base / "agent-state"

    @property
    def log_path(self) -> Path:
        return self.base / "agent.log"

    def write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        lines = [f'escrow_url = "{self.escrow.url}"', f'escrow_ca = "{self.escrow.ca}"',
                 f'docker_host = "{self.daemon.socket}"',
                 f'docker_root = "{self.daemon.data_root}"', f'state_dir = "{self.state_dir}"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in self.settings.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.write_config()
        return subprocess.run([sys.executable, "-m", "agent", *args, "--config",
                               str(self.config)], capture_output=True, text=True, cwd=REPO,
                              env=agent_env(**self.env), timeout=180, check=False)

    def enroll(self) -> None:
        result = self.command("enroll")
        assert result.returncode == 0, result.stderr

    def start(self, watchdog_usec: int = 2_000_000) -> NotifySocket:
        self.write_config()
        self.notify = NotifySocket()
        env = agent_env(NOTIFY_SOCKET=str(self.notify.path), WATCHDOG_USEC=str(watchdog_usec),
                        **self.env)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)], cwd=REPO,
            env=env, stdout=subprocess.DEVNULL, stderr=self.log_path.open("ab"))
        self.notify.wait_for(lambda line: line == "READY=1", timeout=30)
        return self.notify

    def stop(self) -> int | None:
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_state(self, wanted: str, timeout: float = 60.0) -> float:
        """Seconds until dockerd reports the wanted swarm state; the agent's log if never."""
        try:
            return self.daemon.wait_state(wanted, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; agent log:\n{self.log()[-3000:]}") from None


def enrolled_manager(dockerd: Dockerd, escrow: EscrowProcess, base: Path, slots: str,
                     threshold: int = 2, env: dict[str, str] | None = None,
                     **settings: float | str) -> AgentNode:
    """An autolocked single-manager swarm, registered with the escrow and enrolled."""
    cluster_id = dockerd.init_swarm()["Cluster"]["ID"]
    root_ca = dockerd.data_root / "swarm" / "certificates" / "swarm-root-ca.crt"
    added = escrow.cli("cluster", "add", cluster_id, "--root-ca", str(root_ca), "--threshold",
                       str(threshold), "--slots", slots)
    assert added.returncode == 0, added.stderr
    node = AgentNode(base, dockerd, escrow, settings, env or {})
    node.enroll()
    return node


def key_only_config(directory: Path, module: str | None = None, pin: str | None = None) -> Path:
    """An agent config for loading the agent key alone, reaching no escrow and no docker: the
    key in a file under `directory`, or in token `unseal-agent` of PKCS#11 `module`, with
    `pin` (when given) in a 0600 file there."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    lines = ['escrow_url = "https://escrow.invalid:8443"',
             f'escrow_ca = "{directory / "escrow-ca.pem"}"', f'state_dir = "{directory}"']
    if module is not None:
        lines += [f'agent_key_pkcs11_module = "{module}"',
                  'agent_key_pkcs11_token = "unseal-agent"']
    if pin is not None:
        pin_file = directory / "agent-key-pin"
        pin_file.write_text(pin + "\n")
        pin_file.chmod(0o600)
        lines.append(f'agent_key_pkcs11_pin_file = "{pin_file}"')
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path
