"""README's demo, run as a newcomer runs it: `scripts/demo`, then Ctrl-C; and the custodian
demo with the `escrow approve` it prints typed as alice would."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lab.commands import REPO, readme_blocks
from lab.netlab import pids_mentioning

DEMO = REPO / "scripts" / "demo"


class Running:
    """`scripts/demo` in a subprocess, its output collected line by line."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
        self.process = subprocess.Popen([str(DEMO), *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, count: int = 1, timeout: float = 60) -> str:
        """The `count`-th line holding `text`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if text in line]
            if len(found) >= count:
                return found[count - 1]
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"the demo never said {text!r}:\n{self.output}")

    def finish(self, timeout: float = 90) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=90)


def _links() -> set[str]:
    listed = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip() for line in listed.stdout.splitlines()}


def _namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                              check=True).stdout.split())


@pytest.fixture
def host() -> tuple[set[str], set[str]]:
    """The host's links and network namespaces before the demo, to compare with after."""
    return _links(), _namespaces()


def _left_behind(demo: Running, before: tuple[set[str], set[str]]) -> list[str]:
    places = [Path(p) for p in re.findall(r"(/tmp/(?:swarm-unseal-demo|sw)-[\w-]+)", demo.output)]
    assert len(set(places)) >= 2, demo.output  # its own directory and dockerd's
    left = [f"directory {p}" for p in places if p.exists()]
    left += [f"process {pid}" for pid in pids_mentioning(tuple(f"{p}/" for p in places))]
    # Another lab's names (a test running beside this one) are not the demo's.
    tag = re.search(r"network namespace swlab-(\w+)-n1", demo.output)
    assert tag, demo.output
    others = re.compile(rf"^(swlab-(?!{tag[1]})\w+-|sw(?!{tag[1]})\w+v\d)")
    left += [f"link {name}" for name in _links() - before[0] if not others.match(name)]
    left += [f"namespace {name}" for name in _namespaces() - before[1]
             if not others.match(name)]
    return left


def test_the_demo_unlocks_each_restart_and_ctrl_c_removes_everything(
        host: tuple[set[str], set[str]]) -> None:
    demo = Running()
    try:
        demo.wait_for("dockerd: back, swarm locked")
        demo.wait_for("agent: unlocked it")
        demo.wait_for("Enter restarts dockerd again")
        assert demo.process.stdin is not None
        demo.process.stdin.write("\n")
        demo.process.stdin.flush()
        demo.wait_for("agent: unlocked it", count=2)
        demo.wait_for("Enter restarts dockerd again", count=2)
        demo.process.send_signal(signal.SIGINT)
        assert demo.finish() == 130, demo.output
    finally:
        demo.stop()
    assert "demo: done; everything it started is gone" in demo.output
    assert "Traceback" not in demo.output
    (shown,) = readme_blocks("See it work", language="text")
    for line in shown:  # README's sample, figures aside, is what the demo prints
        pattern = re.sub(r"\\ *[0-9]+(\\.[0-9]+)?", r"\\s*[0-9.]+", re.escape(line))
        assert any(re.fullmatch(pattern, said) for said in demo.lines), line
    assert _left_behind(demo, host) == []


def test_the_custodian_demo_waits_for_the_approve_it_prints_then_unlocks(
        host: tuple[set[str], set[str]]) -> None:
    demo = Running("--custodians", "--once")
    try:
        demo.wait_for("the policy waits for custodian alice")
        command = shlex.split(demo.wait_for("escrow approve"))
        time.sleep(1)
        assert "agent: unlocked it" not in demo.output  # alice has not approved yet
        env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
        approved = subprocess.run([*command, "--yes"], capture_output=True, text=True, env=env,
                                  timeout=60, check=False)
        assert approved.returncode == 0, approved.stderr
        assert "1 approved, 0 refused" in approved.stdout
        assert demo.finish() == 0, demo.output
    finally:
        demo.stop()
    assert "agent: unlocked it" in demo.output
    assert _left_behind(demo, host) == []
