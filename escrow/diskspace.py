"""Room for releases when the data directory's disk fills up.

Releasing shares writes to the database too (the request, the release, their audit records),
so a disk filled by something else would stop the escrow from unlocking anything. The serving
escrow therefore holds ``disk-reserve``, a file of allocated blocks, and refuses *new* data
(deposits, enrollments) once free space falls below its size, deleting the file so the space
goes to releases and their audit records. Once free space is back to twice the reserve, the
file is made again and new data is accepted.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from escrow.core.errors import DiskFull

RESERVE_NAME = "disk-reserve"
log = logging.getLogger("escrow.diskspace")


class Reserve:
    def __init__(self, data_dir: Path, size: int) -> None:
        self.data_dir = data_dir
        self.path = data_dir / RESERVE_NAME
        self.size = size

    def free_bytes(self) -> int:
        stats = os.statvfs(self.data_dir)
        return stats.f_bavail * stats.f_frsize

    def held(self) -> bool:
        try:
            return self.path.stat().st_blocks * 512 >= self.size
        except FileNotFoundError:
            return False

    def make(self) -> bool:
        """Allocate the reserve if there is room for it and as much again. True when held."""
        if self.size == 0 or self.held():
            return True
        if self.free_bytes() < 2 * self.size:
            return False
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.size)  # real blocks: a sparse file frees nothing
            os.fsync(fd)
        except OSError:
            self.path.unlink(missing_ok=True)
            return False
        finally:
            os.close(fd)
        return True

    def release(self) -> None:
        """Give the reserve's space to releases."""
        if self.path.exists():
            log.error("the data directory %s is nearly full: released the %d-byte reserve for "
                      "unseals; deposits and enrollments are refused until space is freed",
                      self.data_dir, self.size)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def give_to_releases(self) -> None:
        """Before a release is recorded: once free space has run below the reserve, hand the
        reserve's space over, so the release never fails for want of room that was held back
        for it."""
        if self.size and self.held() and self.free_bytes() < self.size:
            self.release()

    def check_room(self) -> None:
        """Raise DiskFull unless new data may be written now, releasing the reserve when
        free space has run below it."""
        if self.size == 0:
            return
        if self.held() and self.free_bytes() >= self.size:
            return
        if not self.held() and self.make():
            log.warning("free space in %s is back; deposits and enrollments are accepted again",
                        self.data_dir)
            return
        self.release()
        raise DiskFull(
            f"the escrow's data directory {self.data_dir} is nearly full "
            f"({self.free_bytes() // 1024} KiB free): new keys and enrollments are refused so "
            "that unseals can still be recorded",
            "free space on its file system; deposits are accepted again by themselves once "
            f"{2 * self.size // 1024} KiB are free (agents retry)",
        )
