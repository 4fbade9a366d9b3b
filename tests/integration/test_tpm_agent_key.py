"""The agent key inside a real TPM 2.0 stack: swtpm behind tpm2-abrmd, through tpm2-pkcs11
(lab/swtpm.py). Each case runs the agent's own key loading (config, agent.keys, the token) in
a process of its own, as `unseal-agent enroll` and `run` do: a PKCS#11 module is initialised
once per process, with the environment it starts with."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import swtpm
from lab.agent import key_only_config
from lab.commands import REPO
from lab.swtpm import SoftwareTpm

# Loads (or, given "create", makes) the configured agent key, signs, verifies; prints what
# happened as JSON: the key's public point and attributes, or the error and its hint.
PROBE = r"""
import json, sys
from pathlib import Path
from typing import Any
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from agent import config, keys
from escrow.core.errors import EscrowError
from pkcs11 import Attribute
conf = config.load(Path(sys.argv[1]), {})
try:
    key = keys.load_or_create(conf) if sys.argv[2] == "create" else keys.load(conf)
    signature = key.sign(b"probe", ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, b"probe", ec.ECDSA(hashes.SHA256()))
    try:
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
        leaves = "yes"
    except TypeError as refusal:
        leaves = str(refusal)
    private = key._private
    print(json.dumps({"public": key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        "extractable": bool(private[Attribute.EXTRACTABLE]),
        "sensitive": bool(private[Attribute.SENSITIVE]), "leaves": leaves}))
except EscrowError as error:
    print(json.dumps({"error": type(error).__name__, "message": error.message,
                      "hint": error.hint}))
"""


@pytest.fixture
def tpm(tmp_path: Path) -> Iterator[SoftwareTpm]:
    with swtpm.software_tpm(tmp_path / "tpm") as running:
        yield running


def agent_config(directory: Path, pin: str | None, module: str = swtpm.MODULE) -> Path:
    return key_only_config(directory, module, pin)


def probe(conf: Path, mode: str, env: dict[str, str]) -> tuple[dict[str, Any], str]:
    """What loading the key said, and the process's stderr (the TPM stack's own lines)."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(conf), mode], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def store_env(tpm: SoftwareTpm, store: Path) -> dict[str, str]:
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    return {**tpm.env, "TPM2_PKCS11_STORE": str(store)}


def test_enroll_makes_the_token_and_a_key_that_signs_in_the_tpm_and_never_leaves_it(
        tpm: SoftwareTpm, tmp_path: Path) -> None:
    pin = secrets.token_urlsafe(18)
    conf = agent_config(tmp_path / "agent", pin)
    env = store_env(tpm, tmp_path / "agent" / "tpm2-pkcs11")
    missing, _ = probe(conf, "load", env)
    made, made_err = probe(conf, "create", env)
    again, _ = probe(conf, "load", env)
    assert missing["error"] == "TokenNotFound"
    assert "run `unseal-agent enroll`, which creates the token" in missing["hint"]
    assert "public" in made, made
    assert again["public"] == made["public"]  # the same key, from the TPM-wrapped store
    assert (made["extractable"], made["sensitive"]) == (False, True)
    assert made["leaves"] == "the agent key lives in a PKCS#11 token and cannot leave it"
    stored = (tmp_path / "agent" / "tpm2-pkcs11" / "tpm2_pkcs11.sqlite3").read_bytes()
    assert pin.encode() not in stored
    assert pin not in made_err
    assert not list((tmp_path / "agent").glob("*.pem"))


def test_a_wrong_or_missing_pin_is_named_and_the_pin_is_never_shown(
        tpm: SoftwareTpm, tmp_path: Path) -> None:
    env = store_env(tpm, tmp_path / "store")
    pin = secrets.token_urlsafe(18)
    made, _ = probe(agent_config(tmp_path / "agent", pin), "create", env)
    assert "public" in made
    wrong_pin = secrets.token_urlsafe(18)
    wrong, stderr = probe(agent_config(tmp_path / "wrong", wrong_pin), "load", env)
    assert wrong["error"] == "WrongPin"
    assert wrong["message"].startswith("the token 'unseal-agent' refused the PIN from file ")
    assert wrong_pin not in json.dumps(wrong) + stderr
    assert pin not in stderr
    absent, _ = probe(agent_config(tmp_path / "nopin", None), "load", env)
    assert absent == {"error": "AgentError", "message": "no PIN for the agent key's token",
                      "hint": "set agent_key_pkcs11_pin_file, or pass a systemd credential "
                              "named agent-key-pin (LoadCredential=agent-key-pin:/path)"}


def test_no_tpm_to_reach_and_no_module_are_each_named_with_what_to_do(
        tmp_path: Path) -> None:
    conf = agent_config(tmp_path / "agent", secrets.token_urlsafe(18))
    unreachable = {"DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path / 'no-bus'}",
                   "TPM2_PKCS11_TCTI": "tabrmd:bus_type=session",
                   "TPM2_PKCS11_STORE": str(tmp_path / "agent")}
    no_tpm, _ = probe(conf, "create", unreachable)
    assert no_tpm["error"] == "HsmModuleMissing"
    assert no_tpm["message"] == (f"the PKCS#11 module {swtpm.MODULE} could not be loaded: it "
                                 "is installed but would not start (GeneralError)")
    assert "needs a TPM it can reach: /dev/tpmrm0 present" in no_tpm["hint"]
    assert "DeviceAllow=/dev/tpmrm0 rw" in no_tpm["hint"]
    module = str(tmp_path / "libtpm2_pkcs11.so")
    no_module, _ = probe(agent_config(tmp_path / "other", "0000", module), "create", unreachable)
    assert no_module["error"] == "HsmModuleMissing"
    assert no_module["message"] == f"the PKCS#11 module {module} could not be loaded"
    assert "agent_key_pkcs11_module" in no_module["hint"]


def test_a_token_store_copied_to_another_tpm_cannot_open_and_says_the_disk_was_copied(
        tpm: SoftwareTpm, tmp_path: Path) -> None:
    conf = agent_config(tmp_path / "agent", secrets.token_urlsafe(18))
    made, _ = probe(conf, "create", store_env(tpm, tmp_path / "store"))
    assert "public" in made
    with swtpm.software_tpm(tmp_path / "other-tpm") as other:
        copied, _ = probe(conf, "load", {**other.env, "TPM2_PKCS11_STORE": str(
            tmp_path / "store")})
        recreated, _ = probe(conf, "create", {**other.env, "TPM2_PKCS11_STORE": str(
            tmp_path / "store")})
    assert copied["error"] == recreated["error"] == "SessionRefused"
    assert "this TPM cannot load the token's keys" in copied["message"]
    assert "this disk was copied from another machine" in copied["message"]
    assert "`unseal-agent enroll`" in copied["hint"]
