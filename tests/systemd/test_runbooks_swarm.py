"""docs/runbooks/power-cut.md run from its own text on four real systemd hosts: the escrow's and
three managers of one autolocked swarm (lab/box_swarm.py). Every host loses power at once, as
in a data-centre cut, and they come back in one order or another; the managers must be
`active` again by themselves under an automatic policy, and after one approval of the whole
cluster under a policy that needs a custodian. The figures go to the run's summary and into
the runbook.

The tests share the boxes and run in file order.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator

import pytest

from lab.box_site import AGENT, CUSTODIANS, Site, build_wheels
from lab.box_swarm import BoxSwarm, box_swarm
from lab.netlab import run_all
from lab.runbook import Command, Runbook
from tests.conftest import record

pytestmark = [pytest.mark.slow, pytest.mark.systemd]

WAITING = "2. What are the managers doing?"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BoxSwarm]:
    wheels = build_wheels(tmp_path_factory.mktemp("wheels"))
    started = time.monotonic()
    with box_swarm(tmp_path_factory.mktemp("boxes"), wheels) as boxes:
        record("power cut: four hosts booted and installed as README says",
               time.monotonic() - started)
        yield boxes


def all_active(swarm: BoxSwarm, timeout: float = 120) -> float:
    """When the last manager was seen `active` (each watched at once), on the host's clock."""
    seen: dict[str, float] = {}

    def watch(site: Site) -> Callable[[], None]:
        def until_active() -> None:
            seen[site.box.name] = site.wait_swarm("active", timeout=timeout)
        return until_active
    for error in run_all([watch(site) for site in swarm.managers]):
        raise error
    swarm.wait_ready()
    return max(seen.values())


def last_unlock(swarm: BoxSwarm) -> float:
    """When the last manager's agent said it unlocked, on the clock the boxes share with us."""
    return max(max(int(str(entry["__MONOTONIC_TIMESTAMP"])) / 1e6
                   for entry in site.journal("unseal-agent")
                   if str(entry.get("MESSAGE", "")).startswith("unlocked the manager"))
               for site in swarm.managers)


def status_lines(swarm: BoxSwarm, book: Runbook) -> list[str]:
    """Step 2 of the runbook on every manager."""
    command = book.command(WAITING, "systemctl status unseal-agent")
    return [site.type(command).stdout.strip() for site in swarm.managers]


def test_a_power_cut_of_every_host_with_the_escrow_back_last_unlocks_by_itself(
        swarm: BoxSwarm) -> None:
    book = Runbook("power-cut.md")
    swarm.wait_ready()
    swarm.cut_power(swarm.sites)
    started = swarm.power_on(swarm.managers)
    unreachable = book.says("locked; escrow unreachable, retrying in")
    for site in swarm.managers:
        site.wait_unit("unseal-agent", lambda s: unreachable in s["StatusText"], "StatusText")
    assert all(unreachable in line for line in status_lines(swarm, book))

    started |= swarm.power_on([swarm.escrow])
    start = book.command("1. Is the escrow up? It must come up first.", "systemctl start escrow")
    assert start.said == "active = listening"
    assert swarm.escrow.type(start).stdout.split() == ["active"]
    active = all_active(swarm)
    back = max(started.values())
    record("power cut, automatic policy, escrow host back last: its start -> last agent "
           "unlocked", last_unlock(swarm) - back)
    record("power cut, automatic policy, escrow host back last: its start -> last manager "
           "active", active - back)
    assert all(line.startswith('Status: "unlocked at ') for line in status_lines(swarm, book))
    # New boots' requests were held (those whose old boot beat "unlocked" within two
    # intervals of asking): each manager's boot is a boot of its own.
    book.says("holds the new boot's request for one interval")
    asked = [r for r in swarm.escrow.audit(100) if r["event"] == "unseal.request"][-3:]
    assert any(isinstance(r["details"], dict) and r["details"]["held_until"] for r in asked), asked


