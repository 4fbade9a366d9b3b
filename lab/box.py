"""A booted Debian box with a real systemd as PID 1, to prove our units where operators run them.

The recipe is docs/design.md, "The lab": a debootstrap image cached as a
tarball under /var/tmp, unpacked afresh for every box and booted with `systemd-nspawn -b` on an
overlay root (so every boot starts from the pristine image; a box made with `rebootable=True`
writes into its own unpacked copy instead, so that `reboot()` finds what was installed), loopback
only, with an ext4 directory bound at /var/lib/docker because
docker's overlay2 cannot sit on an overlay root. Teardown powers the box off and removes what
nspawn leaves on the host (cgroups, `/run/systemd/nspawn/propagate/NAME`), even after a failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "docker.io", "python3", "python3-venv",
            "softhsm2", "iproute2", "procps", "curl", "postgresql", "faketime")
# Changes to how the unpacked image is adjusted: bump to rebuild the cached tarball.
IMAGE_REVISION = 1
CACHE_DIR = Path("/var/tmp/swarm-unseal-box")
# Debian's docker with no network of its own: the box has loopback only.
DOCKER_DAEMON_JSON = {"bridge": "none", "iptables": False, "ip-forward": False,
                      "ip-masq": False}
NSPAWN_ENV = {"SYSTEMD_SECCOMP": "0", "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
CGROUP_ROOT = Path("/sys/fs/cgroup")
NSPAWN_RUN = Path("/run/systemd/nspawn")


class BoxError(Exception):
    """The box could not be built, booted or driven."""


def _mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        match = re.search(r"^URIs:\s*(\S+/debian)\s*$", sources.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


def image_path() -> Path:
    key = hashlib.sha256(json.dumps([SUITE, PACKAGES, IMAGE_REVISION,
                                     DOCKER_DAEMON_JSON]).encode()).hexdigest()[:16]
    return CACHE_DIR / f"{SUITE}-{key}.tar"


def image() -> Path:
    """The cached image tarball, built first if its package list or revision changed."""
    tarball = image_path()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        for stale in CACHE_DIR.glob(f"{SUITE}-*.tar"):
            stale.unlink()
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
            rootfs = Path(tmp) / "rootfs"
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                  SUITE, str(rootfs), _mirror()], timeout=900)
            # Empty: systemd makes a fresh machine id on every boot of the overlay.
            (rootfs / "etc/machine-id").write_text("")
            (rootfs / "etc/docker").mkdir(exist_ok=True)
            (rootfs / "etc/docker/daemon.json").write_text(json.dumps(DOCKER_DAEMON_JSON))
            # Only the hosts a test makes database servers run PostgreSQL (they enable it).
            (rootfs / "etc/systemd/system/multi-user.target.wants/postgresql.service").unlink()
            partial = tarball.with_suffix(".partial")
            _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
                 timeout=600)
            partial.rename(tarball)
    return tarball


def _run(argv: Sequence[str], timeout: float) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise BoxError(f"{argv[0]} failed ({result.returncode}): {result.stderr[-2000:]}")


class Box:
    """One booted box: `boot()`, `run()` commands inside, `poweroff()` (always, in a finally)."""

    PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    def __init__(self, name: str, workdir: Path, binds_ro: dict[Path, str] | None = None,
                 *, rebootable: bool = False, netns: str | None = None) -> None:
        self.name = name
        self.rebootable = rebootable
        # A named network namespace (a NetLab node's) instead of loopback only.
        self.netns = netns
        self.workdir = workdir
        self.rootfs = workdir / "rootfs"
        # On the host's ext4: docker's overlay2 cannot sit on the box's overlay root.
        self.docker_dir = workdir / "var-lib-docker"
        self.console = workdir / "console.log"
        self.binds_ro = binds_ro or {}
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    @property
    def cgroups(self) -> list[Path]:
        """The box's own cgroups on the host: in the named systemd and the unified hierarchy
        of a hybrid host (this machine kind), or in the one hierarchy of a unified host."""
        if (CGROUP_ROOT / "cgroup.controllers").exists():
            return [CGROUP_ROOT / self.name]
        return [CGROUP_ROOT / h / self.name for h in ("systemd", "unified")
                if (CGROUP_ROOT / h).is_dir()]

    def boot(self, timeout: float = 60) -> None:
        self.rootfs.mkdir(parents=True)
        self.docker_dir.mkdir()
        _run(["tar", "--numeric-owner", "-xpf", str(image()), "-C", str(self.rootfs)],
             timeout=300)
        # debootstrap copied the build host's name; every box is a host of its own name.
        (self.rootfs / "etc/hostname").write_text(self.name + "\n")
        self._start(timeout)

    def boot_copy_of(self, original: Box, timeout: float = 60) -> None:
        """Boot a copy of another box's disk taken while it runs, as a snapshot of a virtual
        machine's disk would be: its host name, node certificate, agent key and all."""
        assert self.rebootable, "an overlay root forgets the copy at poweroff"
        assert original.rebootable, "an overlay root has no disk of its own to copy"
        self.workdir.mkdir(parents=True, exist_ok=True)
        for disk, copy in ((original.rootfs, self.rootfs), (original.docker_dir,
                                                            self.docker_dir)):
            _run(["cp", "-a", "--reflink=auto", str(disk), str(copy)], timeout=300)
        self._start(timeout)

    def reboot(self, timeout: float = 60) -> float:
        """Power off and boot again what was installed (a `rebootable` box only); returns the
        host's monotonic clock when the new boot began, the clock the box's systemd uses."""
        assert self.rebootable, "an overlay root forgets everything at poweroff"
        self._halt()
        return self.power_on(timeout)

    def cut_power(self) -> None:
        """Every process of the box killed at once, as a power cut stops a host (no shutdown,
        no goodbye); `power_on()` boots it again (a `rebootable` box only)."""
        assert self.rebootable, "an overlay root forgets everything at poweroff"
        for cgroup in self.cgroups:
            if (cgroup / "cgroup.kill").exists():
                (cgroup / "cgroup.kill").write_text("1")
                continue
            for procs in cgroup.rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        self._halt()

    def power_on(self, timeout: float = 60) -> float:
        """Boot a box that was powered off; returns the host's monotonic clock at the start."""
        started = time.monotonic()
        self._start(timeout)
        return started

    def _start(self, timeout: float) -> None:
        self.pid1 = 0
        for cgroup in self.cgroups:
            cgroup.mkdir()
        # nspawn's --keep-unit from the host's root cgroup would leave payload/ and supervisor/
        # there for the next box to collide with: start it in a cgroup of its own.
        enter = " ".join(f"echo $$ > {c}/cgroup.procs;" for c in self.cgroups)
        argv = ["sh", "-c", enter + ' exec "$@"', "sh", "systemd-nspawn", "-D", str(self.rootfs),
                "-b", "-M", self.name, "--register=no", "--keep-unit",
                "--private-network" if self.netns is None
                else f"--network-namespace-path=/run/netns/{self.netns}",
                "--console=read-only", "--link-journal=no", "--resolv-conf=off",
                "--timezone=off", f"--bind={self.docker_dir}:/var/lib/docker"]
        if not self.rebootable:
            argv.append("--volatile=overlay")
        argv += [f"--bind-ro={host}:{inside}" for host, inside in self.binds_ro.items()]
        with open(self.console, "wb") as console:
            self.nspawn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                           stderr=subprocess.STDOUT, start_new_session=True,
                                           env={**os.environ, **NSPAWN_ENV})
        deadline = time.monotonic() + timeout
        while not self.pid1:
            if self.nspawn.poll() is not None or time.monotonic() > deadline:
                raise BoxError(f"box {self.name} did not start: {self.console_tail()}")
            self.pid1 = self._find_pid1()
            time.sleep(0.05)
        while True:
            # Fails at once until the box's D-Bus and systemd answer; --wait then waits for boot.
            state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                             timeout=max(1, deadline - time.monotonic()))
            if state.stdout.strip() in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise BoxError(f"box {self.name} did not come up ({state.stdout.strip()} "
                               f"{state.stderr.strip()}): {self.console_tail()}")
            time.sleep(0.1)

    def _find_pid1(self) -> int:
        """The box's init: a descendant of nspawn that is PID 1 in its own PID namespace."""
        assert self.nspawn is not None
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError):
                fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                              if ":\t" in line)
                nspid = fields.get("NSpid", "").split()
                if len(nspid) == 2 and nspid[1] == "1" and self._descends_from_nspawn(
                        int(nspid[0])):
                    return int(nspid[0])
        return 0

    def _descends_from_nspawn(self, pid: int) -> bool:
        assert self.nspawn is not None
        while pid > 1:
            if pid == self.nspawn.pid:
                return True
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                return False
        return False

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None, stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the box as root (in all its namespaces), in /root, with
        `stdin` as its standard input (none otherwise)."""
        command = ["nsenter", "-t", str(self.pid1), "-a", "--", "sh", "-c",
                   'cd /root && exec "$@"', "sh", *argv]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False,
            input=stdin or "",
            env={"PATH": self.PATH, "LANG": "C.UTF-8", "HOME": "/root", **(env or {})})
        if check and result.returncode != 0:
            raise BoxError(f"in box {self.name}: {' '.join(argv)} exited {result.returncode}:"
                           f"\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-ec", script])

    def console_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.console.read_text(errors="replace")[-3000:]
        return ""

    def poweroff(self, timeout: float = 60) -> None:
        """Power the box off (SIGRTMIN+4 to its init), kill what is left, clean the host."""
        self._halt(timeout)
        shutil.rmtree(self.rootfs, ignore_errors=True)
        shutil.rmtree(self.docker_dir, ignore_errors=True)

    def _halt(self, timeout: float = 60) -> None:
        if self.nspawn is not None:
            if self.nspawn.poll() is None and self.pid1:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid1, signal.SIGRTMIN + 4)
            try:
                self.nspawn.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait(timeout=30)
        for cgroup in self.cgroups:
            _remove_cgroup(cgroup)
        shutil.rmtree(NSPAWN_RUN / "propagate" / self.name, ignore_errors=True)
        # nspawn makes these for itself; they stay only while another container uses them.
        for directory in (NSPAWN_RUN / "propagate", NSPAWN_RUN / "locks", NSPAWN_RUN):
            with contextlib.suppress(OSError):
                directory.rmdir()

    def leftovers(self) -> list[str]:
        """What the box left on the host; empty after a clean poweroff."""
        found = [str(c) for c in self.cgroups if c.exists()]
        propagate = NSPAWN_RUN / "propagate" / self.name
        if propagate.exists():
            found.append(str(propagate))
        if self.nspawn is not None and self.nspawn.poll() is None:
            found.append(f"systemd-nspawn pid {self.nspawn.pid}")
        if self.pid1 and Path(f"/proc/{self.pid1}").exists():
            found.append(f"box init pid {self.pid1}")
        mounts = Path("/proc/self/mountinfo").read_text()
        found += [line.split()[4] for line in mounts.splitlines()
                  if str(self.workdir) in line.split()[4]]
        return found


def _remove_cgroup(cgroup: Path) -> None:
    """Remove a cgroup tree, deepest first, killing any process of the box still in it."""
    if not cgroup.exists():
        return
    nested = sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for directory in [*nested, cgroup]:
        for _ in range(50):
            procs = (directory / "cgroup.procs").read_text().split()
            for pid in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            try:
                directory.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@contextlib.contextmanager
def booted(box: Box) -> Iterator[Box]:
    """The box, booted, and powered off again however the block ends."""
    try:
        box.boot()
        yield box
    finally:
        box.poweroff()
