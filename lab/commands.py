"""Running this checkout's own commands, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
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