def test_a_power_cut_under_a_custodian_policy_ends_with_one_approval_of_the_cluster(
        swarm: BoxSwarm) -> None:
    book = Runbook("power-cut.md", {
        "https://escrow.example:8443": "https://127.0.0.1:8443",
        "ESCROW_CA=ca.pem": "ESCROW_CA=/var/lib/escrow/tls/ca.pem",
        "~/alice.key": f"{CUSTODIANS}/alice.key",
        "CLUSTER_ID": swarm.escrow.cluster_id})
    swarm.wait_ready()
    # A policy that needs one custodian, in force from the next key version on.
    swarm.escrow.escrow_admin("cluster", "set-policy", swarm.escrow.cluster_id,
                              "--threshold", "2", "--slots", "auto,alice,bob")
    swarm.managers[0].box.run([AGENT, "rotate"])
    swarm.managers[0].remember_unlock_key()
    swarm.cut_power(swarm.sites)
    started = swarm.power_on([swarm.escrow])
    started |= swarm.power_on(swarm.managers)
    waiting = "locked, waiting for 1 more approval"
    for site in swarm.managers:
        site.wait_unit("unseal-agent", lambda s: waiting in s["StatusText"], "StatusText",
                       timeout=90)
    assert all(waiting in line for line in status_lines(swarm, book))

    approve = "\n".join(c.text for c in book.section("3. Approve (policies with custodians)"))
    approved = time.monotonic()
    typed = swarm.escrow.type_as_custodian(Command(approve, "", ""), stdin="y\n")
    assert (f"3 managers of {swarm.escrow.cluster_id} "
            f"{book.says('locked within 1 min of')}") in " ".join(typed.stdout.split()), \
        typed.stdout
    assert re.search(rf"{book.says('batch b-')}\S+: 3 approved, 0 refused", typed.stdout), \
        typed.stdout
    active = all_active(swarm)
    record("power cut, custodian policy, escrow back first: last host started -> last "
           "manager active", active - max(started.values()))
    record("power cut, custodian policy: escrow approve --cluster --all -> last agent "
           "unlocked", last_unlock(swarm) - approved)
    record("power cut, custodian policy: escrow approve --cluster --all -> last manager "
           "active", active - approved)


def test_a_compromised_manager_revoked_while_it_asks_gets_nothing_and_the_rest_rotate_away(
        swarm: BoxSwarm) -> None:
    escrow, healthy, other, lost = swarm.escrow, *swarm.managers
    swarm.wait_ready()
    node_id = lost.box.run(["docker", "info", "--format", "{{.Swarm.NodeID}}"]).stdout.strip()
    book = Runbook("node-compromised.md", {"CLUSTER_ID": escrow.cluster_id, "NODE_ID": node_id})
    # The policy still needs a custodian (the test before): the lost manager's restart waits.
    lost.restart_docker()
    lost.wait_unit("unseal-agent", lambda s: "waiting for 1 more approval" in s["StatusText"],
                   "StatusText")
    pending = escrow.custodian("alice", "requests", "--json")
    assert node_id in pending.stdout

    cut_off = book.section("1. Cut the node off the escrow (at once)")
    assert node_id in escrow.type(cut_off[0]).stdout
    escrow.type(cut_off[1])
    revoked = book.says("locked; this node is revoked at the escrow")
    lost.wait_unit("unseal-agent", lambda s: revoked in s["StatusText"], "StatusText")
    assert escrow.custodian("alice", "requests", "--json").stdout.count(node_id) == 0
    what_it_got = [line.split()[2] for line in escrow.type(cut_off[2]).stdout.splitlines()]
    assert book.says("node.revoke") in what_it_got
    assert book.says("unseal.release") in what_it_got

    for command in book.section("2. Remove it from the swarm"):
        healthy.type(command)
    swarm.wait_ready(2)
    # The site's own choice for the rest of the night: automatic again from the next version.
    escrow.escrow_admin("cluster", "set-policy", escrow.cluster_id, "--threshold", "2",
                        "--slots", "auto,auto,alice,bob")
    rotated = healthy.type(book.command("3. Rotate the unlock key, from a healthy manager",
                                        "unseal-agent rotate"))
    assert rotated.returncode == 0
    generation = re.compile(r"^key generation: +(\S+)$", re.MULTILINE)
    generations = {generation.findall(site.type(Command(f"{AGENT} status", "", "")).stdout)[0]
                   for site in (healthy, other)}
    assert len(generations) == 1, generations

    prune = book.section("4. Destroy the old versions once every manager is on the new key")
    for site in (other, healthy):
        unlocks = site.unlocks()
        site.box.run(["systemctl", "reset-failed", "docker"])
        site.type(prune[0])
        swarm.wait_ready(2)
        assert site.unlocks() == unlocks + 1
    dry = escrow.type(prune[1])
    assert "kept version" not in dry.stdout + dry.stderr
    escrow.type(prune[2])
    versions = json.loads(escrow.escrow_admin("key", "list", "--cluster", escrow.cluster_id,
                                              "--json").stdout)
    assert len(versions) == 1, (dry.stdout, versions)

    for command in book.section("5. Re-enroll the rest (only if their agent keys may be "
                                "exposed too)"):
        other.type(command)
    unlocks = other.unlocks()
    other.restart_docker()
    other.wait_swarm("active")
    swarm.wait_ready(2)
    assert other.unlocks() == unlocks + 1
    # And the revoked node, still asking, got nothing after the revocation.
    records = json.loads(escrow.escrow_admin("audit", "show", "--json", "--limit", "1000").stdout)
    revoked_at = max(r["seq"] for r in records if r["event"] == "node.revoke")
    assert [r["event"] for r in records if r["seq"] > revoked_at
            and r["event"] == "unseal.release" and node_id in json.dumps(r)] == []
    assert lost.swarm_state() == "locked"


