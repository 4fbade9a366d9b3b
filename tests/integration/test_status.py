"""The fleet's status (GET /v1/status) against a real escrow: what a viewer sees of managers
and of the requests waiting for custodians, that nothing secret is in it, that it is refused
to anyone without a viewer token, and that it stays up, saying so, while the HSM is away."""

from __future__ import annotations

import json
import time

from lab.api import enrolled, run, unseal, waiting_manager
from lab.server import EscrowProcess
from tests.conftest import fails, ok


def test_a_viewer_sees_each_manager_s_state_and_who_could_approve_what_waits(
        escrow: EscrowProcess) -> None:
    request_id, _ = waiting_manager(escrow)
    status, fleet = escrow.fleet(escrow.viewer("oncall"))
    assert status == 200
    (shown,) = fleet["clusters"]
    assert (shown["threshold"], shown["slots"]) == (3, ["auto", "alice", "bob"])
    assert [v["version"] for v in shown["versions"]] == [1]
    states = {n["hostname"]: n["state"] for n in shown["nodes"]}
    assert states == {"manager-1": "unlocked", "manager-2": "waiting"}
    (waiting,) = shown["requests"]
    assert waiting["request_id"] == request_id
    assert (waiting["needed"], waiting["approved_by"], waiting["could_approve"]) == (
        1, ["alice"], ["bob"])
    assert waiting["hostname"] == "manager-2"
    health = fleet["health"]
    assert (health["hsm"], health["store"], health["writable"]) == ("up", "sqlite", True)
    assert health["replicas"] == []


def test_the_status_holds_no_share_key_or_signature(escrow: EscrowProcess) -> None:
    _, node, key = enrolled(escrow, slots="auto,auto")
    assert run(unseal(escrow, node)) == [(1, key)]
    _, fleet = escrow.fleet(escrow.viewer("oncall"))
    text = json.dumps(fleet)
    for forbidden in ("sealed", "signature", "wrapped", "mnemonic", "public_key", "cert",
                      key.swmkey(), key.kek.hex(), key.fingerprint(node.cluster_id), "BEGIN"):
        assert forbidden not in text, forbidden


def test_the_status_is_refused_without_a_viewer_token_a_wrong_one_or_a_removed_one(
        escrow: EscrowProcess) -> None:
    enrolled(escrow)
    token = escrow.viewer("oncall")
    assert escrow.fleet(token)[0] == 200
    for given, reason in ((None, "unauthenticated"), ("esv_" + "x" * 43, "unknown_viewer"),
                          (token[:-1], "unknown_viewer"), ("", "unauthenticated")):
        status, body = escrow.fleet(given)
        assert (status, body["error"]) == (401, reason), given
        assert "clusters" not in body
    ok(escrow.cli("viewer", "remove", "oncall"))
    status, body = escrow.fleet(token)
    assert (status, body["error"]) == (401, "unknown_viewer")
    assert [e for e, _ in escrow.audit("viewer.")] == ["viewer.add", "viewer.remove"]


def test_viewer_tokens_are_written_once_to_a_private_file_and_never_printed(
        escrow: EscrowProcess) -> None:
    path = escrow.base / "t"
    added = escrow.cli("viewer", "add", "oncall", "--token-file", str(path))
    ok(added)
    token = path.read_text().strip()
    assert path.stat().st_mode & 0o777 == 0o600
    assert token.startswith("esv_")
    assert len(token) > 40
    listed = escrow.cli("viewer", "list", "--json")
    for shown in (added.stdout + added.stderr, listed.stdout, json.dumps(escrow.audit())):
        assert token not in shown
    assert json.loads(listed.stdout)[0]["name"] == "oncall"
    fails(escrow.cli("viewer", "add", "oncall", "--token-file", str(escrow.base / "u")), 1,
          "already exists")
    assert not (escrow.base / "u").exists()
    fails(escrow.cli("viewer", "add", "other", "--token-file", str(path)), 1,
          "already exists", "never overwritten")
    assert path.read_text().strip() == token


def test_the_status_stays_up_and_says_the_hsm_is_down_while_its_token_is_away(
        escrow: EscrowProcess) -> None:
    enrolled(escrow)
    token = escrow.viewer("oncall")
    tokens = escrow.data_dir / "softhsm" / "tokens"
    away = tokens.with_name("tokens.away")
    tokens.rename(away)
    try:
        status, fleet = escrow.fleet(token)
        assert status == 200
        assert fleet["health"]["hsm"] == "down"
        assert "stopped answering" in fleet["health"]["hsm_error"]
        assert len(fleet["clusters"]) == 1
    finally:
        away.rename(tokens)
    deadline = time.monotonic() + 15  # the escrow tries the token again every 2 s
    while escrow.fleet(token)[1]["health"]["hsm"] != "up":
        assert time.monotonic() < deadline, "the status never saw the token back"
        time.sleep(0.5)
