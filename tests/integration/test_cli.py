"""The `escrow` command as an operator types it, in subprocesses, on an embedded SoftHSM."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import sqlite3
import stat
import sys
import time
from pathlib import Path

import pytest
import shamir_mnemonic

from escrow.core import shares
from escrow.core.unlockkey import UnlockKey
from escrow.custodian_keys import KDF_ROUNDS, openssh_kdf
from lab.certs import make_node_cert, make_root_ca
from lab.commands import REPO, run_escrow
from tests.conftest import fails, ok

pytestmark = pytest.mark.slow
CLUSTER = "abcdefghijklmnopqrstuvwx1"




@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One initialised data directory with custodians and a cluster, shared by this module."""
    base = tmp_path_factory.mktemp("cli")
    data = base / "data"
    ok(run_escrow("init", "--data-dir", str(data)))
    (base / "pass").write_text("correct horse battery staple\n")
    for name in ("alice", "bob"):
        ok(run_escrow("custodian", "keygen", "--out", str(base / name),
                      "--passphrase-file", str(base / "pass")))
        ok(run_escrow("custodian", "add", name, "--public-key", str(base / f"{name}.pub"),
                      data_dir=data))
    (base / "ca.pem").write_bytes(make_root_ca().pem)
    ok(run_escrow("cluster", "add", CLUSTER, "--root-ca", str(base / "ca.pem"),
                  "--threshold", "2", "--slots", "auto,auto,alice,bob", data_dir=data))
    return data


def new_key() -> UnlockKey:
    return UnlockKey(os.urandom(32))


def test_init_lays_out_a_private_data_directory(home: Path) -> None:
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "hsm-pin").stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "escrow.db").stat().st_mode) == 0o600
    assert (home / "softhsm" / "softhsm2.conf").exists()
    events = json.loads(ok(run_escrow("audit", "show", "--json", data_dir=home)))
    assert events[0]["event"] == "escrow.init"
    assert events[0]["details"]["wrapping_key"] == "created"


def test_init_refuses_an_initialised_directory(home: Path) -> None:
    fails(run_escrow("init", "--data-dir", str(home)), 1, "already initialised")


def test_usage_errors_exit_2(home: Path, tmp_path: Path) -> None:
    fails(run_escrow("cluster", "add", data_dir=home), 2, "Missing argument")
    fails(run_escrow("init", "--data-dir", str(tmp_path / "x"), "--hsm-token", "t"), 2,
          "--hsm-token goes with --hsm-module")
    fails(run_escrow("init", "--data-dir", str(tmp_path / "x"), "--hsm-pin-file", "p"), 2,
          "--hsm-pin-file goes with --hsm-module, or with --token-from")
    fails(run_escrow("key", "list", data_dir=home), 2, "--cluster")


def test_commands_on_a_directory_that_is_not_initialised_say_so(tmp_path: Path) -> None:
    fails(run_escrow("cluster", "list", data_dir=tmp_path), 1, "is not an escrow data directory",
          "hint: run `escrow init")


def test_custodians_are_listed_and_removal_is_refused_while_in_a_policy(home: Path) -> None:
    listed = json.loads(ok(run_escrow("custodian", "list", "--json", data_dir=home)))
    assert [(c["name"], c["clusters"]) for c in listed] == [("alice", [CLUSTER]),
                                                            ("bob", [CLUSTER])]
    fails(run_escrow("custodian", "remove", "alice", data_dir=home), 1,
          "holds a slot in the policy of", "escrow cluster set-policy")
    table = ok(run_escrow("custodian", "list", data_dir=home))
    assert "alice" in table
    assert "holds a slot in" in table