def test_a_patch_night_window_signed_the_day_before_unlocks_each_planned_restart(
        swarm: BoxSwarm) -> None:
    escrow, first, second = swarm.escrow, *swarm.managers[:2]  # the two left in the swarm
    swarm.wait_ready(2)
    ids = [site.box.run(["docker", "info", "--format", "{{.Swarm.NodeID}}"]).stdout.strip()
           for site in (first, second)]
    # A policy of two custodians, in force from the next version on.
    escrow.escrow_admin("cluster", "set-policy", escrow.cluster_id, "--threshold", "2",
                        "--slots", "alice,bob")
    # From the manager that has rotated least: a node may add 4 versions an hour.
    second.box.run([AGENT, "rotate"])
    site_values = {"https://escrow.example:8443": "https://127.0.0.1:8443",
                   "ESCROW_CA=ca.pem": "ESCROW_CA=/var/lib/escrow/tls/ca.pem",
                   "~/alice.key": f"{CUSTODIANS}/alice.key", "CLUSTER_ID": escrow.cluster_id,
                   "NODE_ID_1": ids[0], "NODE_ID_2": ids[1]}
    book = Runbook("patch-night.md", site_values)
    opened = escrow.type_as_custodian(Command("\n".join(
        c.text for c in book.section("1. The day before: open the window (a custodian)")),
        "", ""), stdin="y\n")
    window = re.findall(r"\bw-\w+", opened.stdout)[0]
    book = Runbook("patch-night.md", {**site_values, "w-...": window})
    cosign = book.section("2. A second custodian co-signs (if the policy needs two approvals)")
    listed = escrow.type_as_custodian(cosign[0], name="bob")
    assert window in listed.stdout
    escrow.type_as_custodian(cosign[1], name="bob", stdin="y\n")

    for site in (first, second):  # the night: restarted one at a time, no one awake
        unlocks = site.unlocks()
        site.restart_docker()
        site.wait_swarm("active", timeout=60)
        swarm.wait_ready(2)
        assert site.unlocks() == unlocks + 1
    approvals = [r for r in json.loads(escrow.escrow_admin(
        "audit", "show", "--json", "--limit", "50").stdout)
        if r["event"] == book.says("window.approve")]
    assert len(approvals) == 4  # two restarts, one approval per signer each
    closed = escrow.type_as_custodian(book.command("4. Afterwards: close it", "window close"),
                                      stdin="y\n")
    assert closed.returncode == 0
