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
    pids: tuple[int, ...]  # swtpm, dbus-daemon, tpm2-abrmd, stopped in reverse

    @property
    def state(self) -> Path:
        """The TPM's own persistent state (its seeds): the chip, on a real machine."""
        return self.directory / "state"

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
    directory.mkdir(mode=0o700, parents=True)
    state = directory / "state"
    if state_from is not None:
        shutil.copytree(state_from, state)
    else:
        state.mkdir(mode=0o700)
    pids: list[int] = []
    try:
        socket = directory / "tpm"
        pids.append(_daemon(directory / "swtpm.pid", [
            "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
            "--server", f"type=unixio,path={socket}",
            # The swtpm TCTI looks for the control channel beside the socket.
            "--ctrl", f"type=unixio,path={socket}.ctrl",
            "--flags", "not-need-init,startup-clear", "--daemon",
            "--pid", f"file={directory / 'swtpm.pid'}",
            "--log", f"file={directory / 'swtpm.log'}"]))
        (directory / "bus.conf").write_text(_BUS_CONFIG.format(socket=directory / "bus"))
        bus = subprocess.run(
            ["dbus-daemon", f"--config-file={directory / 'bus.conf'}", "--fork",
             "--print-pid"], capture_output=True, text=True, timeout=30, check=False)
        if bus.returncode:
            raise RuntimeError(f"dbus-daemon failed: {bus.stderr.strip()}")
        pids.append(int(bus.stdout.split()[0]))
        tpm = SoftwareTpm(directory, ())
        with (directory / "abrmd.log").open("ab") as log:
            abrmd = subprocess.Popen(
                ["tpm2-abrmd", "--session", "--allow-root", "--flush-all",
                 f"--tcti=swtpm:path={socket}"],
                env={**os.environ, **tpm.env}, stdout=log, stderr=log,
                stdin=subprocess.DEVNULL)
        pids.append(abrmd.pid)
        tpm = SoftwareTpm(directory, tuple(pids))
        _wait_answers(tpm, abrmd)
        yield tpm
    finally:
        for pid in reversed(pids):
            _stop(pid)


def _daemon(pid_file: Path, argv: list[str]) -> int:
    """Run a self-daemonizing `argv`; the pid it wrote to `pid_file`."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                          check=False)
    if done.returncode:
        raise RuntimeError(f"{argv[0]} failed: {done.stderr.strip()}")
    deadline = time.monotonic() + 10
    while not (text := pid_file.read_text().strip() if pid_file.exists() else ""):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{argv[0]} wrote no pid to {pid_file}")
        time.sleep(0.05)
    return int(text.split()[0])


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
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
