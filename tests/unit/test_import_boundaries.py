"""The house's walls, read from the code's own imports: the agent reaches the escrow only
through escrow.core and the one HTTP client both share (escrow/https.py), which leans on the
core alone, the core leans on nothing above it, and production code never imports the test
laboratory."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.commands import REPO


def imports(package: str) -> Iterator[tuple[Path, str]]:
    """(file, module) of each import in ``package`` (a folder, or one module's file)."""
    where = REPO / package
    for path in sorted(where.rglob("*.py")) if where.is_dir() else [where]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield from ((path, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                yield path, node.module


# What of the escrow the agent may import: the core, and the HTTP client the CLI uses too.
SHARED_EDGES = {"escrow.https"}


def _beyond_the_core(module: str) -> bool:
    return module.partition(".")[0] == "escrow" and not module.startswith("escrow.core")


def test_the_agent_imports_only_the_shared_core_of_the_escrow_and_its_http_client() -> None:
    strays = [f"{path.relative_to(REPO)}: {module}" for path, module in imports("agent")
              if _beyond_the_core(module) and module not in SHARED_EDGES]
    assert strays == []


@pytest.mark.parametrize("edge", sorted(SHARED_EDGES))
def test_what_the_agent_shares_beyond_the_core_imports_nothing_of_the_escrow_but_its_core(
        edge: str) -> None:
    strays = [f"{path.relative_to(REPO)}: {module}"
              for path, module in imports(edge.replace(".", "/") + ".py")
              if _beyond_the_core(module)]
    assert strays == []


def test_the_core_imports_nothing_of_the_escrow_above_it() -> None:
    strays = [f"{path.relative_to(REPO)}: {module}" for path, module in imports("escrow/core")
              if _beyond_the_core(module)]
    assert strays == []


@pytest.mark.parametrize("package", ["escrow", "agent"])
def test_production_code_never_imports_the_agent_side_or_the_laboratory(package: str) -> None:
    forbidden = {"lab", "tests", "bench"} | ({"agent"} if package == "escrow" else set())
    strays = [f"{path.relative_to(REPO)}: {module}" for path, module in imports(package)
              if module.split(".")[0] in forbidden]
    assert strays == []


def test_reading_the_escrow_config_does_not_load_the_pkcs11_extension() -> None:
    probe = "import sys, escrow.config; print('pkcs11' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert loaded == "False"


def test_a_resident_agent_with_a_file_key_loads_neither_pkcs11_nor_aiohttp() -> None:
    # What `unseal-agent run` imports for its three tasks; each would add megabytes to an
    # agent that sits idle on every manager (bench/results/agent_unit.md has its RSS).
    probe = ("import sys, agent.cli, agent.daemon, agent.unseal_flow, agent.heartbeat; "
             "print(sorted({'pkcs11', 'aiohttp'} & set(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert loaded == "[]"
