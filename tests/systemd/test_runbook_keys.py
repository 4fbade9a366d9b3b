"""The runbooks about the escrow's keys, docs/runbooks/hsm-lost.md and custodian-leaves.md, run
from their own text in a booted box installed as README says (so their paths, `runuser`,
`systemctl` and `curl` are the operator's), each on the night it was written for; what a page
says the operator will see is checked against what its commands print, and the night ends
with a restarted docker unlocked by the agent.

The escrow host is the manager here, and the custodians' terminals and machines are root's
shell with their keys in /srv/custodians. The tests share one box and run in file order; each
leaves the escrow serving, the manager unlocked and its agent running. The HSM test leaves the
policy as `install` made it (2 of auto, auto, alice, bob) on a new escrow; the custodian test
leaves 2 of auto, auto, bob, dave, with alice removed.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import replace

import pytest

from lab.box_site import AGENT, CUSTODIANS, ESCROW, ROOT_CA, Site
from lab.runbook import Command, Runbook

pytestmark = [pytest.mark.slow, pytest.mark.systemd]

BUILD = "2. Build a new escrow with a new wrapping key"
AGAIN = "3. Escrow the keys again"
POLICY = "1. Set the new policy"
ROTATE = "2. Rotate, so a version split under the new policy exists"
PAPER = "3. New paper shares"
RETIRE = "4. Retire the old versions"
ESCROW_CA = "/var/lib/escrow/tls/ca.pem"


def holds(text: str, secret: str) -> bool:
    """Whether `secret` is one of the words of `text`. Asserted as a name bound to it, never
    as the call, whose arguments pytest would print on failure."""
    return secret in text.split()


def wait_unlocks(site: Site, count: int, timeout: float = 90) -> None:
    """Wait until the agent's journal has said `count` unlocks."""
    deadline = time.monotonic() + timeout
    while site.unlocks() < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"the agent unlocked {site.unlocks()} times, not {count}\n"
                                 f"{site.journal_text('unseal-agent')[-3000:]}")
        time.sleep(0.1)


def unlocked_by_the_agent(site: Site) -> None:
    """A docker restart, as after a reboot, that the agent unlocks by itself."""
    unlocks = site.unlocks()
    site.restart_docker()
    site.wait_swarm("active")
    wait_unlocks(site, unlocks + 1)
    assert site.unlocks() == unlocks + 1