def test_keygen_writes_a_protected_key_and_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "pass").write_text("correct horse battery staple\n")
    args = ("custodian", "keygen", "--out", str(tmp_path / "k"), "--passphrase-file",
            str(tmp_path / "pass"))
    ok(run_escrow(*args))
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert openssh_kdf((tmp_path / "k").read_bytes()) == (b"aes256-ctr", b"bcrypt",
                                                          KDF_ROUNDS)
    fails(run_escrow(*args), 1, "already exists")
    (tmp_path / "short").write_text("short\n")
    fails(run_escrow("custodian", "keygen", "--out", str(tmp_path / "k2"), "--passphrase-file",
                     str(tmp_path / "short")), 1, "shorter than 12")


def test_cluster_registration_errors_name_the_problem(home: Path, tmp_path: Path) -> None:
    ca = make_root_ca()
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    (tmp_path / "node.pem").write_bytes(make_node_cert(ca, "n" * 25, CLUSTER).pem)
    (tmp_path / "junk.pem").write_text("not a certificate")
    base = ("cluster", "add", "zyxwvutsrqponmlkjihgfedcb", "--threshold", "2")
    fails(run_escrow("cluster", "add", "Not-An-Id", "--root-ca", str(tmp_path / "ca.pem"),
                     "--threshold", "1", "--slots", "alice", data_dir=home), 1,
          "is not a Swarm cluster id", "docker info")
    fails(run_escrow(*base, "--root-ca", str(tmp_path / "node.pem"), "--slots", "alice,bob",
                     data_dir=home), 1, "not a CA")
    fails(run_escrow(*base, "--root-ca", str(tmp_path / "junk.pem"), "--slots", "alice,bob",
                     data_dir=home), 1, "not a PEM certificate")
    fails(run_escrow(*base, "--root-ca", str(tmp_path / "missing.pem"), "--slots", "alice,bob",
                     data_dir=home), 1, "cannot read the root CA file")
    fails(run_escrow(*base, "--root-ca", str(tmp_path / "ca.pem"), "--slots", "auto,auto",
                     data_dir=home), 1, "cannot be rebuilt from paper",
          "--allow-no-paper-recovery")
    fails(run_escrow(*base, "--root-ca", str(tmp_path / "ca.pem"), "--slots", "auto,eve",
                     data_dir=home), 1, "unknown custodian(s): eve")
    result = run_escrow(*base, "--root-ca", str(tmp_path / "ca.pem"), "--slots", "auto,auto",
                        "--allow-no-paper-recovery", data_dir=home)
    assert "warning: custodians alone cannot rebuild" in result.stderr
    shown = json.loads(ok(run_escrow("cluster", "show", "zyxwvutsrqponmlkjihgfedcb", "--json",
                                     data_dir=home)))
    assert (shown["threshold"], shown["paper_recoverable"]) == (2, False)
    assert shown["root_ca_subject"] == "CN=swarm-ca"
    listed = json.loads(ok(run_escrow("cluster", "list", "--json", data_dir=home)))
    assert {c["cluster_id"] for c in listed} >= {CLUSTER, "zyxwvutsrqponmlkjihgfedcb"}


