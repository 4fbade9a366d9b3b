"""What the running agent's parts (agent/node_watch.py, rotation_watch.py, unseal_flow.py)
work with, made once by agent/daemon.py."""

from __future__ import annotations

from dataclasses import dataclass

from agent.backoff import Backoff
from agent.client import EscrowClient
from agent.config import AgentConfig
from agent.docker_state import Docker
from agent.loaded_key import LoadedKey
from agent.log import NodeLog
from agent.runtime import Runtime


@dataclass(frozen=True)
class Parts:
    config: AgentConfig
    docker: Docker
    client: EscrowClient
    runtime: Runtime
    log: NodeLog
    key: LoadedKey
    backoff: Backoff  # the escrow's, whichever call found it down