def recover(site: Site, papers: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`escrow recover` reading the paper shares from standard input, no escrow involved."""
    return site.box.run([ESCROW, "recover", *args], stdin=papers, check=False)


def export_share(site: Site, name: str, command: Command) -> tuple[str, str]:
    """The runbook's `escrow share export` typed by custodian `name` in a terminal of their
    own: the share's words and what the command said about them."""
    typed = site.type_as_custodian(command, name=name)
    return typed.stdout.strip() + "\n", typed.stderr


def paper(site: Site, name: str) -> str:
    """What custodian `name` wrote down: their share of the newest version, as a line."""
    return site.custodian(name, "share", "export", "--cluster", site.cluster_id
                          ).stdout.strip() + "\n"


# The HSM is lost


def lose_the_token(site: Site, book: Runbook) -> None:
    """The night: the escrow's token is gone for good (its files, and the PIN with them), and
    the escrow says so."""
    site.sh("rm -rf /var/lib/escrow/softhsm /etc/escrow/hsm-pin")
    health = site.box.run(["curl", "-s", "--cacert", ESCROW_CA,
                           "https://localhost:8443/healthz"], check=False).stdout
    assert '"status":503' in health, health
    assert (book.says("the token 'escrow' stopped answering") in health
            or book.says("could not be loaded") in health), health


def build_a_new_escrow(site: Site, book: Runbook) -> None:
    """Step 2 with the embedded SoftHSM variant, the registrations read from the old
    directory and made again, and the new CA given to the agent."""
    old_ca = site.file(ESCROW_CA).read_bytes()
    build = book.section(BUILD)
    start = next(i for i, c in enumerate(build) if c.text == "systemctl start escrow")
    assert [c.label for c in build[:start] if c.label.startswith("A real HSM")], build
    embedded = [c for c in build[:start + 1] if not c.label.startswith("A real HSM")]
    assert any(c.label.startswith("Embedded SoftHSM token") for c in embedded), embedded
    for command in embedded:
        typed = site.type(command)
        if " init " in command.text:
            assert "initialised /var/lib/escrow" in typed.stdout, typed.stdout
            assert "wrapping key 'escrow-wrap' (created)" in typed.stdout, typed.stdout
    assert site.unit("escrow", "ActiveState")["ActiveState"] == "active"
    assert site.file(ESCROW_CA).read_bytes() != old_ca  # a new escrow, a new quickstart CA

    custodians = site.type(book.command(BUILD, "custodian list --data-dir")).stdout
    assert "alice" in custodians, custodians
    assert "bob" in custodians, custodians
    clusters = site.type(book.command(BUILD, "cluster list --data-dir")).stdout
    assert re.search(rf"{site.cluster_id}\s*│\s*2\s*│\s*auto,auto,alice,bob\s", clusters), \
        clusters

    add = book.command(BUILD, "custodian add alice")
    assert add.said == "one per custodian"
    for name in ("alice", "bob"):
        site.type(replace(add, text=add.text.replace("alice", name)))
    register = book.command(BUILD, "cluster add")
    assert f"--root-ca {ROOT_CA} " in register.text  # where `install` put the swarm's root CA
    added = site.type(register)
    assert f"cluster {site.cluster_id} added: 2 of 4: auto,auto,alice,bob" in added.stdout, \
        added.stdout
    site.type(book.command(BUILD, "/etc/unseal-agent/escrow-ca.pem"))
    assert site.file("/etc/unseal-agent/escrow-ca.pem").read_bytes() == \
        site.file(ESCROW_CA).read_bytes()


def the_deposit_key_fingerprint(site: Site, book: Runbook) -> str:
    """Step 3's fingerprint, which a plain `unseal-agent enroll` names as refused."""
    fingerprint = site.type(book.command(AGAIN, "deposit_public_key")).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint), fingerprint
    refused = site.box.run([AGENT, "enroll"], check=False)
    assert refused.returncode == 1, refused
    assert re.search(rf"{book.says('offers deposit key sha256')} {fingerprint}, "
                     rf"{book.says('this agent pinned')} [0-9a-f]{{64}} "
                     rf"{book.says('at enrollment: the unlock key was not sent')}",
                     refused.stderr), refused.stderr
    return fingerprint


