"""What the agent remembers between runs, in `state_dir/state.json` (no secrets: key
fingerprints are keyed hashes the escrow shows too).

It is a cache and a record for `unseal-agent status`, never an authority over what this node
may have: the escrow decides that. One field is a trust anchor of the agent's own: the
fingerprint of the escrow's deposit key pinned at enrollment (agent/deposit_key.py), which
only root can change, like the file itself. A damaged file is reported and replaced, not
trusted (re-enrolling pins the deposit key anew).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from agent.errors import AgentError
from escrow.core.files import write_atomic


@dataclass
class LastUnlock:
    at: str
    version: int
    request_id: str
    seconds: float  # from seeing `locked` to the unlock call returning


@dataclass
class AgentState:
    node_id: str = ""
    cluster_id: str = ""
    enrolled_at: str = ""
    escrowed: dict[str, int] = field(default_factory=dict)  # key fingerprint -> version
    checked_kek_version: str = ""  # swarm-node.key's kek-version when the key was last checked
    last_unlock: LastUnlock | None = None
    # sha256 of the escrow's deposit key, pinned at enrollment; "" in a file written before
    # agents pinned it (the first deposit key the agent then sees is pinned, see deposit.py).
    deposit_key_sha256: str = ""

    def knows(self, node_id: str, cluster_id: str) -> bool:
        return (self.node_id, self.cluster_id) == (node_id, cluster_id)

    def versions(self) -> list[int]:
        return sorted(set(self.escrowed.values()), reverse=True)


_SCHEMA = TypeAdapter(AgentState)


def load(path: Path) -> AgentState:
    """The saved state; every field must have its type (strict), unknown fields are ignored."""
    try:
        return _SCHEMA.validate_json(path.read_bytes(), strict=True)
    except FileNotFoundError:
        return AgentState()
    except (OSError, ValidationError) as exc:
        raise AgentError(f"the agent state file {path} is unreadable or damaged "
                         f"({type(exc).__name__})",
                         "remove it and run `unseal-agent enroll` again; it holds no secret"
                         ) from None


def save(path: Path, state: AgentState) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, json.dumps(asdict(state), indent=2, sort_keys=True).encode())
