"""The clone drill, for real (issue 15): a live copy of a running manager's disk, started on a
second machine while the original runs, against the escrow's heartbeat checks.

Each machine is a node namespace with its own dockerd, source address, host name and boot id
(lab/clone.py: the agent runs in the node's network namespace and in a mount namespace of its
own with a file over /proc/sys/kernel/random/boot_id); the escrow serves from the lab's hub.
The copy is a `cp -a` of the original's docker root and agent state taken while both run, as a
disk snapshot would be: same node certificate and key, same Raft log, same file agent key, auto
policy. The drill's transcript is printed (under -s) and written to
bench/results/clone_drill.md, the evidence for issue 15's closing note.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.swarm_identity import read_identity
from lab import swtpm
from lab.clone import Drill, MachineAgent, drill_lab
from lab.dockerd import Dockerd
from lab.swtpm import SoftwareTpm

pytestmark = pytest.mark.slow

INTERVAL = 5  # heartbeat_seconds of every agent here
# The drills' transcripts go to this file when it is named (bench/README.md): a test run
# leaves the checkout as it found it.
TRANSCRIPT = os.environ.get("CLONE_DRILL_TRANSCRIPT", "")
T = TypeVar("T")


class Transcript:
    """Timestamped lines of one drill, printed as they happen, and its verdict: the evidence
    file keeps both, a failed drill's included (it shows how it failed)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.started = time.monotonic()
        self.lines: list[str] = []
        self.verdict = "did not finish"
        print(f"\n== {title}")

    def say(self, text: str) -> None:
        now = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
        line = f"{now}Z +{time.monotonic() - self.started:5.1f}s  {text}"
        self.lines.append(line)
        print(line)

    @contextlib.contextmanager
    def judged(self) -> Iterator[None]:
        """The block's assertions decide the verdict."""
        try:
            yield
        except AssertionError as failure:
            self.verdict = "FAILED: " + str(failure).splitlines()[0]
            raise
        self.verdict = f"passed ({time.monotonic() - self.started:.0f} s)"
        print(f"== {self.verdict}")

    def markdown(self) -> str:
        return "\n".join([f"## {self.title}", "", f"Verdict: {self.verdict}.", "",
                          "```", *self.lines, "```", ""])


@pytest.fixture(scope="module")
def evidence() -> Iterator[list[Transcript]]:
    """The drills' transcripts, written to CLONE_DRILL_TRANSCRIPT at the end if it is set."""
    transcripts: list[Transcript] = []
    yield transcripts
    if not transcripts or not TRANSCRIPT:
        return
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = ["# Clone drill", "",
            f"`tests/swarm/test_clone_drill.py`, run {when}: real autolocked dockerd "
            "managers in network namespaces, real `unseal-agent run` (heartbeat_seconds = "
            f"{INTERVAL}, auto policy, a file agent key unless the drill says otherwise) and a "
            "real `escrow serve` over TLS, "
            "with a webhook receiver. Each machine has its own address, host name and boot "
            "id (a file bind-mounted over `/proc/sys/kernel/random/boot_id` in the agent's "
            "own mount namespace). Times are UTC, then seconds since the drill began.", ""]
    Path(TRANSCRIPT).write_text("\n".join(head + [t.markdown() for t in transcripts]))


