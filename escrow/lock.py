"""The data directory's serving lock: one `escrow serve` per data directory, and commands that
rewrite every share (`escrow hsm rewrap`) only while none serves.

An advisory ``flock`` on ``serve.lock``: the kernel drops it when its holder dies, so a
SIGKILLed server never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from escrow.core.errors import ConfigError

LOCK_NAME = "serve.lock"


class DataDirLock:
    def __init__(self, data_dir: Path, purpose: str) -> None:
        self.path = data_dir / LOCK_NAME
        self.purpose = purpose
        self._fd: int | None = None

    def __enter__(self) -> DataDirLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open the lock file {self.path}: {exc.strerror}",
                              "run as the escrow's user (runuser -u escrow -- escrow ...)"
                              ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{self.path.parent} is in use by {holder}, so it cannot be used for "
                f"{self.purpose}",
                "stop the escrow first (`systemctl stop escrow`), or wait for the other "
                "command to finish",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.purpose} (pid {os.getpid()})\n".encode("ascii"), 0)
        self._fd = fd
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the flock
            self._fd = None
