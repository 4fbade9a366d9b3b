"""Three runbooks of what on-call sees at the escrow, run from their own text on real systemd
hosts (lab/box_swarm.py: the escrow's host and an autolocked manager, on one network):

- clone-suspected.md: the manager's disk is copied while it runs and the copy booted on
  another machine; the copy stays locked, the node is quarantined, the page's commands find
  both machines, and once the copy is off the node is re-admitted and unlocks again;
- hostile-clients.md: a stranger floods the escrow with unsigned requests; the page's journal
  and metrics commands show the summary and the counters, and its deposit checks name the node;
- audit-archive.md: the monthly archive typed on the escrow host, a hundred and two hundred
  days on (the shell's clock moved by libfaketime, so `date +%F` and the escrow's CLI agree),
  and both archives verified with the database as one chain.

The agents beat every 5 s (the least `heartbeat_seconds` takes) so that the wait the page asks
for before re-admitting a node is 15 s, not 90. The tests share the hosts and run in file order.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from lab import faketime
from lab.box_site import Site, build_wheels
from lab.box_swarm import PORT, BoxSwarm, box_swarm
from lab.netlab import wait_for
from lab.runbook import Runbook
from tests.conftest import record

pytestmark = [pytest.mark.slow, pytest.mark.systemd]

HEARTBEAT = 5
FLOOD = 40


class Watch:
    """The hosts, and what a test before left for the next one to check."""

    def __init__(self, swarm: BoxSwarm) -> None:
        self.swarm = swarm
        self.escrow = swarm.escrow
        self.manager = swarm.managers[0]
        self.node_id = self.manager.box.run(
            ["docker", "info", "--format", "{{.Swarm.NodeID}}"]).stdout.strip()
        self.flooded_at = 0.0
        # The last spare network node; the copy gets the first (BoxSwarm.add_box).
        self.stranger = len(swarm.lab.nodes) - 1


@pytest.fixture(scope="module")
def watch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watch]:
    wheels = build_wheels(tmp_path_factory.mktemp("wheels"))
    started = time.monotonic()
    # Two spare network nodes: the stranger's and the copy's machines.
    with box_swarm(tmp_path_factory.mktemp("boxes"), wheels, managers=1, spare=2,
                   agent_settings=f"heartbeat_seconds = {HEARTBEAT}\n") as swarm:
        record("escrow watch: two hosts booted and installed as README says",
               time.monotonic() - started)
        watched = Watch(swarm)
        flood(watched)
        yield watched


def flood(watch: Watch) -> None:
    """A stranger on the network sends unsigned custodian calls, from the host's curl in its
    own namespace: refused, and only counted and summed up."""
    url = f"https://{watch.swarm.lab.address(0)}:{PORT}/v1/requests"
    argv = ["ip", "netns", "exec", watch.swarm.lab.nodes[watch.stranger], "curl", "-sk",
            "-w", "%{http_code}\n"]
    for _ in range(FLOOD):
        argv += ["-o", "/dev/null", url]
    watch.flooded_at = time.monotonic()
    sent = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120)
    assert set(sent.stdout.split()) == {"401"}, sent.stdout


def test_a_copy_of_a_running_manager_stays_locked_and_the_page_finds_both_and_readmits(
        watch: Watch) -> None:
    book = Runbook("clone-suspected.md", {"CLUSTER_ID": watch.escrow.cluster_id,
                                          "NODE_ID": watch.node_id})
    manager = watch.manager
    original_boot = manager.box.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()
    manager.wait_swarm("active")
    copy = Site(watch.swarm.add_box("copy"))
    copy.box.boot_copy_of(manager.box)
    assert copy.box.run(["hostname"]).stdout.strip() == manager.box.name
    copy_boot = copy.box.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()
    wait_for(lambda: any(r["event"] == "node.clone_suspected" for r in watch.escrow.audit(50)),
             90, "the escrow quarantining the node")

    find = book.section("1. Find both machines")
    alerts = watch.escrow.type(find[0]).stdout.splitlines()
    assert len(alerts) == 1, alerts
    details = json.loads(alerts[0].split(" ", 3)[3])
    assert {original_boot, copy_boot} <= set(re.findall(r"[0-9a-f-]{36}", json.dumps(details)))
    assert find[1].said == "status quarantined"
    listed = watch.escrow.type(find[1]).stdout
    assert re.search(rf"{watch.node_id}\b.*\bquarantined\b", listed), listed
    # The copy stays locked; the original runs on, unlocked.
    assert copy.swarm_state() == "locked"
    assert manager.swarm_state() == "active"

    # 2. Shut the copy down (its power cut), then wait as step 3 says: three of its intervals.
    book.says("wait three heartbeat intervals")
    copy.box.cut_power()
    time.sleep(3 * HEARTBEAT + 2)
    readmit = book.command("3. Re-admit the node", "node allow")
    watch.escrow.type(readmit)
    listed = watch.escrow.type(find[1]).stdout
    assert re.search(rf"{watch.node_id}\b.*\bactive\b", listed), listed

    manager.restart_docker()
    manager.wait_swarm("active", timeout=90)
    released_to = [r for r in watch.escrow.audit(200) if r["event"] == "unseal.release"]
    assert released_to
    assert all(copy_boot not in json.dumps(r["details"]) for r in released_to)


def test_a_flood_of_unsigned_calls_is_summed_up_in_the_journal_and_counted(
        watch: Watch) -> None:
    book = Runbook("hostile-clients.md", {"CLUSTER_ID": watch.escrow.cluster_id,
                                          "NODE_ID": watch.node_id})
    stranger = watch.swarm.lab.address(watch.stranger)
    grep, metrics = book.section("A flood of refused requests")
    summary = re.compile(r"refused (\d+) unauthenticated request\(s\) from (\S+) in (\d+) s: ")

    def summed() -> list[re.Match[str]]:
        lines = watch.escrow.type(grep).stdout.splitlines()
        found = [summary.search(line) for line in lines if stranger in line]
        assert all(found), lines
        return [m for m in found if m]
    # The first refusal is written at once, the rest of the minute once it is over (the
    # escrow looks for tallies due every quarter of a minute).
    wait_for(lambda: sum(int(m.group(1)) for m in summed()) == FLOOD,
             watch.flooded_at + 90 - time.monotonic(), "the flood summed up in the journal")
    first, rest = (int(m.group(3)) for m in summed())
    assert first == 0, summed()
    assert 60 <= rest <= 75, summed()
    book.says("the first refusal from a source at once, then at most one line a minute")

    shown = watch.escrow.type(metrics).stdout
    refused = [line for line in shown.splitlines()
               if line.startswith("escrow_unauthenticated_refusals_total{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in refused) >= FLOOD, shown
    assert "escrow_source_limited_total" in shown, shown
    # Nothing of the stranger reached the audit log.
    assert all(stranger not in json.dumps(r) for r in watch.escrow.audit(1000))

    keys, audit = book.section(
        "429 `rate_limited` or 409 `too_many_versions` on a deposit, `key.unconfirmed`")
    assert watch.escrow.type(keys).stdout.strip()
    deposits = [line for line in watch.escrow.type(audit).stdout.splitlines()
                if "key.deposit " in line]
    assert deposits
    assert all(f"node:{watch.node_id}" in line for line in deposits), deposits
    book.says("`actor: node:NODE_ID`")


def days_on(site: Site, days: int) -> dict[str, str]:
    """The shell of an operator typing on `site` `days` days from now: libfaketime moves its
    wall clock, and every command it starts (`date`, runuser, the escrow's CLI) inherits it."""
    return faketime.moved(f"+{days}d", site.file("/"))


def test_monthly_archives_typed_as_the_page_says_verify_with_the_database_as_one_chain(
        watch: Watch) -> None:
    escrow = watch.escrow
    book = Runbook("audit-archive.md")
    make_directory, archive = book.section("When")
    escrow.type(make_directory)
    nothing = escrow.type(archive)
    assert book.says("nothing to archive") in nothing.stdout + nothing.stderr, nothing
    assert nothing.returncode == 0

    made: list[str] = []
    moved: list[str] = []
    for days in (100, 200):
        env = days_on(escrow, days)
        typed = escrow.type(archive, env=env)
        date = escrow.box.run(["date", "+%F"], env=env).stdout.strip()
        made.append(f"/var/lib/escrow/archive/audit-{date}.jsonl")
        assert escrow.box.run(["test", "-s", made[-1]], check=False).returncode == 0, typed
        moved.append(typed.stdout)
    assert escrow.box.run(["stat", "-c", "%a %U", made[0]]).stdout.split() == ["600", "escrow"]

    verify, with_archives = book.section("Verifying")
    whole = escrow.type(verify, env=days_on(escrow, 200)).stdout
    book.says('"records N..M verified, starting from archive checkpoint at seq K, hash H"')
    assert re.search(r"records \d+\.\.\d+ verified, starting from archive checkpoint at seq "
                     r"\d+, hash [0-9a-f]{64}", whole), whole
    examples = re.findall(r"--archive (\S+)", with_archives.text)
    both = Runbook("audit-archive.md", dict(zip(examples, made, strict=True)))
    chained = escrow.type(both.command("Verifying", "--archive"), env=days_on(escrow, 200))
    # Each archive continues the chain of the one before, and the database continues both.
    first = re.search(r"archived records 1\.\.(\d+) ", moved[0])
    assert first, moved
    assert f"archived records {int(first.group(1)) + 1}.." in moved[1], moved
    assert re.search(r"records 1\.\.\d+ verified across 2 archive\(s\) and the database",
                     chained.stdout), chained.stdout
    assert chained.returncode == 0, chained
