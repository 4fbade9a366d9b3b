"""The fleet as the status page and `escrow status` show it, and as ``GET /v1/status`` sends
it: every cluster, its managers' live states, the requests waiting for custodians, and the
escrow's own health.

It holds names, states, times and counts, never key material, shares or signatures. Hostnames
and the other strings here came from nodes: whoever shows them escapes them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from escrow.core.protocol import Answer
from escrow.core.states import NodeState


class FleetNode(Answer):
    node_id: str
    hostname: str = Field(description="as the node sent it: untrusted text")
    state: NodeState
    last_seen: str = Field(description="the node's latest heartbeat, '' if it never beat")
    kek_version: str = Field(description="the swarm key-encryption key version its agent "
                                         "last reported, '' if none")
    agent_version: str
    last_unlock: str = Field(description="when its agent last reported an unlock, '' if never")
    last_unlock_version: int | None = Field(description="the key version of that unlock")
    waiting_on: str = Field(description="the request short of approvals, '' if none")


class FleetRequest(Answer):
    request_id: str
    node_id: str
    hostname: str = Field(description="as the node sent it: untrusted text")
    created_at: str
    expires_at: str
    held_until: str = Field(description="while another boot of the node may be alive, '' "
                                        "if not held")
    threshold: int
    needed: int = Field(description="approvals still missing")
    approved_by: list[str]
    could_approve: list[str] = Field(description="custodians holding a slot the request may "
                                                 "release who have not approved it")
    approves_by_default_at: str = Field(default="", description="when the cluster's deny "
                                        "window approves it unless denied; '' if it has none")


class FleetKeyVersion(Answer):
    version: int
    created_at: str
    threshold: int
    slots: list[str]


class FleetCluster(Answer):
    cluster_id: str
    threshold: int
    slots: list[str] = Field(description="the policy: custodian names, and 'auto'")
    versions: list[FleetKeyVersion] = Field(description="escrowed key versions, newest first")
    nodes: list[FleetNode]
    requests: list[FleetRequest] = Field(description="live requests short of approvals")


class EscrowHealth(Answer):
    hsm: Literal["up", "down"]
    hsm_error: str = Field(description="why the token is unavailable, '' when it is up")
    store: Literal["sqlite", "postgresql"]
    writable: bool
    data_dir_free_bytes: int
    disk_reserve_bytes: int = Field(description="space held back for releases on a full disk")
    replicas: list[str] = Field(description="the escrow replicas connected to a shared "
                                            "PostgreSQL store (empty on SQLite)")


class FleetStatus(Answer):
    generated_at: str
    version: str = Field(description="the escrow's version")
    health: EscrowHealth
    clusters: list[FleetCluster]

    @property
    def locked(self) -> list[FleetNode]:
        """The managers that are locked, waiting for custodians or not."""
        return [node for cluster in self.clusters for node in cluster.nodes
                if node.state in (NodeState.LOCKED, NodeState.WAITING)]

    @property
    def any_locked(self) -> bool:
        """Whether a manager is locked: `escrow status` then exits 2, as `vault status` does
        for a sealed Vault."""
        return bool(self.locked)
