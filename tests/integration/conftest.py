"""Fixtures shared by the integration tests that run a real escrow next to real managers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.server import EscrowProcess, make_escrow


@pytest.fixture
def escrow(tmp_path: Path) -> Iterator[EscrowProcess]:
    """A running `escrow serve` of this test's own, with custodians alice and bob."""
    server = make_escrow(tmp_path / "escrow")
    for name in ("alice", "bob"):
        server.custodian(name)
    server.start()
    yield server
    server.stop()
