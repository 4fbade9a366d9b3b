"""The agent's settings: /etc/unseal-agent/config.toml, each key also a command-line flag.

    escrow_url   https://escrow.example:8443       (required)
    escrow_ca    the escrow's CA certificate        (required)
    docker_host  unix:///var/run/docker.sock
    docker_root  /var/lib/docker                    (for swarm/certificates/)
    state_dir    /var/lib/unseal-agent              (agent key, 0600)
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from agent.errors import AgentError

DEFAULT_CONFIG = Path("/etc/unseal-agent/config.toml")


@dataclass(frozen=True)
class AgentConfig:
    escrow_url: str
    escrow_ca: Path
    docker_host: str = "unix:///var/run/docker.sock"
    docker_root: Path = Path("/var/lib/docker")
    state_dir: Path = Path("/var/lib/unseal-agent")

    @property
    def agent_key_path(self) -> Path:
        return self.state_dir / "agent-key.pem"


_KNOWN = {f.name: f for f in fields(AgentConfig)}


def load(path: Path | None, overrides: Mapping[str, Any]) -> AgentConfig:
    """Read the file (if it exists, or fail if it was named explicitly) and apply flags."""
    values: dict[str, Any] = {}
    source = path or DEFAULT_CONFIG
    if path is not None or source.exists():
        try:
            raw = tomllib.loads(source.read_text())
        except FileNotFoundError:
            raise AgentError(f"the config file {source} does not exist",
                             "create it or drop --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise AgentError(f"{source} is not valid TOML: {exc}", "fix the file") from None
        for key, value in raw.items():
            if key not in _KNOWN:
                raise AgentError(f"{source}: unknown setting {key!r}",
                                 f"known settings: {', '.join(_KNOWN)}")
            if not isinstance(value, str) or not value:
                raise AgentError(f"{source}: {key} must be a non-empty string",
                                 f'for example {key} = "..."')
            values[key] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    for required in ("escrow_url", "escrow_ca"):
        if required not in values:
            raise AgentError(f"{required} is not set",
                             f"set it in {source} or pass --{required.replace('_', '-')}")
    if not str(values["escrow_url"]).startswith("https://"):
        raise AgentError(f"escrow_url {values['escrow_url']!r} is not an https:// URL",
                         "the agent talks to the escrow over TLS only")
    for key in ("escrow_ca", "docker_root", "state_dir"):
        if key in values:
            values[key] = Path(values[key])
    return AgentConfig(**values)
