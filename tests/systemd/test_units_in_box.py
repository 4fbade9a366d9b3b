"""Our units under a real systemd 252 next to Debian's own docker.service (docs/design.md,
"The lab").

The tests share one box and run in file order; each starts from the state it needs, and the
last one reboots it. Debian's docker.service allows 3 starts in 60 s (StartLimitBurst=3): tests
that restart docker on purpose call `systemctl reset-failed docker` first, so only the
start-limit test hits it. The agent is resident: one process lives through every docker
restart, crash and stop, which the tests check by its MainPID.
"""

from __future__ import annotations

import base64
import json
import re
import time

import pytest

from lab.box_site import AGENT, AGENT_CONFIG, Site
from tests.conftest import record

pytestmark = [pytest.mark.slow, pytest.mark.systemd]


def https_get(site: Site, url: str) -> str:
    return site.box.run(["/opt/swarm-unseal/bin/python", "-c", (
        "import ssl, sys, urllib.request; c = ssl.create_default_context("
        "cafile='/var/lib/escrow/tls/ca.pem'); "
        "print(urllib.request.urlopen(sys.argv[1], context=c).read().decode())"), url]).stdout


def restart_docker_and_time_unlock(site: Site, what: str) -> None:
    unlocks = site.unlocks()
    site.restart_docker()
    active = site.wait_swarm("active")
    record(what, active - site.docker_active_since())
    assert site.unlocks() == unlocks + 1


def agent_pid(site: Site) -> str:
    pid = site.unit("unseal-agent", "MainPID")["MainPID"]
    assert pid != "0"
    return pid