def test_deposit_reads_stdin_and_history_lists_newest_first(home: Path) -> None:
    cluster = "deposit000000000000000000"
    (home.parent / "ca2.pem").write_bytes(make_root_ca().pem)
    ok(run_escrow("cluster", "add", cluster, "--root-ca", str(home.parent / "ca2.pem"),
                  "--threshold", "2", "--slots", "auto,alice,bob", data_dir=home))
    first, second = new_key(), new_key()
    assert "stored as version 1" in ok(run_escrow("deposit", "--cluster", cluster,
                                                  data_dir=home, stdin=first.swmkey() + "\n"))
    assert "already stored as version 1" in ok(run_escrow(
        "deposit", "--cluster", cluster, data_dir=home, stdin=first.swmkey()))
    assert "stored as version 2" in ok(run_escrow("deposit", "--cluster", cluster,
                                                  data_dir=home, stdin=second.swmkey()))
    listed = json.loads(ok(run_escrow("key", "list", "--cluster", cluster, "--json",
                                      data_dir=home)))
    assert [v["version"] for v in listed] == [2, 1]
    assert listed[0]["fingerprint"] == second.fingerprint(cluster)[:16]
    assert listed[0]["superseded_at"] is None
    assert listed[1]["destroy_after"] is not None
    assert "current" in ok(run_escrow("key", "list", "--cluster", cluster, data_dir=home))

    assert "nothing to prune" in ok(run_escrow("key", "prune", "--cluster", cluster,
                                               data_dir=home))
    assert "would destroy version(s) 1" in ok(run_escrow(
        "key", "prune", "--cluster", cluster, "--retention-days", "0", "--dry-run",
        data_dir=home))
    assert "destroyed version(s) 1" in ok(run_escrow(
        "key", "prune", "--cluster", cluster, "--retention-days", "0", data_dir=home))
    listed = json.loads(ok(run_escrow("key", "list", "--cluster", cluster, "--json",
                                      data_dir=home)))
    assert [v["version"] for v in listed] == [2]
    events = json.loads(ok(run_escrow("audit", "show", "--json", "--cluster", cluster,
                                      data_dir=home)))
    assert [e["event"] for e in events][-4:] == ["key.deposit", "key.deposit_existing",
                                                 "key.deposit", "key.prune"]


@pytest.mark.parametrize(("stdin", "message"), [
    ("", "nothing was given on standard input"),
    ("SWMKEY-1-tooshort\n", "has 8 characters after SWMKEY-1-"),
    ("swarm unlock key please\n", "does not start with SWMKEY-1-"),
])
def test_a_malformed_deposit_stores_nothing_and_is_audited(home: Path, stdin: str,
                                                           message: str) -> None:
    before = json.loads(ok(run_escrow("key", "list", "--cluster", CLUSTER, "--json",
                                      data_dir=home)))
    fails(run_escrow("deposit", "--cluster", CLUSTER, data_dir=home, stdin=stdin), 1, message,
          "hint:")
    after = json.loads(ok(run_escrow("key", "list", "--cluster", CLUSTER, "--json",
                                     data_dir=home)))
    assert after == before
    if stdin:
        last = json.loads(ok(run_escrow("audit", "show", "--json", "--limit", "1",
                                        data_dir=home)))[0]
        assert (last["event"], last["cluster_id"]) == ("key.deposit_rejected", CLUSTER)
        assert message in last["details"]["reason"]


def test_deposit_to_an_unknown_cluster_is_refused(home: Path) -> None:
    fails(run_escrow("deposit", "--cluster", "unknown000000000000000000", data_dir=home,
                     stdin=new_key().swmkey()), 1, "is not registered", "escrow cluster add")


@pytest.mark.parametrize(("env", "message"), [
    ({"ESCROW_HSM_PIN": "wrong-pin-0000"}, "refused the PIN from environment variable"),
    ({"ESCROW_HSM_TOKEN": "absent"}, "no token labelled 'absent'"),
    ({"ESCROW_HSM_MODULE": "/nonexistent/libpkcs11.so"}, "could not be loaded"),
    ({"ESCROW_HSM_KEY_LABEL": "other-key"}, "has no wrapping key labelled 'other-key'"),
])
def test_hsm_failures_during_a_deposit_are_clear_and_store_nothing(
        home: Path, env: dict[str, str], message: str) -> None:
    before = json.loads(ok(run_escrow("key", "list", "--cluster", CLUSTER, "--json",
                                      data_dir=home)))
    fails(run_escrow("deposit", "--cluster", CLUSTER, data_dir=home, env=env,
                     stdin=new_key().swmkey()), 1, message, "hint:")
    assert json.loads(ok(run_escrow("key", "list", "--cluster", CLUSTER, "--json",
                                    data_dir=home))) == before


