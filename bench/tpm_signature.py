"""The cost of a TPM-held agent key: one ECDSA P-256 signature (what the agent makes per unseal
request and per heartbeat) by a key in a TPM 2.0 through tpm2-pkcs11, next to the same
signature by the 0600 file key, and by a SoftHSM token, in one run, taken in turns.

Run from the repository root:  .venv/bin/python -m bench.tpm_signature --signatures 200

The TPM is swtpm behind tpm2-abrmd (lab/swtpm.py): a software TPM, so its figure is the
software stack's (tpm2-pkcs11, the TSS, the resource manager's D-Bus round trips, swtpm's
crypto) and a hardware TPM adds its own, slower, chip time (tens of milliseconds for a P-256
signature on common discrete TPMs). Each key signs `--signatures` messages, in rounds of 10
per key, so that a slow moment of the machine falls on all three alike. Prints a Markdown
table; --out FILE also writes it there.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.checkout import REPO
from bench.machine import Machine, invocation, preamble, this_machine
from escrow import softhsm
from lab import swtpm
from lab.agent import key_only_config

TITLE = "TPM signature: the agent key in a TPM, in SoftHSM and in a file"
ROUND = 10
# Runs in a process of its own per key: a PKCS#11 module is initialised once per process,
# with the environment it starts with. Reads `count` from stdin, signs that many, prints the
# seconds of each signature; repeats until stdin closes.
SIGNER = r"""
import sys, time
from pathlib import Path
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from agent import config, keys
key = keys.load_or_create(config.load(Path(sys.argv[1]), {}))
print("ready", flush=True)
for line in sys.stdin:
    took = []
    for n in range(int(line)):
        began = time.perf_counter()
        key.sign(b"heartbeat %d" % n, ec.ECDSA(hashes.SHA256()))
        took.append(time.perf_counter() - began)
    print(" ".join(f"{t:.9f}" for t in took), flush=True)
"""


@dataclass(frozen=True)
class Storage:
    name: str
    seconds: tuple[float, ...]

    def ms(self, quantile: float) -> float:
        ordered = sorted(self.seconds)
        return 1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.seconds)


def _signer(conf: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", SIGNER, str(conf)], cwd=REPO,
                               env={**os.environ, **env}, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != "ready":
        process.kill()
        process.wait()
        raise RuntimeError(f"the {conf.parent.name} signer did not start")
    return process


def measure(signatures: int) -> list[Storage]:
    with tempfile.TemporaryDirectory(prefix="tpm-bench-") as temp:
        base = Path(temp)
        with swtpm.software_tpm(base / "tpm") as tpm:
            store = base / "tpm2-pkcs11"
            store.mkdir(mode=0o700)
            pin = secrets.token_urlsafe(18)
            softhsm_conf = softhsm.create_token(base / "softhsm", "unseal-agent", pin)
            keys = {
                "file key (cryptography)": (key_only_config(base / "file-agent"), {}),
                "SoftHSM token": (
                    key_only_config(base / "softhsm-agent", softhsm.default_module(), pin),
                    {"SOFTHSM2_CONF": str(softhsm_conf)}),
                "TPM 2.0 (swtpm, tpm2-abrmd, tpm2-pkcs11)": (
                    key_only_config(base / "tpm-agent", swtpm.MODULE, pin),
                    {**tpm.env, "TPM2_PKCS11_STORE": str(store)}),
            }
            signers: dict[str, subprocess.Popen[str]] = {}
            taken: dict[str, list[float]] = {name: [] for name in keys}
            try:
                for name, (conf, env) in keys.items():
                    signers[name] = _signer(conf, env)
                for _ in range(max(1, signatures // ROUND)):
                    for name, process in signers.items():
                        assert process.stdin is not None
                        assert process.stdout is not None
                        process.stdin.write(f"{ROUND}\n")
                        process.stdin.flush()
                        taken[name] += [float(t) for t in process.stdout.readline().split()]
            finally:
                for process in signers.values():
                    assert process.stdin is not None
                    process.stdin.close()
                    process.wait(timeout=30)
    return [Storage(name, tuple(seconds)) for name, seconds in taken.items()]


def document(storages: list[Storage], machine: Machine, command: str) -> str:
    file_key = storages[0].median_ms
    rows = [f"| {s.name} | {len(s.seconds)} | {s.median_ms:.3f} | {s.ms(0.95):.3f} | "
            f"{s.median_ms / file_key:.0f} times |" for s in storages]
    tpm = storages[-1].median_ms
    return "\n".join([
        preamble(TITLE, machine, command),
        "One ECDSA P-256 signature over SHA-256, the agent's per request and per heartbeat, "
        "by each place the agent key can live; taken in turns of "
        f"{ROUND}, in one run.", "",
        "| agent key in | signatures | median ms | p95 ms | vs the file key |",
        "| --- | --- | --- | --- | --- |", *rows, "",
        f"A TPM signature costs {tpm:.1f} ms here: at one heartbeat every 30 s and a few "
        "signatures per unseal, the agent spends well under a second an hour on it. The "
        "software TPM measures the stack, not a chip: a hardware TPM adds its own time.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--signatures", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = document(measure(args.signatures), this_machine(),
                    invocation("bench.tpm_signature"))
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