def cpu_seconds(site: Site, pid: str) -> float:
    fields = site.file(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime and stime, in clock ticks


def kill_dockerd(site: Site) -> dict[str, str]:
    """SIGKILL dockerd; return once systemd has started a new one or given up on docker (at
    its start limit systemd logs "Start request repeated too quickly" and leaves docker
    failed, with the Result of the last kill: 'signal')."""
    killed = site.unit("docker", "MainPID")["MainPID"]
    site.box.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", "docker"])
    return site.wait_unit(
        "docker", lambda s: (s["ActiveState"] == "active" and s["MainPID"] not in ("0", killed))
        or s["ActiveState"] == "failed", "MainPID", "ActiveState")


def test_escrow_runs_as_its_own_user_with_the_pin_as_a_credential(site: Site) -> None:
    shown = site.unit("escrow", "ActiveState", "Type", "MainPID")
    assert (shown["ActiveState"], shown["Type"]) == ("active", "notify")
    pid = shown["MainPID"]
    assert site.sh(f"stat -c %U /proc/{pid}").stdout.strip() == "escrow"
    assert site.sh("stat -c '%U %a' /var/lib/escrow").stdout.split() == ["escrow", "700"]
    # The PIN is not in the data directory; it reaches the server only as a credential.
    assert site.sh("test ! -e /var/lib/escrow/hsm-pin && stat -c %a /etc/escrow/hsm-pin"
                   ).stdout.strip() == "600"
    environ = site.file(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    credentials = next(v.split(b"=", 1)[1].decode() for v in environ
                       if v.startswith(b"CREDENTIALS_DIRECTORY="))
    assert credentials == "/run/credentials/escrow.service"
    assert site.sh(f"ls {credentials}").stdout.split() == ["hsm-pin"]
    assert json.loads(https_get(site, "https://localhost:8443/healthz"))["status"] == "ok"


def test_escrow_is_active_only_once_it_listens(site: Site) -> None:
    started = time.monotonic()
    # `systemctl restart` of a notify unit returns once READY=1 came: it must listen by then.
    site.box.run(["systemctl", "restart", "escrow"])
    record("escrow.service: systemctl restart until active", time.monotonic() - started)
    assert "127.0.0.1:8443" in site.sh("ss -Hltn 'sport = :8443'").stdout


def test_agent_unlocks_after_systemctl_restart_docker_and_is_the_same_process(
        site: Site) -> None:
    site.wait_swarm("active")
    assert site.unit("unseal-agent", "ActiveState")["ActiveState"] == "active"
    pid = agent_pid(site)
    restart_docker_and_time_unlock(site, "systemctl restart docker: docker active -> swarm active")
    status = site.unit("unseal-agent", "StatusText")["StatusText"]
    assert status.startswith("unlocked at "), status
    assert agent_pid(site) == pid


def test_agent_unlocks_after_each_of_five_dockerd_sigkills(site: Site) -> None:
    site.wait_swarm("active")
    pid = agent_pid(site)
    for kill in range(1, 6):
        unlocks = site.unlocks()
        site.box.run(["systemctl", "reset-failed", "docker"])
        kill_dockerd(site)
        active = site.wait_swarm("active")
        record(f"dockerd SIGKILL {kill}/5: docker active -> swarm active",
               active - site.docker_active_since())
        assert site.unlocks() == unlocks + 1
    # One agent through all five, never crashed or restarted.
    shown = site.unit("unseal-agent", "NRestarts", "Result", "ActiveState", "MainPID")
    assert shown == {"NRestarts": "0", "Result": "success", "ActiveState": "active",
                     "MainPID": pid}
    status = site.file(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    record("the resident agent's RSS after a restart and five crashes of dockerd", rss / 1024,
           "MiB")


def test_agent_leaves_a_stopped_docker_stopped_and_unlocks_once_it_is_started(
        site: Site) -> None:
    site.wait_swarm("active")
    pid = agent_pid(site)
    site.box.run(["systemctl", "reset-failed", "docker"])
    site.box.run(["systemctl", "stop", "docker"])
    site.wait_unit("unseal-agent", lambda s: "docker is not answering" in s["StatusText"],
                   "StatusText")
    # docker.socket still listens and would start docker on any connection: the agent makes
    # none while dockerd is away.
    time.sleep(2)
    assert site.unit("docker", "ActiveState")["ActiveState"] == "inactive"
    assert site.unit("docker.socket", "ActiveState")["ActiveState"] == "active"
    unlocks = site.unlocks()
    site.box.run(["systemctl", "start", "docker"])
    active = site.wait_swarm("active")
    record("systemctl stop docker, then start: docker active -> swarm active",
           active - site.docker_active_since())
    assert site.unlocks() == unlocks + 1
    assert agent_pid(site) == pid


def test_agent_waits_out_docker_at_its_start_limit_and_unlocks_when_docker_is_back(
        site: Site) -> None:
    site.wait_swarm("active")
    site.box.run(["systemctl", "reset-failed", "docker"])
    for _ in range(6):
        if kill_dockerd(site)["ActiveState"] == "failed":
            break
    assert site.unit("docker", "ActiveState")["ActiveState"] == "failed"
    # The agent stays, waiting on the socket's directory: it neither spins nor restarts.
    agent = site.unit("unseal-agent", "ActiveState", "NRestarts", "MainPID")
    assert agent["ActiveState"] == "active"
    used = cpu_seconds(site, agent["MainPID"])
    time.sleep(3)
    assert cpu_seconds(site, agent["MainPID"]) - used < 0.1
    assert site.unit("unseal-agent", "ActiveState", "NRestarts", "MainPID") == agent
    unlocks = site.unlocks()
    site.box.run(["systemctl", "reset-failed", "docker", "docker.socket"])
    site.box.run(["systemctl", "start", "docker"])
    active = site.wait_swarm("active")
    record("docker failed at its start limit, then started: docker active -> swarm active",
           active - site.docker_active_since())
    assert site.unlocks() == unlocks + 1
    assert site.unit("unseal-agent", "ActiveState", "NRestarts", "MainPID") == agent


def test_watchdog_kills_a_hung_agent_and_the_new_one_unlocks(site: Site) -> None:
    site.wait_swarm("active")
    before = site.unit("unseal-agent", "MainPID", "NRestarts")
    site.box.run(["kill", "-STOP", before["MainPID"]])
    hung = time.monotonic()
    site.wait_unit("unseal-agent", lambda s: s["MainPID"] not in ("0", before["MainPID"])
                   and s["ActiveState"] == "active", "MainPID", "ActiveState", timeout=90)
    record("hung agent (SIGSTOP) until a new agent is active (WatchdogSec=30s, RestartSec=5s)",
           time.monotonic() - hung)
    shown = site.unit("unseal-agent", "NRestarts")
    assert int(shown["NRestarts"]) == int(before["NRestarts"]) + 1
    assert "Watchdog timeout" in site.journal_text("unseal-agent")
    restart_docker_and_time_unlock(site, "after the watchdog restart: restart docker -> active")


def test_custodian_approval_shows_in_the_agent_status_line(site: Site) -> None:
    site.wait_swarm("active")
    set_policy_and_rotate(site, "auto,alice,bob")
    site.restart_docker()
    waiting = site.wait_unit("unseal-agent",
                             lambda s: "waiting for 1 more approval" in s["StatusText"],
                             "StatusText")["StatusText"]
    status = site.box.run(["systemctl", "status", "--no-pager", "unseal-agent"],
                          check=False).stdout
    assert 'Status: "locked, waiting for 1 more approval' in status, status
    pending = json.loads(site.custodian("alice", "requests", "--json").stdout)
    assert [p["request_id"] in waiting for p in pending] == [True]
    approved = time.monotonic()
    site.custodian("alice", "approve", pending[0]["request_id"], "--yes")
    active = site.wait_swarm("active")
    record("custodian approve -> swarm active", active - approved)
    status = site.box.run(["systemctl", "status", "--no-pager", "unseal-agent"],
                          check=False).stdout
    assert 'Status: "unlocked at ' in status, status
    set_policy_and_rotate(site, "auto,auto,alice,bob")


def set_policy_and_rotate(site: Site, slots: str) -> None:
    """A new policy applies from the next key version: rotate to re-split under it."""
    site.escrow_admin("cluster", "set-policy", site.cluster_id, "--threshold", "2",
                      "--slots", slots)
    site.box.run([AGENT, "rotate"])
    site.remember_unlock_key()


def test_broken_config_fails_once_with_a_line_naming_the_key(site: Site) -> None:
    site.wait_swarm("active")
    config = site.file("/etc/unseal-agent/config.toml")
    config.write_text(AGENT_CONFIG + "key_check_seconds = -3\n")
    try:
        site.box.run(["systemctl", "restart", "unseal-agent"], check=False)
        failed = site.wait_unit("unseal-agent", lambda s: s["ActiveState"] == "failed",
                                "ActiveState", "ExecMainStatus", "NRestarts", "InvocationID")
        assert failed["ExecMainStatus"] == "78"
        time.sleep(12)  # more than twice RestartSec=: no restart loop
        assert site.unit("unseal-agent", "ActiveState", "ExecMainStatus", "NRestarts",
                         "InvocationID") == failed
        lines = site.box.run(["journalctl", "--no-pager", "-o", "cat",
                              f"_SYSTEMD_INVOCATION_ID={failed['InvocationID']}",
                              "SYSLOG_IDENTIFIER=unseal-agent"]).stdout.splitlines()
        assert len(lines) == 1, lines
        assert "key_check_seconds" in lines[0], lines
    finally:
        config.write_text(AGENT_CONFIG)
        site.box.run(["systemctl", "reset-failed", "unseal-agent"])
        site.box.run(["systemctl", "start", "unseal-agent"])


def test_every_audit_record_is_copied_to_the_journal_with_its_hash(site: Site) -> None:
    records = json.loads(site.escrow_admin("audit", "show", "--json", "--limit", "1000").stdout)
    copies = [json.loads(line) for line in site.box.run(
        ["journalctl", "-o", "json", "--no-pager", "SYSLOG_IDENTIFIER=escrow-audit"]
    ).stdout.splitlines()]
    assert {r["hash"] for r in records} == {c["AUDIT_HASH"] for c in copies}
    assert {"unseal.release", "unseal.result", "key.deposit"} <= {
        c["AUDIT_EVENT"] for c in copies}


def test_journal_has_the_agent_fields_and_no_key_material(site: Site) -> None:
    entries = site.journal("unseal-agent")
    assert any(e.get("CLUSTER_ID") == site.cluster_id and e.get("NODE_ID") for e in entries)
    assert any(str(e.get("REQUEST_ID", "")).startswith("r-") for e in entries)
    site.sh("journalctl -o export --no-pager > /root/journal.export")
    journal = site.file("/root/journal.export").read_bytes()
    mnemonic = site.custodian("alice", "share", "export", "--cluster", site.cluster_id
                              ).stdout.strip()
    # Named, so that a failure says what leaked without printing any of it.
    secrets = {"alice's share": mnemonic.encode(),
               "six words of alice's share": " ".join(mnemonic.split()[4:10]).encode(),
               "the HSM PIN": site.file("/etc/escrow/hsm-pin").read_bytes().strip()}
    assert len(site.unlock_keys) >= 3  # the first key and two rotations
    for n, key in enumerate(sorted(site.unlock_keys)):
        payload = key.removeprefix("SWMKEY-1-")
        raw = base64.b64decode(payload + "=" * (-len(payload) % 4))
        secrets |= {f"unlock key {n} as {form}": value for form, value in (
            ("SWMKEY", key.encode()), ("payload", payload.encode()), ("raw bytes", raw),
            ("hex", raw.hex().encode()), ("base64", base64.b64encode(raw)),
            ("urlsafe base64", base64.urlsafe_b64encode(raw).rstrip(b"=")))}
    leaked = [name for name, value in secrets.items() if value in journal]
    assert leaked == [], f"the journal holds {leaked}"


@pytest.mark.parametrize(("unit", "goal"), [("escrow", 1.5), ("unseal-agent", 2.5)])
def test_hardening_is_in_force(site: Site, unit: str, goal: float) -> None:
    analysed = site.box.run(["systemd-analyze", "security", "--no-pager", f"{unit}.service"])
    print(analysed.stdout)  # the table is the evidence (pytest -s)
    score = float(re.findall(r"Overall exposure level for \S+: (\d+\.\d+)", analysed.stdout)[0])
    record(f"systemd-analyze security {unit}.service exposure (goal <= {goal})", score, "")
    assert score <= goal
    pid = site.unit(unit, "MainPID")["MainPID"]
    status = dict(line.split(":\t", 1) for line in site.file(f"/proc/{pid}/status").read_text(
        ).splitlines() if ":\t" in line)
    assert status["CapEff"].strip("0\n ") == ""
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    written = site.box.run(["nsenter", "-t", pid, "-m", "touch", "/usr/lib/written"], check=False)
    assert written.returncode != 0
    assert "Read-only file system" in written.stderr


def test_agent_and_docker_start_together_at_boot_and_the_agent_unlocks(site: Site) -> None:
    site.wait_swarm("active")
    before = agent_pid(site)
    booted = site.box.reboot()
    active = site.wait_swarm("active", timeout=120)
    record("boot: box started -> swarm active", active - booted)
    record("boot: docker active -> swarm active", active - site.docker_active_since())
    agent = site.unit("unseal-agent", "ActiveState", "MainPID", "ExecMainStartTimestampMonotonic")
    assert agent["ActiveState"] == "active"
    assert agent["MainPID"] != before
    # Started next to docker, not after it.
    assert int(agent["ExecMainStartTimestampMonotonic"]) / 1e6 < site.docker_active_since()
    this_boot = site.box.run(["journalctl", "-b", "-u", "unseal-agent", "-o", "cat",
                              "--no-pager"]).stdout.splitlines()
    assert sum(m.startswith("unlocked the manager") for m in this_boot) == 1
