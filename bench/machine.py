"""Where and how a result was taken, for the first lines of every results file.

Figures mean little without the machine they came from: every benchmark here runs its load
generator on the same host as what it loads, so cores and CPU model bound both sides at once.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


@dataclass(frozen=True)
class Machine:
    hostname: str
    cores: int
    cpu_model: str
    ram_gib: float
    kernel: str
    virtualization: str
    python: str

    def brief(self) -> str:
        return (f"{self.hostname}: {self.cores} cores ({self.cpu_model}), "
                f"{self.ram_gib:.1f} GiB RAM, {self.virtualization}, Linux {self.kernel}, "
                f"Python {self.python}")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        # x86 says `model name`; some ARM kernels only say `Processor` or nothing at all.
        name, _, value = line.partition(":")
        if name.strip() in ("model name", "Processor") and value.strip():
            return value.strip()
    return platform.machine()


def _ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2
    raise ValueError("/proc/meminfo has no MemTotal")


def _virtualization() -> str:
    """What systemd-detect-virt finds, VM and container apart: a VM's vCPUs and a container's
    limits both change what the figures mean."""
    tool = shutil.which("systemd-detect-virt")
    if tool is None:
        return "virtualization unknown (no systemd-detect-virt)"
    found = []
    for kind in ("vm", "container"):
        answer = subprocess.run([tool, f"--{kind}"], capture_output=True, text=True,
                                check=False).stdout.strip()
        if answer and answer != "none":
            found.append(f"{answer} {kind}")
    return ", ".join(found) or "bare metal"


def this_machine() -> Machine:
    return Machine(platform.node(), os.cpu_count() or 0, _cpu_model(), _ram_gib(),
                   platform.release(), _virtualization(), platform.python_version())


def invocation(module: str) -> str:
    """The command line that ran this process, as it would be typed at the repository root."""
    return shlex.join([".venv/bin/python", "-m", module, *sys.argv[1:]])


def preamble(title: str, machine: Machine, command: str) -> str:
    return (f"# {title}\n\nTaken {datetime.now(UTC):%Y-%m-%d} by `{command}` on "
            f"{machine.brief()}.\n")