def test_audit_verify_passes_then_names_an_edited_record(home: Path, tmp_path: Path) -> None:
    assert "audit log intact" in ok(run_escrow("audit", "verify", data_dir=home))
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "escrow.toml").write_text((home / "escrow.toml").read_text()
                                      .replace('"hsm-pin"', f'"{home}/hsm-pin"')
                                      .replace('"softhsm/', f'"{home}/softhsm/'))
    source = sqlite3.connect(home / "escrow.db")
    target = sqlite3.connect(copy / "escrow.db")
    source.backup(target)
    source.close()
    target.execute("DROP TRIGGER audit_no_update")
    target.execute("UPDATE audit SET actor = 'someone-else' WHERE seq = 3")
    target.commit()
    target.close()
    result = run_escrow("audit", "verify", data_dir=copy)
    fails(result, 1, "problem: record 3", "was edited", "1 problem(s)")
    report = json.loads(run_escrow("audit", "verify", "--json", data_dir=copy).stdout)
    assert (report["ok"], report["problems"][0]["seq"]) == (False, 3)


def test_recover_rebuilds_the_key_from_stdin_with_no_data_dir(tmp_path: Path) -> None:
    key = new_key()
    mnemonics = shares.split(key, 3, 5)
    text = "# paper shares\n" + "\n".join([mnemonics[4], mnemonics[0], mnemonics[2]]) + "\n"
    result = run_escrow("recover", stdin=text, env={"ESCROW_DATA_DIR": str(tmp_path / "none")})
    assert ok(result).strip() == key.swmkey()
    assert key.swmkey() not in result.stderr


def test_recover_errors_name_the_share_and_the_word(tmp_path: Path) -> None:
    mnemonics = shares.split(new_key(), 2, 3)
    other = shares.split(new_key(), 2, 3)
    fails(run_escrow("recover", stdin=mnemonics[0] + "\n"), 1,
          "too few shares; still missing 1 more share (1 of 2 given)")
    fails(run_escrow("recover", stdin=mnemonics[0] + "\n" + other[1] + "\n"), 1,
          "line 2 belongs to a different key than line 1")
    words = mnemonics[1].split()
    words[5] = "zzzzq"
    fails(run_escrow("recover", stdin=mnemonics[0] + "\n" + " ".join(words) + "\n"), 1,
          "line 2, word 6: 'zzzzq' is not a SLIP-39 word")
    fails(run_escrow("recover", stdin=""), 1, "no shares were given")


def test_recover_accepts_a_set_in_groups_and_says_which_group_is_short() -> None:
    key = new_key()
    first, second = shamir_mnemonic.generate_mnemonics(2, [(2, 3), (3, 5)], key.kek)
    fails(run_escrow("recover", stdin="\n".join([first[0], second[1], second[2], second[4]])),
          1, "still missing 1 more complete group(s) of 2, 2 needed: 1 more share of group 1",
          "add the missing shares")
    result = run_escrow("recover", stdin="\n".join([second[4], first[0], second[1], first[2],
                                                    second[0]]))
    assert ok(result).strip() == key.swmkey()


def test_recover_on_a_terminal_prompts_without_echo() -> None:
    key = new_key()
    mnemonics = shares.split(key, 2, 3)
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child becomes `escrow recover`
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "escrow", "recover"])
    transcript = b""
    typed = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        transcript += chunk
        # Answer each prompt once, after it is shown: getpass flushes input typed earlier.
        if transcript.count(b"): ") > typed and transcript.endswith(b"): "):
            os.write(fd, mnemonics[typed].encode() + b"\n")
            typed += 1
    if os.waitpid(pid, os.WNOHANG) == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    text = transcript.decode(errors="replace")
    assert "Share 1 (the first share): " in text
    assert "Share 2 (1 more share (1 of 2 given)): " in text
    assert key.swmkey() in text
    for mnemonic in mnemonics[:2]:
        assert " ".join(mnemonic.split()[4:8]) not in text

