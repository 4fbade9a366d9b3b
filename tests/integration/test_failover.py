"""The agent's client, `unseal-agent status` and the custodian CLI reach a real `escrow serve`
through a list of URLs whose first ones cannot take a request: a closed loopback port, a server
whose certificate the escrow's CA did not sign, and stand-ins that answer 503 with the escrow's
own certificate (lab/stand_ins.py); and an unseal request begun through one URL (a relay to
the escrow) goes on through the next when that one goes away, without starting over."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import cli as agent_cli
from agent.client import EscrowClient
from agent.release import candidate_keys
from escrow.core.tls import make_quickstart_tls
from escrow.core.unlockkey import UnlockKey
from lab.commands import run_escrow
from lab.net import free_port
from lab.server import BOOT_ID, EscrowProcess
from lab.stand_ins import UNAVAILABLE, Server, always, relaying, serving

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Broken:
    """URLs that cannot take a request, in the order a list names them, and the servers."""

    dead: str  # nothing listens
    untrusted: str  # a certificate of another CA
    unavailable: tuple[str, str]  # 503, with the escrow's own certificate
    untrusted_server: Server
    unavailable_servers: tuple[Server, Server]

    @property
    def urls(self) -> list[str]:
        return [self.dead, self.untrusted, *self.unavailable]


@contextlib.asynccontextmanager
async def broken(escrow: EscrowProcess, tmp_path: Path) -> AsyncIterator[Broken]:
    make_quickstart_tls(tmp_path / "stranger", ["localhost", "127.0.0.1"])
    async with serving(always(UNAVAILABLE), escrow.data_dir / "tls") as (first, first_url), \
            serving(always(UNAVAILABLE), escrow.data_dir / "tls") as (second, second_url), \
            serving(always(UNAVAILABLE), tmp_path / "stranger") as (stranger, stranger_url):
        yield Broken(f"https://localhost:{free_port()}", stranger_url,
                     (first_url, second_url), stranger, (first, second))


def as_custodian(escrow: EscrowProcess, name: str, urls: list[str],
                 *args: str) -> tuple[int, str, str]:
    """``escrow`` ARGS as custodian ``name``, with ESCROW_URL listing ``urls``."""
    result = run_escrow(*args, "--ca", str(escrow.ca), "--key", str(escrow.base / name),
                        "--passphrase-file", str(escrow.base / "pass"),
                        env={"ESCROW_URL": ",".join(urls), "ESCROW_DATA_DIR": os.devnull})
    return result.returncode, result.stdout, result.stderr


def test_an_unseal_begun_through_one_url_goes_on_through_the_next_when_that_one_goes_away(
        escrow: EscrowProcess, tmp_path: Path) -> None:
    cluster = escrow.cluster(2, "auto,alice", "--allow-no-paper-recovery")
    node = cluster.node()
    key = UnlockKey(os.urandom(32))

    async def scenario() -> None:
        async with broken(escrow, tmp_path) as bad, relaying(escrow.port) as relay, \
                EscrowClient([*bad.urls, relay.url, escrow.url], escrow.ca) as client:
            await client.enroll(node.cluster_id, node.node_id, node.cert_pem, node.cert.key,
                                node.agent_key, node.hostname)
            assert client.url == relay.url
            pinned = await client.deposit_key_sha256()
            deposited = await client.deposit(node.cluster_id, node.node_id, node.agent_key,
                                             key, pinned)
            assert deposited.version == 1
            status, ephemeral = await client.unseal(node.cluster_id, node.node_id,
                                                    node.cert_pem, node.agent_key,
                                                    node.hostname, BOOT_ID)
            assert (status.state, status.needed) == ("pending", 1)
            # The first call went round the broken URLs once; the others started at the
            # relay, where the first was answered.
            assert [s.requests for s in bad.unavailable_servers] == [1, 1]
            assert bad.untrusted_server.requests == 0

            await relay.cut()  # the replica that took the request goes away
            code, out, err = await asyncio.to_thread(
                as_custodian, escrow, "alice", [*bad.urls, escrow.url], "approve",
                status.request_id, "--yes")
            assert code == 0, err
            assert f"approved {status.request_id}" in out

            ready = await client.poll(status.request_id, wait=5)
            assert client.url == escrow.url
            assert ready.request_id == status.request_id
            assert (ready.state, ready.needed) == ("ready", 0)
            assert list(candidate_keys(ready, ephemeral)) == [(1, key)]

            await relay.restore()  # back, but no longer where calls start
            seen = relay.connections
            await client.report(status.request_id, node.node_id, node.agent_key, "unlocked", 1)
            assert (await client.poll(status.request_id)).state == "completed"
            assert relay.connections == seen
    asyncio.run(scenario())
    # One request, from its making to its result, though it went through two URLs.
    assert len({d["request_id"] for _, d in escrow.audit("unseal.")}) == 1
    assert len(escrow.audit("unseal.request")) == 1


def test_the_custodian_cli_signs_each_attempt_anew_and_reaches_the_escrow_through_the_list(
        escrow: EscrowProcess, tmp_path: Path) -> None:
    async def scenario() -> tuple[int, str, str, Broken]:
        async with broken(escrow, tmp_path) as bad:
            code, out, err = await asyncio.to_thread(
                as_custodian, escrow, "alice", [*bad.urls, escrow.url], "requests", "--json")
        return code, out, err, bad

    code, out, err, bad = asyncio.run(scenario())
    assert code == 0, err
    assert json.loads(out) == []
    first, second = bad.unavailable_servers
    assert (first.requests, second.requests, bad.untrusted_server.requests) == (1, 1, 0)
    # The escrow refuses a signed request it has seen (at any replica): each attempt carried
    # a nonce and a signature of its own.
    assert first.header(1, "X-Escrow-Nonce") != second.header(1, "X-Escrow-Nonce")
    assert first.header(1, "X-Escrow-Signature") != second.header(1, "X-Escrow-Signature")
    assert first.header(1, "X-Escrow-Key-Id") == second.header(1, "X-Escrow-Key-Id")


def test_the_custodian_cli_names_every_url_and_why_when_none_takes_the_request(
        escrow: EscrowProcess, tmp_path: Path) -> None:
    async def scenario() -> tuple[int, str, str, Broken]:
        async with broken(escrow, tmp_path) as bad:
            code, out, err = await asyncio.to_thread(
                as_custodian, escrow, "alice", bad.urls, "requests")
        return code, out, err, bad

    code, _, err, bad = asyncio.run(scenario())
    assert code == 1
    assert "error: no URL of the escrow could take the request: " in err
    assert f"the escrow at {bad.dead} is unreachable: " in err
    assert (f"the escrow at {bad.untrusted} presented a certificate this command does not "
            "trust: ") in err
    for url in bad.unavailable:
        assert (f"the escrow at {url} cannot serve now (503): unhealthy: the database is "
                "away") in err
    assert ("hint: check --url, --ca and that `escrow serve` runs; check --ca / ESCROW_CA: "
            "the escrow's tls/ca.pem, or the CA of its server.tls_cert; retry in a moment"
            ) in err


def test_agent_status_shows_every_url_and_the_one_that_answered(
        escrow: EscrowProcess, tmp_path: Path) -> None:
    dead = f"https://localhost:{free_port()}"
    config = tmp_path / "agent.toml"

    async def scenario() -> tuple[str, str, str]:
        async with serving(always(UNAVAILABLE), escrow.data_dir / "tls") as (_, unavailable):
            urls = [dead, unavailable, escrow.url]
            config.write_text(f"escrow_url = {json.dumps(urls)}\n"
                              f'escrow_ca = "{escrow.ca}"\n'
                              f'docker_host = "unix://{tmp_path}/no-docker.sock"\n'
                              f'state_dir = "{tmp_path / "state"}"\n')
            runner = CliRunner()
            as_json = await asyncio.to_thread(
                runner.invoke, agent_cli.cli, ["status", "--json", "--config", str(config)])
            text = await asyncio.to_thread(
                runner.invoke, agent_cli.cli, ["status", "--config", str(config)])
            return as_json.stdout, text.stdout, unavailable

    as_json, text, unavailable = asyncio.run(scenario())
    report = json.loads(as_json)
    assert report["escrow_urls"] == [dead, unavailable, escrow.url]
    assert (report["escrow_url"], report["escrow_reachable"]) == (escrow.url, True)
    assert report["lock_state"] == "docker unreachable"
    assert (f"escrow:         {escrow.url} (reachable, answered; also {dead}, {unavailable})"
            in text), text
