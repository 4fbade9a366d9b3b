"""One booted Debian box per module with the escrow and the agent installed as README says.

The box has no network: wheels are built on the host and installed offline inside, exactly as
README's "Install with systemd" tells an operator, whose shell blocks are read from README and
run line by line, so README and this test cannot drift apart.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.box import Box, booted
from lab.box_site import Site, binds, build_wheels, install
from tests.conftest import record


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheels(tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="module")
def site(wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp("box")
    started = time.monotonic()
    # Rebootable: the last test boots it again with everything installed.
    with booted(Box(f"unseal-box-{os.getpid()}", workdir, binds(wheels),
                    rebootable=True)) as box:
        record("box: unpack the image and boot to running", time.monotonic() - started)
        site = Site(box)
        installed = time.monotonic()
        install(site)
        record("install as README says (venv, escrow, swarm, enrolled agent)",
               time.monotonic() - installed)
        yield site
    assert box.leftovers() == [], f"the box left {box.leftovers()} on the host"
