"""A TPM 2.0 of the test's own: Debian's `swtpm` (a software TPM speaking the real TPM 2.0
protocol, its state in a directory), behind `tpm2-abrmd`, the userspace resource manager, on a
D-Bus of its own. Without a resource manager every process's transient objects would stay
loaded in the TPM after it exits (the kernel's /dev/tpmrm0 flushes them on a real machine), and
three agents later the TPM would be full. Nothing of the host is used: no /dev/tpm*, no system
bus; everything lives in the directory and is stopped by its own pid on exit.

`env` is what a process needs to reach it through tpm2-pkcs11 (and tpm2-tools); the
tpm2-pkcs11 store (the token's sqlite database, which holds keys wrapped by this TPM) is named
apart, since on a manager it lives on the disk that a copy takes along.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lab.commands import terminate
from lab.netlab import alive, wait_for

MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so"
_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@dataclass(frozen=True)
class SoftwareTpm:
    directory: Path

    @property
    def state(self) -> Path:
        """The TPM's own persistent state (its seeds): the chip, on a real machine."""
        return self.directory / "state"

    @property
    def socket(self) -> Path:
        return self.directory / "tpm"

    @property
    def env(self) -> dict[str, str]:
        bus = f"unix:path={self.directory / 'bus'}"
        tcti = "tabrmd:bus_type=session"
        return {"DBUS_SESSION_BUS_ADDRESS": bus, "TPM2_PKCS11_TCTI": tcti,
                "TPM2TOOLS_TCTI": tcti}


def installed() -> bool:
    return all(shutil.which(tool) for tool in ("swtpm", "tpm2-abrmd", "dbus-daemon")) and \
        Path(MODULE).exists()


@contextlib.contextmanager
def software_tpm(directory: Path, state_from: Path | None = None) -> Iterator[SoftwareTpm]:
    """A running TPM in `directory` (made here), with a fresh state, or a copy of
    `state_from` (another SoftwareTpm's `state`, as if the chip itself were copied)."""
    if not installed():
        raise RuntimeError("swtpm, tpm2-abrmd or tpm2-pkcs11 is missing: run ./scripts/setup")
    tpm = SoftwareTpm(directory)
    directory.mkdir(mode=0o700, parents=True)
    if state_from is not None:
        shutil.copytree(state_from, tpm.state)
    else:
        tpm.state.mkdir(mode=0o700)
    daemons: list[int] = []  # swtpm and dbus-daemon, which fork away: not our children
    abrmd: subprocess.Popen[bytes] | None = None
    try:
        daemons.append(_start_swtpm(tpm))
        daemons.append(_start_bus(tpm))
        with (directory / "abrmd.log").open("ab") as log:
            abrmd = subprocess.Popen(
                ["tpm2-abrmd", "--session", "--allow-root", "--flush-all",
                 f"--tcti=swtpm:path={tpm.socket}"],
                env={**os.environ, **tpm.env}, stdout=log, stderr=log,
                stdin=subprocess.DEVNULL)
        _wait_answers(tpm, abrmd)
        yield tpm
    finally:
        if abrmd is not None:
            terminate(abrmd)
        for pid in reversed(daemons):
            _stop(pid)


def _start_swtpm(tpm: SoftwareTpm) -> int:
    """swtpm on a unix socket, daemonized; its pid, from the file it writes."""
    pid_file = tpm.directory / "swtpm.pid"
    done = subprocess.run(
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={tpm.state}",
         "--server", f"type=unixio,path={tpm.socket}",
         # The swtpm TCTI looks for the control channel beside the socket.
         "--ctrl", f"type=unixio,path={tpm.socket}.ctrl",
         "--flags", "not-need-init,startup-clear", "--daemon",
         "--pid", f"file={pid_file}", "--log", f"file={tpm.directory / 'swtpm.log'}"],
        capture_output=True, text=True, timeout=30, check=False)
    if done.returncode:
        raise RuntimeError(f"swtpm failed: {done.stderr.strip()}")
    wait_for(lambda: bool(pid_file.read_text().strip()), 10, f"swtpm's pid in {pid_file}")
    return int(pid_file.read_text().split()[0])


def _start_bus(tpm: SoftwareTpm) -> int:
    """A D-Bus of the TPM's own for tpm2-abrmd; its pid (it forks and prints it)."""
    config = tpm.directory / "bus.conf"
    config.write_text(_BUS_CONFIG.format(socket=tpm.directory / "bus"))
    bus = subprocess.run(["dbus-daemon", f"--config-file={config}", "--fork", "--print-pid"],
                         capture_output=True, text=True, timeout=30, check=False)
    if bus.returncode:
        raise RuntimeError(f"dbus-daemon failed: {bus.stderr.strip()}")
    return int(bus.stdout.split()[0])


def _wait_answers(tpm: SoftwareTpm, abrmd: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while True:
        probe = subprocess.run(["tpm2_getcap", "properties-fixed"],
                               capture_output=True, env={**os.environ, **tpm.env},
                               timeout=20, check=False)
        if probe.returncode == 0:
            return
        if abrmd.poll() is not None or time.monotonic() > deadline:
            log = (tpm.directory / "abrmd.log").read_text(errors="replace")
            raise RuntimeError(f"the software TPM did not answer: {log[-2000:]}")
        time.sleep(0.2)


def _stop(pid: int) -> None:
    """SIGTERM to a daemon that is not our child, up to 10 s to go, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        wait_for(lambda: not alive(pid), 10, f"pid {pid} gone")
    except AssertionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
