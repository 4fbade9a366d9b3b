"""Two `escrow serve` replicas on one PostgreSQL database, as README's "Run several replicas"
makes them: any replica answers any step of a request, decisions through one wake the long polls
of the other, and a replica is only made with the same wrapping key."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from agent.errors import AgentError
from agent.release import candidate_keys
from escrow import audit
from escrow.core.unlockkey import UnlockKey
from escrow.store.postgres import PostgresStore
from lab import api, replica_storm
from lab.commands import readme_scripts, run_escrow, run_script
from lab.net import free_port
from lab.pg_replication import primary_and_standby
from lab.postgres import Server
from lab.server import BOOT_ID, EscrowProcess, Node, make_escrow, make_replica
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


def test_a_join_refuses_a_copied_pin_that_every_user_can_read(
        postgres: Server, tmp_path: Path) -> None:
    with postgres.database() as name:
        url, password = postgres.url(name), str(postgres.password_file)
        first = make_escrow(tmp_path / "a", "--store-url", url, "--store-password-file",
                            password)
        copy = tmp_path / "copy"
        copy.mkdir()
        pin = copy / "hsm-pin"
        pin.write_bytes((first.data_dir / "hsm-pin").read_bytes())
        pin.chmod(0o644)
        joined = run_escrow("init", "--data-dir", str(tmp_path / "b"), "--store-url", url,
                            "--store-password-file", password, "--join", "--token-from",
                            str(first.data_dir / "softhsm"), "--hsm-pin-file", str(pin))
        fails(joined, 1, "readable or writable by every user", f"chmod 600 {pin}")
        assert pin.read_text().strip() not in joined.stdout + joined.stderr
        assert not (tmp_path / "b" / "escrow.toml").exists()


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


def test_replicas_find_a_promoted_standby_by_themselves_and_lose_nothing_acknowledged(
        tmp_path: Path) -> None:
    with primary_and_standby() as pair:
        with pair.primary.connect() as admin:
            admin.execute("CREATE DATABASE escrow")
        url = pair.url("escrow")
        first = make_escrow(tmp_path / "a", "--store-url", url, "--store-password-file",
                            str(pair.primary.password_file))
        second = make_replica(first, tmp_path / "b", url, pair.primary.password_file)
        first.start()
        try:
            second.start()
            try:
                # Acknowledged before the switch: synchronous commit put it on the standby.
                _, node, key = api.enrolled(first, slots="auto,auto")
                pair.lose_primary()
                pair.promote()
                promoted = time.monotonic()
                refusals = _until_unsealed(second, node, key)
                print(f"\nstandby promoted -> unsealed through a replica: "
                      f"{time.monotonic() - promoted:.2f} s, {len(refusals)} refusals")
                assert all("(503)" in refusal for refusal in refusals), refusals
                assert api.run(api.unseal(first, node)) == [(1, key)]
                assert second.health()[1]["writable"] is True
                ok(first.cli("audit", "verify"))
            finally:
                second.stop()
        finally:
            first.stop()
        assert "Traceback" not in first.log() + second.log()


def _until_unsealed(escrow: EscrowProcess, node: Node, key: UnlockKey) -> list[str]:
    """Unseal as an agent retrying would, until it works (60 s at most); the refusals met."""
    refusals: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            rebuilt = api.run(api.unseal(escrow, node))
        except AgentError as exc:
            refusals.append(exc.message)
            time.sleep(0.5)
            continue
        assert rebuilt == [(1, key)]
        return refusals
    raise AssertionError(f"never unsealed: {refusals[-3:]}")


def test_readme_s_commands_make_a_replica_that_serves_the_same_escrow(
        postgres: Server, tmp_path: Path) -> None:
    with postgres.database() as name:
        url = postgres.url(name)
        first = make_escrow(tmp_path / "a", "--store-url", url, "--store-password-file",
                            str(postgres.password_file))
        second = EscrowProcess(tmp_path / "b", free_port(), first.env)
        bundle = tmp_path / "escrow-ca.pem"
        common = {"postgresql://escrow@db.example/escrow": url,
                  "/etc/escrow/store-password": str(postgres.password_file),
                  "/root/escrow-token": str(tmp_path / "token"),
                  "escrow-1-ca.pem": str(first.ca), "escrow-2-ca.pem": str(second.ca),
                  "> escrow-ca.pem": f"> {bundle}"}
        on_first = readme_scripts("Run several replicas", 3,
                                  {**common, "/var/lib/escrow": str(first.data_dir)})
        on_second = readme_scripts("Run several replicas", 3,
                                   {**common, "/var/lib/escrow": str(second.data_dir)})
        assert len(on_first) == 3
        for script in (on_first[0], on_second[1], on_second[2]):
            ok(run_script(script, tmp_path))
        assert not (tmp_path / "token").exists()
        assert not (tmp_path / "token.tgz").exists()
        first.start()
        try:
            second.start()
            try:
                _, node, key = api.enrolled(first, slots="auto,auto")
                assert api.run(api.unseal(second, node)) == [(1, key)]
                assert bundle.read_text() == first.ca.read_text() + second.ca.read_text()
            finally:
                second.stop()
        finally:
            first.stop()


AGENTS = 200


def test_two_hundred_agents_unseal_through_two_replicas_while_one_is_killed(
        replicas: list[EscrowProcess], tmp_path: Path) -> None:
    first, second = replicas
    fleet = replica_storm.fleet(replicas, AGENTS, tmp_path)

    def kill() -> None:
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)

    storm = api.run(replica_storm.run(fleet.nodes, replicas, fleet.ca, kill))

    assert storm.done == {index: [(1, fleet.key)] for index in range(AGENTS)}
    refusals = [message for messages in storm.met.values() for message in messages]
    assert not any("(500)" in message for message in refusals), refusals
    cut = sorted(storm.seconds[i] for i in storm.in_flight if i % 2 == 0)
    assert cut  # the kill came in the middle of requests to the killed replica
    others = sorted(s for i, s in storm.seconds.items() if i % 2 == 1)
    print(f"\n{AGENTS} agents; replica killed with {len(cut)} of its agents mid-request, "
          f"{len(storm.met)} agents refused at least once; those unsealed in p50 "
          f"{cut[len(cut) // 2]:.2f} s, worst {cut[-1]:.2f} s (the other replica's agents: "
          f"p50 {others[len(others) // 2]:.2f} s, worst {others[-1]:.2f} s)")
    released = [(d["request_id"], share["version"], share["slot"])
                for _, d in second.audit("unseal.release") for share in d["shares"]]
    assert len(released) == len(set(released))  # never twice to one request
    ok(second.cli("audit", "verify"))


def test_two_hundred_agents_complete_through_two_replicas_while_postgresql_restarts(
        replicas: list[EscrowProcess], postgres: Server, tmp_path: Path) -> None:
    second = replicas[1]
    fleet = replica_storm.fleet(replicas, AGENTS, tmp_path)

    storm = api.run(replica_storm.run(fleet.nodes, replicas, fleet.ca, postgres.restart))

    assert storm.done == {index: [(1, fleet.key)] for index in range(AGENTS)}
    assert storm.in_flight
    refusals = [message for messages in storm.met.values() for message in messages]
    assert all("(503)" in message for message in refusals), refusals
    seconds = sorted(storm.seconds.values())
    print(f"\n{AGENTS} agents, PostgreSQL restarted with {len(storm.in_flight)} mid-request: "
          f"{len(storm.met)} refused at least once ({len(refusals)} 503s); unsealed in p50 "
          f"{seconds[len(seconds) // 2]:.2f} s, worst {seconds[-1]:.2f} s")
    ok(second.cli("audit", "verify"))
    for replica in replicas:
        assert replica.health()[0] == 200
