"""Files replaced whole: a crash leaves the old file or the new one, never part of either."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_new(temporary: Path, path: Path) -> None:
    try:
        os.link(temporary, path)  # unlike a rename, never replaces an existing file
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if path.exists():
            raise FileExistsError(f"{path} already exists") from None
        os.replace(temporary, path)


@contextmanager
def atomic_file(path: Path, mode: int = 0o600, *, new: bool = False) -> Iterator[BinaryIO]:
    """A handle on a temporary file beside ``path`` that becomes ``path`` (with ``mode``) when
    the block ends: synced, moved into place, the directory synced. If the block raises, the
    temporary file goes and ``path`` is untouched. With ``new``, an existing ``path`` is never
    replaced (FileExistsError), not even one created while the block ran."""
    # A random name made with O_EXCL: a stale or planted file of the same name (a symlink
    # elsewhere) is never opened, and a crash's leftover never blocks the next write.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if new:
            _link_new(temporary, path)
        else:
            os.replace(temporary, path)
        _fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, new: bool = False) -> None:
    """Write ``data`` to ``path`` as :func:`atomic_file` does (with ``new``, never over an
    existing file). Every key file is written so: a crash leaves the old file or the new one,
    never half a key, and a new key never replaces one that may still be registered."""
    with atomic_file(path, mode, new=new) as handle:
        handle.write(data)