def test_hsm_lost_runbook_builds_a_new_escrow_and_the_manager_unlocks_again(
        site: Site) -> None:
    book = Runbook("hsm-lost.md", {
        "CLUSTER_ID": site.cluster_id,
        # The custodians of the box and their policy, as `install` registered them.
        "auto,auto,alice,bob,carol": "auto,auto,alice,bob",
        "new-escrow-ca.pem": ESCROW_CA})  # the escrow host is the manager here
    site.wait_swarm("active")
    logged = re.search(r"audit log intact: (\d+) records",
                       site.escrow_admin("audit", "verify").stdout)
    assert logged
    lose_the_token(site, book)
    build_a_new_escrow(site, book)

    fingerprint = the_deposit_key_fingerprint(site, book)
    book = Runbook("hsm-lost.md", {**book.site, "FINGERPRINT": fingerprint})
    enrolled = site.type(book.command(AGAIN, "unseal-agent enroll"))
    pinned = book.says("deposits go only to the escrow's deposit key sha256")
    assert f"{pinned} {fingerprint}" in enrolled.stdout, enrolled.stdout
    before = site.unlock_key()
    site.type(book.command(AGAIN, "unseal-agent rotate"))
    key = site.unlock_key()
    changed = key != before  # compared out of the assertion, which would print both keys
    assert changed, "unseal-agent rotate left the unlock key as it was"
    site.remember_unlock_key()

    # What the page warns of: until its restart the agent trusts only the old CA, and a
    # manager restarting then stays locked although the new escrow holds its key.
    unlocks = site.unlocks()
    site.restart_docker()
    stale = book.says("locked; escrow unreachable, retrying in")
    site.wait_unit("unseal-agent", lambda s: stale in s["StatusText"], "StatusText")
    assert site.swarm_state() == "locked"
    site.type(book.command(AGAIN, "systemctl restart unseal-agent"))
    site.wait_swarm("active")
    wait_unlocks(site, unlocks + 1)
    same = site.unlock_key() == key
    assert same, "the manager was unlocked with another key than the rotated one"

    # New paper, of the new version: it rebuilds the current key without the escrow.
    rebuilt = recover(site, paper(site, "alice") + paper(site, "bob"))
    assert rebuilt.returncode == 0, rebuilt.stderr
    current = holds(rebuilt.stdout, key)
    assert current, "the new paper shares do not rebuild the current key"

    verify = book.command("4. Afterwards", "audit verify")
    assert verify.said == "audit log intact: N records"
    afterwards = site.type(verify)
    count = re.search(rf"{book.says('audit log intact: ')}(\d+) records", afterwards.stdout)
    assert count, afterwards.stdout
    assert int(count[1]) >= int(logged[1])  # the old log whole, to its last record
    assert site.escrow_admin("audit", "verify").returncode == 0
    unlocked_by_the_agent(site)


# A custodian leaves


def the_new_policy(site: Site, book: Runbook) -> None:
    """Step 1: dave makes his key pair, the admin registers him and sets the policy without
    alice; her removal is refused while the policy still names her."""
    refused = site.type(book.command(RETIRE, "custodian remove alice"), check=False)
    assert refused.returncode == 1, refused
    assert (f"custodian 'alice' {book.says('holds a slot in the policy of:')} "
            f"{site.cluster_id}") in refused.stderr, refused.stderr

    keygen = book.command(POLICY, "custodian keygen")
    # On dave's machine, where `escrow` is on the PATH (pip installed it).
    made = site.box.run(["bash", "-c", keygen.text],
                        env={"PATH": f"/opt/swarm-unseal/bin:{site.box.PATH}"})
    assert f"wrote {CUSTODIANS}/dave.key" in made.stdout, made.stdout
    assert site.file(f"{CUSTODIANS}/dave.key.pub").stat().st_mode & 0o777 == 0o644
    site.type(book.command(POLICY, "custodian add dave"))
    policy = site.type(book.command(POLICY, "set-policy"))
    assert book.says("existing key versions keep their old shares") in policy.stdout, \
        policy.stdout
    assert "2 of 4: auto,auto,bob,dave" in site.escrow_admin(
        "cluster", "show", site.cluster_id).stdout


