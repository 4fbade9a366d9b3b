"""The embedded default HSM: a SoftHSM2 token inside the data directory.

Token creation is done by ``softhsm/create-token`` (shipped inside the wheel as
``escrow/_softhsm``), so the quickstart, the tests and operators use one script.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from escrow.core.errors import HsmError, HsmModuleMissing

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)
_INSTALL_HINT = "install SoftHSM2 (`apt-get install softhsm2`) or give --hsm-module for a real HSM"


def default_module() -> str:
    for candidate in MODULE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise HsmModuleMissing("the SoftHSM2 PKCS#11 module is not installed", _INSTALL_HINT)


def _script_dir() -> Path:
    packaged = Path(__file__).with_name("_softhsm")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "softhsm"  # editable install / checkout


def create_token(directory: Path, label: str, pin: str) -> Path:
    """Create a token labelled ``label`` under ``directory``; return its SOFTHSM2_CONF path."""
    if shutil.which("softhsm2-util") is None:
        raise HsmModuleMissing("softhsm2-util is not installed", _INSTALL_HINT)
    script = _script_dir() / "create-token"
    result = subprocess.run(  # noqa: S603 - fixed argv; the PIN travels on stdin
        [sys.executable, str(script), "--dir", str(directory), "--label", label],
        input=pin + "\n", capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise HsmError(f"creating the SoftHSM token failed: {result.stderr.strip()}",
                       f"check that {directory} is writable")
    return Path(result.stdout.strip())


def copy_token(source: Path, directory: Path) -> Path:
    """Copy the token files under ``source`` (another escrow's ``DATA_DIR/softhsm``) into
    ``directory``, for a replica that must reach the same wrapping key; return the copy's
    SOFTHSM2_CONF path."""
    tokens = source / "tokens"
    if not tokens.is_dir():
        raise HsmError(f"{source} holds no SoftHSM token (no {tokens})",
                       "give the softhsm directory of the first replica's data directory "
                       "(copied here with its owner's permissions kept, e.g. by rsync -a)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copytree(tokens, directory / "tokens")
    (directory / "tokens").chmod(0o700)
    conf = directory / "softhsm2.conf"
    template = _script_dir() / "softhsm2.conf.in"
    conf.write_text(template.read_text().replace("@TOKENDIR@", str(directory / "tokens")))
    return conf