def rows(drill: Drill) -> dict[str, dict[str, Any]]:
    listed = drill.escrow.cli("node", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {row["node_id"]: row for row in json.loads(listed.stdout)}


def audit(drill: Drill, *events: str) -> list[dict[str, Any]]:
    """Audit records (time, event, details) of these events, oldest first."""
    shown = drill.escrow.cli("audit", "show", "--json", "--limit", "100000")
    assert shown.returncode == 0, shown.stderr
    return [record for record in json.loads(shown.stdout) if record["event"] in events]


def eventually(check: Callable[[], T], timeout: float) -> T:
    """check()'s first true value within `timeout` seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while not (found := check()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def identity(agent: MachineAgent) -> tuple[str, str]:
    """(node id, cluster id) of the node certificate in the machine's docker root."""
    found = read_identity(agent.daemon.data_root)
    return found.node_id, found.cluster_id


def brief(record: dict[str, Any]) -> str:
    """An audit record in one line, with the fields the drill is about."""
    details = record["details"]
    keys = ("boot_id", "source", "lock_state", "goodbye", "request_id", "held_until",
            "outcome", "shares", "reason")
    said = ", ".join(f"{key}={details[key]!r}" for key in keys if key in details)
    return f"audit {record['time'][11:23]} {record['event']}: {said}"


def seconds(record: dict[str, Any]) -> float:
    """An audit record's time, in seconds since the epoch."""
    return datetime.fromisoformat(record["time"]).timestamp()


def trouble(agent: MachineAgent) -> list[str]:
    """What the agent logged above info."""
    return [line for line in agent.log().splitlines()
            if any(f" {level}: " in line for level in ("warning", "error", "crit"))]


def states_for(seconds: float, *daemons: Dockerd) -> list[set[str]]:
    """Each daemon's swarm states seen, twice a second, for `seconds`."""
    seen: list[set[str]] = [set() for _ in daemons]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for states, daemon in zip(seen, daemons, strict=True):
            states.add(daemon.state())
        time.sleep(0.5)
    return seen


ASKED = ("unseal.request", "unseal.refused", "unseal.release", "unseal.result")


@dataclass
class Aftermath:
    """What the escrow and the webhook hold once the copy has had its chance."""
    asks: list[dict[str, Any]]  # the copy's unseal requests and refusals
    releases: list[dict[str, Any]]
    status: str
    suspected: list[dict[str, Any]]
    alerts: list[dict[str, object]]


def tell_aftermath(drill: Drill, node_id: str, copy_source: str, since: int,
                   say: Callable[[str], None]) -> Aftermath:
    alerts = eventually(lambda: [a for a in drill.alerts
                                 if a.get("event") == "clone_suspected"], 10)
    timeline = [r for r in audit(drill, "node.heartbeat", "node.clone_suspected", *ASKED)
                if r["seq"] > since]
    for record in timeline:
        say(brief(record))
    status = rows(drill)[node_id]["status"]
    say(f"escrow node list: status {status}")
    suspected = [r for r in timeline if r["event"] == "node.clone_suspected"]
    for record in suspected:
        say(f"node.clone_suspected details: {json.dumps(record['details'], sort_keys=True)}")
    for alert in alerts:
        say(f"webhook received: {alert['text']}")
    asks = [r for r in timeline if r["event"] in ("unseal.request", "unseal.refused")
            and r["details"].get("source") == copy_source]
    return Aftermath(asks, [r for r in timeline if r["event"] == "unseal.release"], status,
                     suspected, alerts)


def start_copy(drill: Drill, original: MachineAgent, copy: MachineAgent,
               say: Callable[[str], None]) -> float:
    """The copy boots as a machine does: its agent first (the unit is not ordered after
    docker), then dockerd. Started just after one of the original's beats, so that the copy
    asks before the original's next one. When the copy's dockerd answered."""
    escrow = drill.escrow
    before = escrow.last_beat(original.boot_id)
    beat = eventually(lambda: (escrow.last_beat(original.boot_id) or "") > (before or ""),
                      INTERVAL + 2)
    say(f"original beat at {escrow.last_beat(original.boot_id)}" if beat else
        "no beat of the original seen")
    copy.start()
    eventually(lambda: escrow.last_beat(copy.boot_id), 5)
    say(f"copy's agent up (pid {copy.pid}, boot {copy.boot_id}, its dockerd not started): "
        f"first beat at {escrow.last_beat(copy.boot_id)}")
    copy.daemon.start()
    return time.monotonic()


def tell_machines(original: MachineAgent, copy: MachineAgent, copy_states: set[str],
                  say: Callable[[str], None]) -> bool:
    """The copy's agent log, and how the original is; whether its agent still runs."""
    for line in copy.log().splitlines():
        say(f"copy agent: {line}")
    if copy_states != {"locked"}:
        say(f"copy dockerd: {copy.daemon.log().splitlines()[-1]}")
    running = original.running()
    say(f"original: agent pid {original.pid} running: {running}, swarm "
        f"{original.daemon.state()}, its agent's warnings: {trouble(original)}")
    return running


def test_a_copy_started_while_the_original_runs_stays_locked_and_quarantines_the_node(
        tmp_path: Path, evidence: list[Transcript]) -> None:
    transcript = Transcript("A copy started while the original runs stays locked")
    evidence.append(transcript)
    say = transcript.say
    original_boot, copy_boot = str(uuid.uuid4()), str(uuid.uuid4())
    with drill_lab(tmp_path / "escrow", nodes=2) as drill:
        lab = drill.lab
        original = drill.manager(0, tmp_path / "original", original_boot,
                                 heartbeat_seconds=INTERVAL)
        node_id, cluster_id = identity(original)
        original.start()
        eventually(lambda: rows(drill)[node_id]["liveness"] == "unlocked", 10)
        say(f"original: host {original.hostname}, address {lab.address(0)}, boot "
            f"{original_boot}, node {node_id}: swarm {original.daemon.state()}, agent pid "
            f"{original.pid}, escrow liveness {rows(drill)[node_id]['liveness']}")

        copy = drill.snapshot(original, 1, tmp_path / "copy", copy_boot)
        copy_identity = identity(copy)
        say(f"snapshot of the running original's docker root (swarm/ included) and agent "
            f"state (state.json, agent-key.pem) copied to {lab.nodes[1]} (address "
            f"{lab.address(1)}): node {copy_identity[0]}")
        since = max(r["seq"] for r in audit(drill, "node.heartbeat"))
        up = start_copy(drill, original, copy, say)
        copy_came_up = copy.daemon.state()
        say(f"copy's dockerd up: swarm {copy_came_up}")
        # Three intervals: the hold (one), the original's beats, the copy's asking again.
        copy_states, original_states = states_for(3 * INTERVAL, copy.daemon, original.daemon)
        watched = time.monotonic() - up
        after = tell_aftermath(drill, node_id, lab.address(1), since, say)
        say(f"watched {watched:.1f} s from the copy's dockerd answering: copy's swarm "
            f"{sorted(copy_states)}, original's {sorted(original_states)}")
        original_running = tell_machines(original, copy, copy_states, say)
    with transcript.judged():
        assert copy_identity == (node_id, cluster_id)  # the same node, as far as it can tell
        assert copy_came_up == "locked"
        assert not after.releases, (
            f"{sum(len(r['details']['shares']) for r in after.releases)} share(s) released "
            f"to the copy's request {after.releases[0]['details']['request_id']}")
        assert after.asks, "the copy never asked"
        first = after.asks[0]
        if first["event"] == "unseal.request":  # held until the original's next beat
            assert first["details"]["held_until"], "the copy's request was not held"
        else:  # the original beat before the copy asked: quarantined already
            assert first["details"]["reason"] == "clone_suspected"
        assert copy_states == {"locked"}
        assert watched >= 3 * INTERVAL
        assert original_states == {"active"}
        assert original_running
        assert not trouble(original)
        assert after.status == "quarantined"
        [record] = after.suspected
        details = record["details"]
        assert (details["node_id"], details["boot_id"], details["source"]) == (
            node_id, original_boot, lab.address(0))
        assert {(s["boot_id"], s["source"]) for s in details["alongside"]} == {
            (copy_boot, lab.address(1))}
        if first["event"] == "unseal.request":
            assert first["details"]["request_id"] in {s.get("request_id")
                                                      for s in details["alongside"]}
        assert [alert["details"] for alert in after.alerts] == [details]
        assert any("409 clone_suspected" in line for line in copy.log().splitlines()), \
            copy.log()


def test_a_reboot_after_the_agent_said_goodbye_unlocks_without_a_hold(
        tmp_path: Path, evidence: list[Transcript]) -> None:
    transcript = Transcript("A reboot-like restart is not delayed")
    evidence.append(transcript)
    say = transcript.say
    first_boot, second_boot = str(uuid.uuid4()), str(uuid.uuid4())
    with drill_lab(tmp_path / "escrow", nodes=1) as drill:
        node = drill.manager(0, tmp_path / "node", first_boot, heartbeat_seconds=INTERVAL)
        node_id, _ = identity(node)
        node.start()
        eventually(lambda: rows(drill)[node_id]["liveness"] == "unlocked", 10)
        say(f"node {node_id}, address {drill.lab.address(0)}, boot {first_boot}: swarm "
            f"{node.daemon.state()}, escrow liveness {rows(drill)[node_id]['liveness']}")
        code = node.stop()  # SIGTERM, as systemd stops it
        say(f"agent stopped with SIGTERM (exit {code}); escrow liveness "
            f"{rows(drill)[node_id]['liveness']}")
        node.daemon.restart()
        came_back = node.daemon.state()
        say(f"dockerd restarted: swarm {came_back}")
        node.boot_id = second_boot
        started = time.monotonic()
        node.start()
        ready = time.monotonic() - started
        unlocked = node.wait_state("active", timeout=30) + ready
        say(f"agent started with boot {second_boot}: READY after {ready:.2f} s, swarm active "
            f"{unlocked:.2f} s after its start")
        timeline = audit(drill, "node.heartbeat", "unseal.request", "unseal.release",
                         "unseal.result")
        for record in timeline:
            say(brief(record))
        requests = [r for r in timeline if r["event"] == "unseal.request"]
        results = [r for r in timeline if r["event"] == "unseal.result"]
        asked_to_unlocked = (seconds(results[-1]) - seconds(requests[0])
                             if requests and results else float("inf"))
        say(f"unseal.request to unseal.result (unlocked): {asked_to_unlocked:.2f} s")
        status = rows(drill)[node_id]["status"]
        say(f"escrow node list: status {status}")
    with transcript.judged():
        assert code == 0
        goodbyes = [(r["details"]["boot_id"], r["details"]["lock_state"]) for r in timeline
                    if r["event"] == "node.heartbeat" and r["details"]["goodbye"]]
        assert goodbyes == [(first_boot, "unlocked")]
        assert came_back == "locked"
        # A hold would last one interval (held_until: the request's time + INTERVAL).
        assert unlocked < 0.8 * INTERVAL, f"{unlocked:.2f} s from the agent's start to active"
        assert asked_to_unlocked < INTERVAL / 2, f"{asked_to_unlocked:.2f} s request to unlock"
        [request] = requests
        assert request["details"]["boot_id"] == second_boot
        assert request["details"]["held_until"] == ""
        assert request["details"]["source"] == drill.lab.address(0)
        assert [(r["details"]["request_id"], r["details"]["outcome"]) for r in results] == [
            (request["details"]["request_id"], "unlocked")]
        assert status == "active"


def tpm_held_key(agent: MachineAgent, tpm: SoftwareTpm) -> None:
    """`agent` keeps its key in `tpm` through tpm2-pkcs11: the token's store and its PIN in the
    agent's state directory, on the disk a copy takes along; the TPM's state apart from it."""
    store = agent.state_dir / "tpm2-pkcs11"
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    pin = agent.state_dir / "agent-key-pin"
    if not pin.exists():
        pin.write_text(secrets.token_urlsafe(18) + "\n")
        pin.chmod(0o600)
    agent.settings.update(agent_key_pkcs11_module=swtpm.MODULE,
                          agent_key_pkcs11_token="unseal-agent",
                          agent_key_pkcs11_pin_file=str(pin))
    agent.env.update(tpm.env, TPM2_PKCS11_STORE=str(store))


def power_off(agent: MachineAgent) -> None:
    agent.stop()
    agent.daemon.stop()


def tpm_manager(drill: Drill, chip: SoftwareTpm, base: Path, boot_id: str) -> MachineAgent:
    """An autolocked manager on node 0 whose agent key is made inside `chip` at enrollment."""
    agent = drill.manager(0, base, boot_id, enroll=False, heartbeat_seconds=INTERVAL)
    tpm_held_key(agent, chip)
    agent.enroll()
    return agent


@dataclass
class Thief:
    """What a copy of the disk without the TPM's state got."""
    states: set[str]  # its swarm, watched for two intervals
    status: subprocess.CompletedProcess[str]  # `unseal-agent status` on it
    log: str  # its agent's log, TPM-held key
    audited: list[dict[str, Any]]  # escrow records of anything it sent
    own_key_states: set[str]  # its swarm with a key of the thief's own
    own_key_log: str
    reenroll: subprocess.CompletedProcess[str]


def steal_without_the_tpm(drill: Drill, original: MachineAgent, chip: SoftwareTpm,
                          base: Path, boot_id: str, say: Callable[[str], None]) -> Thief:
    lab = drill.lab
    copy = drill.snapshot(original, 1, base, boot_id)
    tpm_held_key(copy, chip)
    say(f"disk copied to {lab.nodes[1]} ({lab.address(1)}): docker root, agent state "
        "(state.json, the tpm2-pkcs11 store, the PIN file); a TPM of the thief's own")
    since = max(r["seq"] for r in audit(drill, "node.heartbeat", "unseal.result"))
    copy.start()
    copy.daemon.start()
    [states] = states_for(2 * INTERVAL, copy.daemon)
    status = copy.command("status")
    log = copy.log()
    for line in log.splitlines():
        if " error: " in line:
            say(f"copy agent: {line}")
    problem = [line for line in status.stdout.splitlines() + status.stderr.splitlines()
               if line.startswith("problem:")]
    say(f"copy: swarm {sorted(states)}; `unseal-agent status` exit {status.returncode}: "
        f"{problem}")
    audited = [r for r in audit(drill, "node.heartbeat", *ASKED) if r["seq"] > since]
    say(f"escrow audit records since the copy started: {len(audited)}")

    # The thief's next move: a key of their own, signing as the node.
    copy.stop()
    for setting in ("agent_key_pkcs11_module", "agent_key_pkcs11_token",
                    "agent_key_pkcs11_pin_file"):
        del copy.settings[setting]
    stranger = ec.generate_private_key(ec.SECP256R1())
    key_file = copy.state_dir / "agent-key.pem"
    key_file.write_bytes(stranger.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    key_file.chmod(0o600)
    before = len(copy.log())
    copy.start()
    eventually(lambda: "bad_signature" in copy.log()[before:], 20)
    reenroll = copy.command("enroll")
    [own_key_states] = states_for(2, copy.daemon)
    own_key_log = copy.log()[before:]
    for line in own_key_log.splitlines():
        if "bad_signature" in line:
            say(f"copy agent, the thief's key: {line}")
            break
    say(f"copy with a key of its own: swarm {sorted(own_key_states)}; `unseal-agent enroll` "
        f"exit {reenroll.returncode}: {reenroll.stderr.strip().splitlines()[0]}")
    audited += [r for r in audit(drill, "node.heartbeat", *ASKED, "node.enroll")
                if r["seq"] > since and r not in audited]
    power_off(copy)
    return Thief(states, status, log, audited, own_key_states, own_key_log, reenroll)


def steal_with_the_tpm(drill: Drill, original: MachineAgent, chip: SoftwareTpm, base: Path,
                       boot_id: str, say: Callable[[str], None]) -> None:
    """The disk and the TPM's own state (its seeds): what the chip keeps to itself on real
    hardware. On the original's own network spot: a manager listens on the address it joined
    with."""
    twin = drill.snapshot(original, 0, base, boot_id)
    tpm_held_key(twin, chip)
    say("disk copied again, and this time the TPM's state (its seeds) too")
    since = max(r["seq"] for r in audit(drill, "unseal.result"))
    twin.start()
    twin.daemon.start()
    say(f"twin: unlocked in {twin.wait_state('active'):.1f} s, as the node itself")
    for record in [r for r in audit(drill, "unseal.release") if r["seq"] > since]:
        say(brief(record))


def test_a_disk_copied_without_its_tpm_cannot_sign_gets_nothing_and_with_it_signs_as_the_node(
        tmp_path: Path, evidence: list[Transcript]) -> None:
    transcript = Transcript("A stolen disk with a TPM-held agent key: without the TPM's "
                            "state, then with it")
    evidence.append(transcript)
    say = transcript.say
    boots = {name: str(uuid.uuid4()) for name in ("original", "again", "copy", "twin")}
    with contextlib.ExitStack() as stack:
        drill = stack.enter_context(drill_lab(tmp_path / "escrow", nodes=2))
        chip = stack.enter_context(swtpm.software_tpm(tmp_path / "tpm-original"))
        original = tpm_manager(drill, chip, tmp_path / "original", boots["original"])
        node_id, _ = identity(original)
        [enrollment] = audit(drill, "node.enroll")
        files = sorted(p.name for p in original.state_dir.rglob("*") if p.is_file())
        say(f"original: node {node_id} on {drill.lab.nodes[0]} ({drill.lab.address(0)}), "
            "enrolled with a P-256 key made inside its TPM (agent_key_sha256 "
            f"{enrollment['details']['agent_key_sha256'][:16]}…); agent state files: {files}")
        original.start()
        original.daemon.restart()
        say(f"original: dockerd restarted, unlocked by its agent in "
            f"{original.wait_state('active'):.1f} s (its request and beats signed in the TPM)")
        power_off(original)
        say("original powered off (agent stopped, dockerd stopped)")

        thief = steal_without_the_tpm(
            drill, original, stack.enter_context(swtpm.software_tpm(tmp_path / "tpm-thief")),
            tmp_path / "copy", boots["copy"], say)

        original.boot_id = boots["again"]
        original.start()
        original.daemon.start()
        say(f"original powered on again (boot {boots['again']}): unlocked in "
            f"{original.wait_state('active'):.1f} s")
        power_off(original)

        steal_with_the_tpm(drill, original, stack.enter_context(swtpm.software_tpm(
            tmp_path / "tpm-twin", state_from=chip.state)), tmp_path / "twin", boots["twin"],
            say)
        releases = audit(drill, "unseal.release")
        requests = {r["details"]["request_id"]: r for r in audit(drill, "unseal.request")}
    escrow_log = drill.escrow.log()
    summaries = [line for line in escrow_log.splitlines()
                 if drill.lab.address(1) in line and "bad_signature" in line]
    for line in summaries:
        say(f"escrow log: {line}")
    with transcript.judged():
        assert not [name for name in files if name.endswith(".pem")]
        assert "tpm2_pkcs11.sqlite3" in files
        assert thief.states == {"locked"}
        assert thief.status.returncode == 1
        assert "this TPM cannot load the token's keys" in thief.status.stderr
        assert "this TPM cannot load the token's keys" in thief.log
        assert thief.audited == []  # it could sign nothing, so the escrow heard nothing
        assert "bad_signature" in thief.own_key_log
        assert summaries, "the escrow's log does not name the thief's refusals"
        assert thief.own_key_states == {"locked"}
        assert thief.reenroll.returncode == 1
        released_to = {requests[r["details"]["request_id"]]["details"]["boot_id"]
                       for r in releases}
        assert boots["copy"] not in released_to
        assert released_to == {boots["original"], boots["again"], boots["twin"]}
