"""Two `escrow serve` replicas on one PostgreSQL database, as README's "Run several replicas"
makes them: any replica answers any step of a request, decisions through one wake the long polls
of the other, and a replica is only made with the same wrapping key."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agent.release import candidate_keys
from escrow import audit
from escrow.core.unlockkey import UnlockKey
from escrow.store.postgres import PostgresStore
from lab import api
from lab.commands import run_escrow
from lab.postgres import Server
from lab.server import BOOT_ID, EscrowProcess, make_escrow
from tests.conftest import fails, ok


def test_a_key_deposited_through_one_replica_is_unsealed_through_the_other(
        replicas: list[EscrowProcess]) -> None:
    first, second = replicas
    _, node, key = api.enrolled(first, slots="auto,auto")
    assert api.run(api.unseal(second, node)) == [(1, key)]
    status, body = second.health()
    assert status == 200
    assert body == {"status": "ok", "store": "postgresql", "writable": True}
    ok(second.cli("audit", "verify"))
    inits = [d for e, d in first.audit("escrow.init")]
    assert [d["wrapping_key"] for d in inits] == ["created", "joined"]
    assert len(first.audit("escrow.deposit-key")) == 1  # one deposit key for both


def test_an_approval_through_one_replica_wakes_a_long_poll_on_the_other_within_a_second(
        replicas: list[EscrowProcess]) -> None:
    first, second = replicas
    _, node, key = api.enrolled(first, slots="auto,alice,bob")

    async def approved_while_polling() -> tuple[list[tuple[int, UnlockKey]], float]:
        async with api.client(second) as client:
            pending, ephemeral = await client.unseal(
                node.cluster_id, node.node_id, node.cert_pem, node.agent_key, node.hostname,
                BOOT_ID)
            assert pending.state == "pending"
            poll = asyncio.ensure_future(client.poll(pending.request_id, wait=30))
            await asyncio.sleep(1.0)  # the poll waits on the second replica now
            approved = await asyncio.to_thread(
                first.as_custodian, "bob", "approve", pending.request_id, "--yes")
            decided = time.monotonic()
            assert approved.returncode == 0, approved.stderr
            status = await poll
            return list(candidate_keys(status, ephemeral)), time.monotonic() - decided

    keys, seconds = api.run(approved_while_polling())
    print(f"\napproval through one replica -> shares through the other: {seconds:.3f} s")
    assert keys == [(1, key)]
    assert seconds < 1.0


def test_a_replica_whose_token_holds_another_key_cannot_join(
        postgres: Server, tmp_path: Path) -> None:
    with postgres.database() as name:
        url, password = postgres.url(name), str(postgres.password_file)
        make_escrow(tmp_path / "a", "--store-url", url, "--store-password-file", password)
        stranger = make_escrow(tmp_path / "stranger")  # a token with a wrapping key of its own
        joined = run_escrow("init", "--data-dir", str(tmp_path / "b"), "--store-url", url,
                            "--store-password-file", password, "--join", "--token-from",
                            str(stranger.data_dir / "softhsm"))
        fails(joined, 1, "does not open the store's data", "first replica's token")
        assert not (tmp_path / "b" / "escrow.toml").exists()
        store = PostgresStore.open(url, postgres.password, lambda: "t")
        try:
            events = [r.event for r in store.iter_audit()]
            assert audit.verify(list(store.iter_audit())) == []
        finally:
            store.close()
        assert events.count("escrow.init") == 1


def test_joining_a_store_that_holds_no_escrow_is_refused(postgres: Server,
                                                        tmp_path: Path) -> None:
    first = make_escrow(tmp_path / "a")
    with postgres.database() as name:
        joined = run_escrow("init", "--data-dir", str(tmp_path / "b"), "--store-url",
                            postgres.url(name), "--store-password-file",
                            str(postgres.password_file), "--join", "--token-from",
                            str(first.data_dir / "softhsm"))
    fails(joined, 1, "holds no escrow to join", "without --join")
    assert not (tmp_path / "b").exists()
