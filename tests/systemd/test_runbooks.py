"""The runbooks of docs/runbooks/ for the escrow host and one manager, run from their own text
in a booted box installed as README says (so their paths, `runuser`, `systemctl` and `curl` are
the operator's), each on the night it was written for; what a page says the operator will see
is checked against what its commands print.

The tests share one box and run in file order; each leaves the escrow serving, the manager
unlocked and its agent running, and the policy as `install` made it (2 of auto, auto, alice,
bob) unless it says otherwise.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from lab.box_site import Site
from lab.runbook import Runbook

pytestmark = [pytest.mark.slow, pytest.mark.systemd]


def paper_shares(site: Site, *names: str) -> str:
    """What the custodians wrote down: their shares of the newest version, a line each."""
    return "".join(site.custodian(name, "share", "export", "--cluster", site.cluster_id)
                   .stdout.strip() + "\n" for name in names)


def test_escrow_down_paper_shares_unlock_the_manager_and_the_escrow_comes_back_in_step(
        site: Site) -> None:
    book = Runbook("escrow-down.md")
    site.wait_swarm("active")
    papers = paper_shares(site, "alice", "bob")
    key = site.unlock_key()
    released = sum(r["event"] == "unseal.release" for r in site.audit())
    # The night: the escrow host is gone, then a manager restarts.
    site.box.run(["systemctl", "stop", "escrow"])
    site.restart_docker()
    symptom = book.says("locked; escrow unreachable, retrying in")
    site.wait_unit("unseal-agent", lambda s: symptom in s["StatusText"], "StatusText")
    assert site.swarm_state() == "locked"

    check = book.section("1. Is the escrow really down?")
    assert symptom in site.type(check[0]).stdout
    agent = site.type(check[1], check=False)
    assert agent.returncode == 1
    assert book.says("lock state:     locked") in agent.stdout
    assert re.search(rf"^{re.escape(book.says('escrow:         '))}https://\S+ "
                     rf"{re.escape(book.says('(UNREACHABLE)'))}$", agent.stdout, re.MULTILINE)
    assert re.search(rf"^{re.escape(book.says('problem: the escrow at'))} https://\S+ "
                     rf"{re.escape(book.says('is unreachable: '))}"
                     rf"{book.says('ConnectionRefusedError')}", agent.stderr,
                     re.MULTILINE), agent.stderr
    assert "inactive" in site.type(check[2], check=False).stdout
    assert "Stopped" in site.type(check[3]).stdout
    health = site.type(check[4], check=False)
    assert health.returncode == 7, health  # curl: could not connect

    recover = book.command("2. Unlock from paper shares (no escrow, no network, no HSM)",
                           "recover --unlock")
    typed = site.type(recover, stdin=papers)
    assert key not in typed.stdout + typed.stderr
    site.wait_swarm("active", timeout=30)
    assert site.unlock_key() == key
    # The key to type elsewhere: the same shares, without --unlock.
    printed = site.type(replace(recover, text=recover.text.replace(" --unlock", "")),
                        stdin=papers)
    assert key in printed.stdout.split()
    assert book.says("SWMKEY-1-") in printed.stdout

    # The escrow back: nothing to do for the unlocked manager, and nothing out of step.
    site.box.run(["systemctl", "start", "escrow"])
    site.wait_unit("unseal-agent", lambda s: s["StatusText"].startswith("unlocked"),
                   "StatusText")
    back = site.type(check[1])
    assert "(reachable)" in back.stdout
    assert site.escrow_admin("audit", "verify").returncode == 0
    assert sum(r["event"] == "unseal.release" for r in site.audit()) == released
    unlocks = site.unlocks()
    site.restart_docker()
    site.wait_swarm("active")
    assert site.unlocks() == unlocks + 1
