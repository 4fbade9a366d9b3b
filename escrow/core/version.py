"""This release's version, as installed (pyproject.toml's), for the agent's heartbeats, the
escrow's status and its build-info metric."""

from __future__ import annotations

import importlib.metadata

VERSION = importlib.metadata.version("swarm-unseal")
