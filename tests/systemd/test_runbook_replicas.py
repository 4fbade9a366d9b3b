"""docs/runbooks/replica-lost.md and database-primary-lost.md run from their own text on booted
Debian hosts (lab/box_replicas.py): two escrow replicas, each on a database host (escrow-1 the
PostgreSQL primary, escrow-2 its asynchronous standby), and one autolocked manager whose agent
lists both. A host loses power; the manager, restarted, must unlock through what is left, by
itself once the on-call engineer has typed the page's commands.

The tests share the boxes and run in file order: the first loses escrow-2's host and powers it
on again, the second loses escrow-1's for good.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest

from lab.box_replicas import BoxReplicas, agent_status, box_replicas, psql
from lab.box_site import build_wheels
from lab.runbook import Runbook
from tests.conftest import record

pytestmark = [pytest.mark.slow, pytest.mark.systemd]

SERVING = "1. Are the others serving?"
PROMOTE = "1. Promote the standby"
CHECK = "2. Check"
HEALTHY = '{"status":"ok","store":"postgresql","writable":true}'


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BoxReplicas]:
    wheels = build_wheels(tmp_path_factory.mktemp("wheels"))
    started = time.monotonic()
    with box_replicas(tmp_path_factory.mktemp("boxes"), wheels) as boxes:
        record("replicas: three hosts booted, PostgreSQL primary and standby, two replicas "
               "and a manager installed", time.monotonic() - started)
        yield boxes


def unlocks_after_a_docker_restart(site: BoxReplicas) -> float:
    """A restarted docker comes back locked and the agent unlocks it: one unlock more in its
    journal; when the manager was seen active."""
    manager = site.manager
    unlocks = manager.unlocks()
    manager.restart_docker()
    active = manager.wait_swarm("active")
    deadline = time.monotonic() + 10
    while manager.unlocks() == unlocks and time.monotonic() < deadline:
        time.sleep(0.1)  # the journal line follows the unlock by a moment
    assert manager.unlocks() == unlocks + 1, manager.journal_text("unseal-agent")[-3000:]
    return active


def audit_verifies(command_output: str) -> None:
    assert command_output.startswith("audit log intact: "), command_output


def audit_head(command_output: str) -> str:
    """The head hash `escrow audit verify` printed, once it said the chain is intact."""
    audit_verifies(command_output)
    found = re.search(r"\bhead ([0-9a-f]{64})\b", command_output)
    assert found, command_output
    return found.group(1)


def test_a_lost_replica_host_leaves_the_other_unlocking_and_its_standby_catches_up(
        site: BoxReplicas) -> None:
    manager = site.manager
    manager.wait_swarm("active")
    assert site.healthz(manager, "escrow-2.example") == HEALTHY
    site.escrow_2.box.cut_power()

    # "Nothing is locked because of it."
    unlocks_after_a_docker_restart(site)
    assert "https://escrow-1.example:8443 (reachable, answered;" in agent_status(manager)

    book = Runbook("replica-lost.md", {"escrow-2.example": "escrow-1.example"})
    health, verify = book.section(SERVING)
    assert manager.type(health).stdout.strip() == book.says(HEALTHY)
    audit_verifies(site.escrow_1.type(verify).stdout)

    # Back on: its standby streams again and has all the primary wrote meanwhile (the
    # unlock's records among it), and replica 2 serves again.
    powered = time.monotonic()
    site.escrow_2.box.power_on()
    site.standby_caught_up()
    record("replica lost: escrow-2 powered on -> standby streaming and replayed",
           time.monotonic() - powered)
    as_written = Runbook("replica-lost.md").command(SERVING, "/healthz")
    deadline = time.monotonic() + 60
    while (answer := manager.type(as_written, check=False).stdout.strip()) != HEALTHY:
        assert time.monotonic() < deadline, answer
        time.sleep(0.2)


def test_a_lost_database_primary_is_survived_by_promoting_the_standby_as_the_page_says(
        site: BoxReplicas) -> None:
    manager, survivor = site.manager, site.escrow_2
    manager.wait_swarm("active")
    assert site.healthz(manager, "escrow-2.example") == HEALTHY
    # Asynchronous replication: lose nothing here by losing the primary only once the
    # standby has replayed all it wrote.
    site.standby_caught_up()
    head = audit_head(site.escrow_1.escrow_admin("audit", "verify").stdout)
    site.escrow_1.box.cut_power()
    lost = time.monotonic()

    book = Runbook("database-primary-lost.md", {"escrow-1.example": "escrow-2.example"})
    answer = json.loads(site.healthz(manager, "escrow-2.example"))
    assert answer["status"] == 503, answer
    assert answer["message"].startswith(book.says("the database is unavailable")), answer

    # Restarted while the database takes no writes: locked, the agent retrying.
    manager.restart_docker()
    manager.wait_swarm("locked")
    unreachable = book.says("locked; escrow unreachable")
    manager.wait_unit("unseal-agent", lambda s: unreachable in s["StatusText"], "StatusText",
                      timeout=90)
    assert book.says("cannot serve now (503)") in manager.journal_text("unseal-agent")
    assert manager.swarm_state() == "locked"

    promote, in_recovery = book.section(PROMOTE)
    promoted = time.monotonic()
    record("database primary lost: host lost -> standby promoted (the test's delay)",
           promoted - lost)
    assert promote.said == book.says("prints nothing")
    promoted_by_it = survivor.type(promote)
    assert not promoted_by_it.stdout + promoted_by_it.stderr, promoted_by_it
    assert in_recovery.said.startswith("f: ")
    assert survivor.type(in_recovery).stdout.strip() == "f"
    # By itself: replica 2 finds the new primary, and the agent's next try unlocks.
    active = manager.wait_swarm("active", timeout=120)
    record("database primary lost: standby promoted -> manager active", active - promoted)

    health, verify = book.section(CHECK)
    assert manager.type(health).stdout.strip() == book.says(HEALTHY)
    audit_verifies(survivor.type(verify).stdout)
    # The head kept from before the loss is still in the chain, and the chain went on.
    assert head in {str(r["hash"]) for r in survivor.audit()}
    assert psql(survivor, "SELECT pg_is_in_recovery()") == "f"
