"""Custodian key files at rest: bcrypt-pbkdf in OpenSSH's format, still readable by ssh-keygen,
and the keys made before (encrypted PKCS#8) still opened."""

from __future__ import annotations

import base64
import os
import pty
import select
import signal
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from escrow import custodian_keys
from escrow.core.errors import InputError
from escrow.custodian_keys import openssh_kdf

OLD, NEW = b"correct horse battery", b"a new passphrase, longer"


def on_terminal(argv: list[str], answers: dict[bytes, bytes], timeout: float = 30) -> bytes:
    """Run ``argv`` on a pseudo-terminal, typing each answer after its prompt is shown (no
    passphrase on a command line), and return what it showed."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes the command
        os.execvp(argv[0], argv)
    shown = b""
    answered = dict.fromkeys(answers, 0)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
            for prompt, answer in answers.items():
                if (shown.count(prompt) > answered[prompt]
                        and shown.rstrip().endswith(prompt.rstrip())):
                    os.write(fd, answer + b"\n")
                    answered[prompt] += 1
    finally:
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    return shown


def test_a_custodian_key_keeps_working_after_ssh_keygen_changes_its_passphrase(
        tmp_path: Path) -> None:
    key = tmp_path / "alice.key"
    key.write_bytes(custodian_keys.generate(OLD, kdf_rounds=1)[0])
    key.chmod(0o600)
    shown = on_terminal(["ssh-keygen", "-p", "-a", "64", "-f", str(key)], {
        b"Enter old passphrase:": OLD,
        b"Enter new passphrase (empty for no passphrase):": NEW,
        b"Enter same passphrase again:": NEW})
    assert b"saved with the new passphrase" in shown, shown
    assert openssh_kdf(key.read_bytes())[1:] == (b"bcrypt", 64)
    custodian_keys.load_private(key.read_bytes(), NEW)
    with pytest.raises(InputError, match="wrong passphrase"):
        custodian_keys.load_private(key.read_bytes(), OLD)


def test_a_custodian_key_made_before_in_encrypted_pkcs8_still_opens() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    legacy = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.BestAvailableEncryption(OLD))
    opened = custodian_keys.load_private(legacy, OLD)
    assert opened.private_numbers() == key.private_numbers()


def test_an_openssh_key_of_another_type_is_refused_by_name() -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.BestAvailableEncryption(OLD))
    with pytest.raises(InputError, match="not an ECDSA P-256 key"):
        custodian_keys.load_private(pem, OLD)


def test_a_key_file_asking_for_days_of_bcrypt_is_refused_before_any_is_spent() -> None:
    pem = custodian_keys.generate(OLD, kdf_rounds=1)[0]
    blob = bytearray(base64.b64decode(b"".join(pem.strip().splitlines()[1:-1])))
    at = blob.index(b"bcrypt") + len(b"bcrypt") + 4 + 4 + 16  # options: size, salt size, salt
    blob[at:at + 4] = (2**31).to_bytes(4, "big")
    damaged = b"\n".join([pem.splitlines()[0], base64.encodebytes(bytes(blob)).strip(),
                          pem.strip().splitlines()[-1]])
    assert openssh_kdf(damaged)[2] == 2**31
    with pytest.raises(InputError, match="2147483648 bcrypt rounds") as refused:
        custodian_keys.load_private(damaged, OLD)
    assert "ssh-keygen -p" in refused.value.hint


def test_ssh_keygen_re_encrypts_a_pkcs8_key_with_bcrypt(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "old.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(OLD)))
    path.chmod(0o600)
    shown = on_terminal(["ssh-keygen", "-p", "-a", str(custodian_keys.KDF_ROUNDS), "-f",
                         str(path)], {
        b"Enter old passphrase:": OLD,
        b"Enter new passphrase (empty for no passphrase):": NEW,
        b"Enter same passphrase again:": NEW})
    assert b"saved with the new passphrase" in shown, shown
    assert openssh_kdf(path.read_bytes())[1:] == (b"bcrypt", custodian_keys.KDF_ROUNDS)
    opened = custodian_keys.load_private(path.read_bytes(), NEW)
    assert opened.private_numbers() == key.private_numbers()
