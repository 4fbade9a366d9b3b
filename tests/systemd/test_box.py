"""The test box itself: pristine on every boot, and nothing left on the host afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab.box import Box, booted

pytestmark = [pytest.mark.slow, pytest.mark.systemd]


def write_and_fail(box: Box) -> None:
    box.run(["sh", "-c", "echo changed > /etc/marker"])
    assert box.run(["cat", "/etc/marker"]).stdout == "changed\n"
    # The overlay root takes every write; the unpacked image stays as it was.
    assert not (box.rootfs / "etc/marker").exists()
    raise RuntimeError("a failing test")


def test_a_box_writes_nothing_into_its_image_and_leaves_nothing_even_when_a_test_fails(
        tmp_path: Path) -> None:
    box = Box(f"unseal-fail-{os.getpid()}", tmp_path)
    with pytest.raises(RuntimeError, match="a failing test"), booted(box) as running:
        write_and_fail(running)
    assert box.leftovers() == []
    assert not box.rootfs.exists()