def test_custodian_leaves_runbook_resplits_without_alice_and_her_old_paper_fails(
        site: Site) -> None:
    book = Runbook("custodian-leaves.md", {
        "CLUSTER_ID": site.cluster_id,
        # There is no carol in the box: the policy of the page, without her.
        "auto,auto,bob,carol,dave": "auto,auto,bob,dave",
        # dave's machine is the box; his passphrase comes from the file the other
        # custodians use, there being no terminal to type it at.
        "~/dave.key": f"{CUSTODIANS}/dave.key --passphrase-file {CUSTODIANS}/passphrase"})
    site.wait_swarm("active")
    # The manager last unlocked with the current version (the previous night's restart).
    unlocked_by_the_agent(site)
    old_papers = {name: paper(site, name) for name in ("alice", "bob")}

    the_new_policy(site, book)
    rotated = site.type(book.command(ROTATE, "unseal-agent rotate"))
    version = re.search(rf"{book.says('the escrow holds the new key as version')} (\d+)",
                        rotated.stdout)
    assert version, rotated.stdout
    new = int(version[1])
    key = site.unlock_key()
    site.remember_unlock_key()

    export = book.command(PAPER, "share export")
    new_papers: dict[str, str] = {}
    for name in ("bob", "dave"):
        new_papers[name], said = export_share(site, name, export)
        assert f"{book.says('share of version')} {new} " in said, said

    retire(site, book, new)

    # The proof. alice's old paper with bob's new share: a mix of two keys, refused.
    mixed = recover(site, old_papers["alice"] + new_papers["bob"])
    assert mixed.returncode == 1, mixed.stderr
    assert book.says("belongs to a different key than") in mixed.stderr, mixed.stderr
    leaked = holds(mixed.stdout + mixed.stderr, key)
    assert not leaked, "a mixed set rebuilt the current key"
    # bob's and dave's new shares: the current key.
    rebuilt = recover(site, new_papers["bob"] + new_papers["dave"])
    assert rebuilt.returncode == 0, rebuilt.stderr
    current = holds(rebuilt.stdout, key)
    assert current, "bob's and dave's new shares do not rebuild the key"
    # alice's and bob's old papers together: only the old key, which the manager refuses.
    old = recover(site, old_papers["alice"] + old_papers["bob"])
    assert old.returncode == 0, old.stderr
    current = holds(old.stdout, key)
    assert not current, "the old papers rebuild the current key"
    old_papers_refused(site, book, old_papers["alice"] + old_papers["bob"])
    unlocked_by_the_agent(site)


def retire(site: Site, book: Runbook, new: int) -> None:
    """Step 4: prune keeps the version the manager last unlocked with until it has unlocked
    with the new one; then only the new version is left, and alice goes."""
    node = site.box.run(["docker", "info", "--format", "{{.Swarm.NodeID}}"]).stdout.strip()
    prune = book.command(RETIRE, "key prune")
    # Run too early, before the manager has unlocked with the new version, as the page warns.
    early = site.type(prune)
    assert (f"{book.says('kept version')} {new - 1} {book.says('past retention: node(s)')} "
            f"{node} {book.says('last unlocked with it')}") in early.stdout, early.stdout

    unlocks = site.unlocks()
    site.box.run(["systemctl", "reset-failed", "docker"])  # the tests' many restarts
    site.type(book.command(RETIRE, "systemctl restart docker"))
    site.wait_swarm("active")
    wait_unlocks(site, unlocks + 1)
    status = site.type(book.command(RETIRE, "unseal-agent status"))
    assert re.search(rf"^last unlock: .*, {book.says('key version')} {new}, ", status.stdout,
                     re.MULTILINE), status.stdout

    pruned = site.type(prune)
    assert f"destroyed version(s) {new - 1} of {site.cluster_id}" in pruned.stdout, \
        pruned.stdout
    versions = site.escrow_admin("key", "list", "--cluster", site.cluster_id, "--json").stdout
    assert re.findall(r'"version": (\d+)', versions) == [str(new)], versions
    removed = site.type(book.command(RETIRE, "custodian remove alice"))
    assert "custodian 'alice' removed" in removed.stdout, removed.stdout
    custodians = site.escrow_admin("custodian", "list").stdout
    assert "alice" not in custodians, custodians


def old_papers_refused(site: Site, book: Runbook, papers: str) -> None:
    """The old key the departed custodian's paper still rebuilds, tried on the locked manager
    (its agent stopped, so that it stays locked): dockerd refuses it."""
    site.box.run(["systemctl", "stop", "unseal-agent"])
    site.restart_docker()
    site.wait_swarm("locked")
    tried = recover(site, papers, "--unlock")
    assert tried.returncode == 1, tried.stderr
    assert book.says("the rebuilt key does not unlock this manager") in tried.stderr, \
        tried.stderr
    assert site.swarm_state() == "locked"
    unlocks = site.unlocks()
    site.box.run(["systemctl", "start", "unseal-agent"])
    site.wait_swarm("active")
    wait_unlocks(site, unlocks + 1)

