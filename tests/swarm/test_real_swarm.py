"""The escrow against a real dockerd swarm with autolock: real node certificates, a real
encrypted swarm-node.key, a real unlock key, and a real unlock through the docker API."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.client import EscrowClient
from agent.errors import EscrowRejected
from agent.release import candidate_keys
from agent.swarm_identity import CERT_DIR, read_identity, read_signing_identity
from escrow.core import unlockkey
from lab.dockerd import Dockerd
from lab.server import BOOT_ID, EscrowProcess

pytestmark = pytest.mark.slow



def test_a_real_autolocked_manager_enrolls_and_is_unlocked_from_escrowed_shares(
        dockerd: Dockerd, escrow: EscrowProcess) -> None:
    swarm = dockerd.init_swarm()
    cluster_id = swarm["Cluster"]["ID"]
    unlock_key = unlockkey.parse(dockerd.api().get_unlock_key()["UnlockKey"])
    identity = read_identity(dockerd.data_root)
    assert (identity.node_id, identity.cluster_id, identity.role) == (
        swarm["NodeID"], cluster_id, "swarm-manager")
    root_ca = dockerd.data_root / CERT_DIR / "swarm-root-ca.crt"
    added = escrow.cli("cluster", "add", cluster_id, "--root-ca", str(root_ca), "--threshold",
                       "2", "--slots", "auto,auto,alice,bob")
    assert added.returncode == 0, added.stderr
    agent_key = ec.generate_private_key(ec.SECP256R1())
    identity, swarm_key = read_signing_identity(dockerd.data_root, unlock_key)

    async def enroll_and_deposit() -> None:
        async with EscrowClient(escrow.url, escrow.ca) as client:
            enrolled = await client.enroll(cluster_id, identity.node_id, identity.cert_pem,
                                           swarm_key, agent_key, socket.gethostname())
            assert enrolled.keys == []
            deposit = await client.deposit(cluster_id, identity.node_id, agent_key, unlock_key,
                                           await client.deposit_key_sha256())
            assert (deposit.version, deposit.created) == (1, True)
            # Signing with a key that is not this certificate's is refused.
            with pytest.raises(EscrowRejected) as caught:
                await client.enroll(cluster_id, identity.node_id, identity.cert_pem,
                                    ec.generate_private_key(ec.SECP256R1()), agent_key, "h")
            assert caught.value.reason == "bad_signature"

    asyncio.run(enroll_and_deposit())
    dockerd.restart()
    assert dockerd.state() == "locked"
    locked = read_identity(dockerd.data_root)  # all the agent can read while locked

    async def unseal() -> tuple[int, float]:
        async with EscrowClient(escrow.url, escrow.ca) as client:
            started = time.monotonic()
            status, ephemeral = await client.unseal(cluster_id, locked.node_id, locked.cert_pem,
                                                    agent_key, socket.gethostname(), BOOT_ID,
                                                    locked.kek_version)
            (version, key), = candidate_keys(status, ephemeral)
            await asyncio.to_thread(dockerd.api().unlock_swarm, key.swmkey())
            del key
            await client.report(status.request_id, locked.node_id, agent_key, "unlocked",
                                version)
            return version, time.monotonic() - started

    version, _ = asyncio.run(unseal())
    assert version == 1
    deadline = time.monotonic() + 30
    while dockerd.state() != "active" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert dockerd.state() == "active"
