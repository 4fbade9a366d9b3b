"""A checkout of this repository and its own `escrow serve`, for the benchmarks that compare
two trees (bench/hostile_flood.py, bench/slow_clients.py).

Each checkout runs its own code: `python -m escrow` with DIR/.venv/bin/python if there is
one, else this Python, with cwd and PYTHONPATH set to DIR, checked first to import the escrow
from DIR (its `escrow.__file__` goes into the results).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lab.commands import terminate
from lab.net import free_port

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Checkout:
    """A source tree of the escrow, the Python that runs its code, and what git says it is."""

    role: str  # "baseline" or "current"
    path: Path
    python: str
    revision: str  # for the results
    escrow_file: str  # escrow.__file__ as that environment imports it

    @property
    def label(self) -> str:
        return f"{self.role} ({self.revision})"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment its commands run in: nothing escrow-related from ours (SoftHSM's
        config, ESCROW_* overrides), its own tree first on the import path, then ``extra``."""
        env = {k: v for k, v in os.environ.items()
               if k != "SOFTHSM2_CONF" and not k.startswith("ESCROW_")}
        env["PYTHONPATH"] = str(self.path)
        env.update(extra or {})
        return env

    def run_python(self, code: str) -> str:
        """What ``code`` prints, run by this checkout's Python in its environment."""
        result = subprocess.run([self.python, "-c", code], cwd=self.path, env=self.env(),
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{self.python} with PYTHONPATH={self.path} failed to run "
                             f"{code!r}:\n{result.stderr}")
        return result.stdout


def _git(path: Path, *args: str) -> str:
    # Read-only, and --no-optional-locks so it never takes the index lock from anyone else.
    result = subprocess.run(["git", "--no-optional-locks", "-C", str(path), *args],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def checkout(role: str, path: Path) -> Checkout:
    """``path`` as a checkout: its own .venv's Python if it has one, else this one, checked to
    import the escrow from ``path``."""
    path = path.resolve()
    if not (path / "escrow" / "__init__.py").is_file():
        raise SystemExit(f"{path} is not a checkout of this repository (no escrow/__init__.py)")
    own = path / ".venv" / "bin" / "python"
    found = Checkout(role, path, str(own) if own.exists() else sys.executable, "", "")
    escrow_file = found.run_python("import escrow; print(escrow.__file__)").strip()
    if not escrow_file or not Path(escrow_file).resolve().is_relative_to(path):
        raise SystemExit(f"{found.python} with PYTHONPATH={path} imports "
                         f"{escrow_file or 'nothing'}, not {path}'s escrow")
    commit = _git(path, "rev-parse", "--short", "HEAD") or "not a git checkout"
    changes = len(_git(path, "status", "--porcelain", "--untracked-files=normal").splitlines())
    revision = commit + (f" + {changes} uncommitted files" if changes else "")
    return Checkout(role, path, found.python, revision, escrow_file)


class Server:
    """A data directory in ``base`` and, while started, ``owner``'s own `escrow serve` of it
    on loopback (a free port each start), with ``extra_env`` on top of the checkout's
    environment."""

    def __init__(self, owner: Checkout, base: Path, extra_env: Mapping[str, str] | None = None,
                 label: str = "") -> None:
        self.owner = owner
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.data_dir = base / "data"
        self.extra_env = dict(extra_env or {})
        self.label = label or owner.label  # for error messages
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        # The address, not `localhost`, so no client tries ::1 first; the cert covers it.
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    @property
    def log(self) -> Path:
        """What `escrow serve` writes to stderr, every start of it."""
        return self.base / "serve.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def escrow(self, *args: str) -> None:
        """`escrow ARGS --data-dir DATA` with the checkout's code; RuntimeError if it fails."""
        result = subprocess.run(
            [self.owner.python, "-m", "escrow", *args, "--data-dir", str(self.data_dir)],
            cwd=self.owner.path, env=self.owner.env(self.extra_env), capture_output=True,
            text=True, check=False, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"escrow {args[0]} failed for {self.label}:\n{result.stderr}")

    def init(self) -> None:
        self.escrow("init")

    def start(self) -> None:
        """`escrow serve`, waited for until /healthz answers 200 (30 s at most)."""
        self.port = free_port()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.owner.python, "-m", "escrow", "serve", "--data-dir", str(self.data_dir),
                 "--listen", f"127.0.0.1:{self.port}"], cwd=self.owner.path,
                env=self.owner.env(self.extra_env), stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"escrow serve exited ({self.label}):\n"
                                   f"{self.log.read_text()}")
            try:
                if self.get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"escrow serve did not become healthy ({self.label}):\n"
                           f"{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
            self.process = None

    def get(self, path: str) -> tuple[int, bytes]:
        """``GET path`` on a connection of its own: the status and body; OSError while
        nothing answers."""
        context = ssl.create_default_context(cafile=str(self.ca))
        try:
            with urllib.request.urlopen(self.url + path, context=context,  # noqa: S310
                                        timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
