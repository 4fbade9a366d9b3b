"""libfaketime for a process of the laboratory: its wall clock moved by a fixed offset, or by
whatever a file says at each call (so a test moves a running escrow's clock). The monotonic
clock stays true, so timeouts and asyncio's timers are not moved with it."""

from __future__ import annotations

import glob
from pathlib import Path


def _library(root: Path = Path("/")) -> str:
    """The library's path on the machine whose file system is at ``root`` (a box's too)."""
    libraries = glob.glob(str(root / "usr/lib/*/faketime/libfaketime.so.1"))
    assert libraries, "libfaketime is missing: scripts/setup installs the faketime package"
    return "/" + str(Path(libraries[0]).relative_to(root))


def moved(offset: str, root: Path = Path("/")) -> dict[str, str]:
    """Environment that runs a process with its wall clock moved by ``offset`` ("-10m"), on
    the machine whose file system is at ``root``."""
    return {"LD_PRELOAD": _library(root), "FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1"}


def following(offset_file: Path) -> dict[str, str]:
    """Environment that runs a process with its wall clock moved by what ``offset_file``
    says ("+70"), re-read at every call; it starts at +0."""
    if not offset_file.exists():
        offset_file.write_text("+0\n")
    return {"LD_PRELOAD": _library(), "FAKETIME_TIMESTAMP_FILE": str(offset_file),
            "FAKETIME_NO_CACHE": "1", "DONT_FAKE_MONOTONIC": "1"}
