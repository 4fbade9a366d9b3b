"""Drill: the escrow's data directory fills up (a small tmpfs mounted as the data directory).

New keys are refused with 507 and nothing partial is stored; shares already escrowed are still
released; everything resumes by itself once space is freed.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import EscrowRejected, EscrowUnavailable
from escrow.core.unlockkey import UnlockKey
from escrow.diskspace import RESERVE_NAME
from lab.api import client, deposit, enroll, enrolled, run, unseal
from lab.server import EscrowProcess, make_escrow

pytestmark = pytest.mark.slow
RESERVE = 2 * 1024 * 1024
BOOT_ID = "0b0e6b5e-2f7a-4c1e-9a51-6d3c2a1f0e99"


def fill(directory: Path) -> Path:
    """Write a file until the file system says ENOSPC, in ever smaller pieces."""
    filler = directory / f"filler-{len(list(directory.glob('filler-*')))}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (1 << 20, 1 << 12, 1 << 9, 1):
            block = bytes(chunk)
            with pytest.raises(OSError, match="No space left") as full:  # noqa: PT012
                while True:
                    os.write(fd, block)
            assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def escrow(tmp_path: Path) -> Iterator[EscrowProcess]:
    data = tmp_path / "escrow" / "data"
    data.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "escrow-test", str(data)],
                   check=True)
    try:
        escrow = make_escrow(tmp_path / "escrow", ESCROW_SERVER_DISK_RESERVE_BYTES=str(RESERVE))
        escrow.custodian("alice")
        escrow.custodian("bob")
        escrow.start()
        try:
            yield escrow
        finally:
            escrow.stop()
    finally:
        subprocess.run(["umount", str(data)], check=True)


def versions(escrow: EscrowProcess, cluster_id: str) -> list[int]:
    listed = escrow.cli("key", "list", "--cluster", cluster_id, "--json")
    assert listed.returncode == 0, listed.stderr
    return [v["version"] for v in json.loads(listed.stdout)]


def test_a_full_data_disk_refuses_new_keys_cleanly_but_still_releases_and_then_recovers(
        escrow: EscrowProcess) -> None:
    cluster, node, first = enrolled(escrow)
    reserve = escrow.data_dir / RESERVE_NAME
    assert reserve.stat().st_blocks * 512 >= RESERVE
    filler = fill(escrow.data_dir)

    # New data is refused with a reason, and nothing of it is stored.
    with pytest.raises(EscrowUnavailable, match=r"\(507\): disk_full: the escrow's data "
                       r"directory .* is nearly full"):
        run(deposit(escrow, node, UnlockKey(os.urandom(32))))
    with pytest.raises(EscrowUnavailable, match="disk_full"):
        run(enroll(escrow, cluster.node()))
    assert not reserve.exists()  # its space went to releases
    assert versions(escrow, cluster.cluster_id) == [1]

    # Keys already escrowed are still released, audited in the reserve's space.
    assert run(unseal(escrow, node)) == [(1, first)]
    assert run(unseal(escrow, node)) == [(1, first)]

    # Even with the reserve used up, a release that cannot be recorded is refused cleanly.
    second_filler = fill(escrow.data_dir)
    with pytest.raises(EscrowUnavailable, match=r"\(507\): disk_full"):
        run(unseal(escrow, node))
    second_filler.unlink()

    # The refusals are logged, not audited: the reserve's space is for releases only.
    events = [(e, d.get("reason")) for e, d in escrow.audit()]
    assert ("deposit.refused", "disk_full") not in events
    assert "not audited for lack of disk space: deposit refused (disk_full)" in escrow.log()
    assert "not audited for lack of disk space: enroll refused (disk_full)" in escrow.log()
    assert escrow.cli("audit", "verify").returncode == 0

    filler.unlink()  # the operator frees space: everything resumes with no restart
    second = UnlockKey(os.urandom(32))
    assert run(deposit(escrow, node, second)) == 2
    assert reserve.exists()
    assert versions(escrow, cluster.cluster_id) == [2, 1]
    assert run(unseal(escrow, node)) == [(2, second), (1, first)]
    assert escrow.cli("audit", "verify").returncode == 0
    assert "released the 2097152-byte reserve for unseals" in escrow.log()


def test_an_unauthenticated_flood_on_a_full_disk_leaves_the_reserve_to_unseals(
        escrow: EscrowProcess) -> None:
    """The attack: refusals written row by row used up the space, the reserve went to them, and
    a legitimate unseal then got 507. Now a refusal before identification writes nothing."""
    cluster, node, first = enrolled(escrow)
    reserve = escrow.data_dir / RESERVE_NAME
    filler = fill(escrow.data_dir)
    stranger = cluster.node()  # never enrolled: every request of it fails identification

    async def flood() -> list[int]:
        async with client(escrow) as c:
            async def one() -> int:
                try:
                    await c.unseal(stranger.cluster_id, stranger.node_id, stranger.cert_pem,
                                   stranger.agent_key, stranger.hostname, BOOT_ID)
                except EscrowRejected as refused:
                    return refused.status
                return 201
            return list(await asyncio.gather(*(one() for _ in range(1_000))))

    statuses = run(flood())
    assert set(statuses) <= {403, 429}, set(statuses)
    assert reserve.exists()  # untouched by the flood
    assert run(unseal(escrow, node)) == [(1, first)]  # the reserve is spent on the release
    assert not reserve.exists()
    filler.unlink()
    assert escrow.cli("audit", "verify").returncode == 0
