"""Running this checkout's own commands, as an operator would, and stopping them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

# The working directory of every command started here, so `python -m escrow` (or agent)
# imports this checkout whatever is installed.
REPO = Path(__file__).resolve().parent.parent


def run_escrow(*args: str, data_dir: Path | None = None, stdin: str = "",
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `escrow` command as an operator would, without the tests' SOFTHSM2_CONF."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("SOFTHSM2_CONF", "ESCROW_DATA_DIR", "ESCROW_HSM_PIN")}
    if data_dir is not None:
        full_env["ESCROW_DATA_DIR"] = str(data_dir)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "escrow", *args], input=stdin,
                          capture_output=True, text=True, env=full_env, timeout=120,
                          check=False, cwd=REPO)


def readme_blocks(section: str, level: int = 2, language: str = "sh") -> list[list[str]]:
    """The ``language`` code blocks of one README section (a heading of ``level`` #s, up to
    the next heading of that level or above), as lists of their non-empty lines."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^{'#' * level} {re.escape(section)}\n(.*?)(?=^#{{2,{level}}} )", text,
                      re.MULTILINE | re.DOTALL)
    assert match, f"README has no section {section!r}"
    blocks = re.findall(rf"```{re.escape(language)}\n(.*?)```", match.group(1), re.DOTALL)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def readme_scripts(section: str, level: int, lab: Mapping[str, str]) -> list[str]:
    """The `sh` blocks of a README section as scripts, each text of README's example (a host,
    a path, a name) that ``lab`` maps replaced by the laboratory's own; every one must be in
    the section, so README cannot drift away from what is run."""
    scripts = ["\n".join(block) for block in readme_blocks(section, level)]
    for example, ours in lab.items():
        assert any(example in script for script in scripts), \
            f"README's {section!r} no longer says {example!r}"
        scripts = [script.replace(example, ours) for script in scripts]
    return scripts


def run_script(script: str, cwd: Path, env: Mapping[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    """Run shell commands as an operator types them (stopping at the first that fails), with
    this checkout's `escrow` on PATH and without the tests' SOFTHSM2_CONF."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("SOFTHSM2_CONF", "ESCROW_DATA_DIR", "ESCROW_HSM_PIN")}
    full_env.update(env or {})
    full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env.get('PATH', '')}"
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run(["bash", "-e", "-u", "-o", "pipefail", "-c", script],
                          capture_output=True, text=True, env=full_env, timeout=300,
                          check=False, cwd=cwd)


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, up to 30 s to exit, then SIGKILL; returns once it is gone."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
