"""``scripts/demo``: the whole loop on this machine in under a minute, like ``vault server -dev``.

It starts a throwaway autolocked dockerd (a data root, socket, swarm and network namespace of its
own; no bridge, no iptables, nothing on the host's network), an escrow on the embedded default
(SQLite, a SoftHSM token in a temporary directory) on loopback, and the agent; enrolls the
manager, restarts its dockerd and shows the agent unlocking it. With ``--custodians`` the policy
also needs custodian alice, and the demo prints the ``escrow approve`` to type in another
terminal. Everything it started is stopped and removed on exit, Ctrl-C (exit 130), SIGTERM or
SIGHUP.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

import click

from lab.agent import AgentNode
from lab.commands import REPO, terminate
from lab.dockerd import Dockerd
from lab.netlab import NetLab, wait_for
from lab.server import EscrowProcess, make_escrow

CUSTODIAN = "alice"


class Stopped(Exception):
    """A signal asked the demo to stop; ``code`` is the exit status it ends with."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _stop_on(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(128 + signum)


class Demo:
    """The demo's processes and files, each stopped or removed by :meth:`close`."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.base = Path(tempfile.mkdtemp(prefix="swarm-unseal-demo-"))
        self.lab: NetLab | None = None
        self.dockerd: Dockerd | None = None
        self.escrow: EscrowProcess | None = None
        self.cluster_id = ""
        self.children: list[subprocess.Popen[bytes]] = []

    def say(self, text: str) -> None:
        click.echo(f"[{time.monotonic() - self.started:5.1f} s] {text}")

    def spawn(self, name: str, argv: Sequence[str]) -> None:
        # A session of its own: Ctrl-C reaches the demo alone, which stops each child in turn.
        with (self.base / f"{name}.log").open("ab") as log:
            self.children.append(subprocess.Popen(
                argv, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True))

    def start_dockerd(self) -> None:
        # swarm init makes docker_gwbridge and an ingress sandbox: in a namespace of their own
        # they never reach the host's network.
        self.lab = NetLab(nodes=1)
        self.dockerd = self.lab.start_daemon(0)
        self.cluster_id = str(self.dockerd.init_swarm()["Cluster"]["ID"])
        self.say(f"dockerd: started in {self.dockerd.root} and network namespace "
                 f"{self.dockerd.netns} (socket {self.dockerd.socket}; no bridge, no iptables), "
                 "a one-manager swarm with autolock")

    def start_escrow(self, custodians: bool) -> None:
        assert self.dockerd is not None
        escrow = self.escrow = make_escrow(self.base)
        slots = "auto,auto"
        if custodians:
            escrow.custodian(CUSTODIAN)
            slots = f"auto,{CUSTODIAN}"
        root_ca = self.dockerd.data_root / "swarm" / "certificates" / "swarm-root-ca.crt"
        _checked(escrow.cli("cluster", "add", self.cluster_id, "--root-ca", str(root_ca),
                            "--threshold", "2", "--slots", slots,
                            "--allow-no-paper-recovery"))  # a throwaway key: no paper to keep
        self.spawn("serve", escrow.command())
        _wait_for(lambda: escrow.health()[0] == 200, 30, "escrow serve", self.base / "serve.log")
        policy = (f"the node's identity and custodian {CUSTODIAN} (auto,{CUSTODIAN}, 2 of 2)"
                  if custodians else "the node's identity alone (auto,auto, 2 of 2)")
        self.say(f"escrow: embedded default in {escrow.data_dir} (SQLite, a SoftHSM token), "
                 f"serving {escrow.url}; cluster {self.cluster_id} unlocks with {policy}")

    def start_agent(self) -> None:
        assert self.dockerd is not None
        assert self.escrow is not None
        node = AgentNode(self.base, self.dockerd, self.escrow)
        _checked(node.command("enroll"))
        self.say("agent: enrolled; the unlock key is split, each share wrapped by the token, and "
                 "the agent's own key kept in its state directory")
        self.spawn("agent", [sys.executable, "-m", "agent", "run", "--config", str(node.config)])
        self.say(f"agent: running (`unseal-agent run`), its log in {node.log_path}")

    def restart_dockerd(self, custodians: bool) -> None:
        assert self.dockerd is not None
        self.say("dockerd: restarting, as after a reboot")
        self.dockerd.restart()
        back = time.monotonic()
        self.say(f"dockerd: back, swarm {self.dockerd.state()}")
        if custodians:
            self._ask_custodian()
        self.dockerd.wait_state("active", timeout=24 * 3600)
        self.say(f"agent: unlocked it, {time.monotonic() - back:.1f} s after dockerd was back")

    def _ask_custodian(self) -> None:
        daemon, escrow = self.dockerd, self.escrow
        assert daemon is not None
        assert escrow is not None

        def asked() -> bool:
            listed = _checked(escrow.as_custodian(CUSTODIAN, "requests", "--json"))
            return bool(json.loads(listed)) or daemon.state() == "active"

        _wait_for(asked, 60, "the agent's request", self.base / "agent.log")
        command = [str(Path(sys.executable).parent / "escrow"), "approve", "--cluster",
                   self.cluster_id, "--all", "--url", escrow.url, "--ca", str(escrow.ca),
                   "--key", str(self.base / CUSTODIAN), "--passphrase-file",
                   str(self.base / "pass")]
        self.say(f"agent: asked for the shares; the policy waits for custodian {CUSTODIAN}. In "
                 f"another terminal, as {CUSTODIAN}:")
        click.echo(f"    {shlex.join(command)}")

    def close(self) -> None:
        # A second Ctrl-C must not cut the clean-up short and leave a dockerd behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for child in reversed(self.children):
            terminate(child)
        self.children.clear()
        if self.lab is not None:
            lab, self.lab, self.dockerd = self.lab, None, None
            lab.close()  # raises, naming it, if anything of dockerd were left
        shutil.rmtree(self.base, ignore_errors=True)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("SOFTHSM2_CONF", "ESCROW_DATA_DIR", "ESCROW_HSM_PIN", "NOTIFY_SOCKET")}


def _checked(result: subprocess.CompletedProcess[str]) -> str:
    """A command's standard output; its error as the demo's when it failed."""
    if result.returncode:
        raise click.ClickException(f"{shlex.join(result.args[2:4])} failed:\n"
                                   f"{result.stderr.strip()}")
    return result.stdout


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    """The lab's wait, its failure told as the demo's with the log that says why."""
    try:
        wait_for(predicate, timeout, what)
    except AssertionError:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise click.ClickException(f"{what} did not come within {timeout:g} s:\n{tail}"
                                   ) from None


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    previous = {s: signal.signal(s, _stop_on) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@click.command()
@click.option("--custodians", is_flag=True,
              help="Also need custodian alice's approval: the demo prints the command to type.")
@click.option("--once", is_flag=True, help="Stop after the first unlock (scripts, tests).")
def main(custodians: bool, once: bool) -> None:
    """Watch the agent unlock a throwaway autolocked manager; leaves nothing behind.

    \b
    Example:
      scripts/demo                 # automatic unseal; Enter restarts again, Ctrl-C stops
      scripts/demo --custodians    # the unlock waits for `escrow approve` in another terminal
    """
    if os.geteuid() != 0:
        raise click.ClickException("the demo starts a dockerd of its own: run it as root")
    demo = Demo()
    code = 0
    try:
        with _signals_stop():
            demo.say(f"demo: everything lives under {demo.base} and goes at the end")
            demo.start_dockerd()
            demo.start_escrow(custodians)
            demo.start_agent()
            demo.restart_dockerd(custodians)
            while not once:
                demo.say("Enter restarts dockerd again; Ctrl-C stops the demo and removes "
                         "everything")
                if not sys.stdin.readline():
                    signal.pause()  # no terminal to read from: run until a signal
                demo.restart_dockerd(custodians)
    except (KeyboardInterrupt, Stopped) as stop:
        code = stop.code if isinstance(stop, Stopped) else 128 + signal.SIGINT
        click.echo("")
        demo.say("demo: stopping and removing everything it started")
    finally:
        demo.close()
    demo.say("demo: done; everything it started is gone")
    sys.exit(code)


if __name__ == "__main__":
    main()
