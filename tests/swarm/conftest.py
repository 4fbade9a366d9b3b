"""The tests that start dockerd: managers in network namespaces of their own, swarms of them,
and node agents unlocking them. Every test here is marked ``swarm``, so `pytest -m "not
swarm"` runs the rest (SoftHSM, SQLite, the TLS server) on a machine without dockerd."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.dockerd import Dockerd
from lab.netlab import NetLab

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.swarm)


@pytest.fixture
def dockerd() -> Iterator[Dockerd]:
    """A started dockerd of this test's own in a network namespace of its own (swarm init
    creates docker_gwbridge and an ingress sandbox, which must not land in the host's
    namespace); afterwards nothing of it is left."""
    with NetLab(nodes=1) as lab:
        yield lab.start_daemon(0)


@pytest.fixture
def two_dockerds() -> Iterator[list[Dockerd]]:
    """Two started, unrelated dockerd, each in a namespace of its own (for two swarms)."""
    with NetLab(nodes=2) as lab:
        yield [lab.start_daemon(0), lab.start_daemon(1)]


@pytest.fixture
def three_managers() -> Iterator[list[Dockerd]]:
    """Three dockerd managers of one autolocked swarm, each in a network namespace of its own;
    afterwards nothing of them is left (teardown fails otherwise)."""
    with NetLab(nodes=3) as lab:
        yield lab.managers(3)
