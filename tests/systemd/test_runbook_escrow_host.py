"""The escrow host's own runbooks, rotate-wrapping-key.md and escrow-rebuilt.md, run from their
own text in a booted box installed as README says (so their paths, `runuser`, `systemd-run`,
`systemctl` and `curl` are the operator's, and the embedded SoftHSM token's PIN is in
/etc/escrow/hsm-pin, where README's install moves it); what a page says the operator will see
is checked against what its commands print, and each night ends with the manager unlocked
through the escrow after a docker restart.

The tests share one box and run in file order; each leaves the escrow serving, its audit log
intact, the manager unlocked and its agent running, and the policy as `install` made it (2 of
auto, auto, alice, bob).
"""

from __future__ import annotations

import re
import time
from dataclasses import replace

import pytest

from lab.box_site import Site
from lab.runbook import Runbook

pytestmark = [pytest.mark.slow, pytest.mark.systemd]

ROTATE = "rotate-wrapping-key.md"
REBUILT = "escrow-rebuilt.md"
TAKING_BACKUPS = "Taking backups (on the running escrow host)"
RESTORING = "Restoring (on the new host)"
KEPT = "/srv/kept-apart"  # where the operator keeps the embedded token and its PIN
OFFSITE = "/srv/offsite"  # where the operator stores a backup once it is made


def paper_share(site: Site, name: str) -> str:
    """What custodian `name` would write on paper now: her share of the newest version."""
    return site.custodian(name, "share", "export", "--cluster", site.cluster_id).stdout.strip()


def recorded(site: Site, event: str, **details: object) -> list[dict[str, object]]:
    """The audit records of `event` whose details hold `details`."""
    return [r for r in site.audit() if r["event"] == event and isinstance(r["details"], dict)
            and all(r["details"].get(k) == v for k, v in details.items())]


def audit_verifies(site: Site) -> None:
    assert site.escrow_admin("audit", "verify").stdout.startswith("audit log intact: ")


def unlocks_through_the_escrow(site: Site) -> None:
    """A restarted docker comes back locked and the agent unlocks it with the escrow's shares:
    one unlock more in its journal."""
    unlocks = site.unlocks()
    site.restart_docker()
    site.wait_swarm("active")
    deadline = time.monotonic() + 10
    while site.unlocks() == unlocks and time.monotonic() < deadline:
        time.sleep(0.1)  # the journal line follows the unlock by a moment
    assert site.unlocks() == unlocks + 1, site.journal_text("unseal-agent")[-3000:]


def take_backup(site: Site) -> tuple[str, str]:
    """escrow-rebuilt.md's "Taking backups", as typed on the running escrow host; the file it
    made and the audit head it printed, checked against what the page says it prints."""
    book = Runbook(REBUILT)
    backups_dir, backup = book.section(TAKING_BACKUPS)
    site.type(backups_dir)
    made = site.type(backup)
    printed = re.fullmatch(r"wrote (/var/backups/escrow/escrow-\d{4}-\d\d-\d\d\.backup): \d+ "
                           r"files, audit log of \d+ records ending ([0-9a-f]{64})\n",
                           made.stdout)
    assert printed, made.stdout
    path, head = printed.groups()
    # "prints the audit head hash": the head of the log the backup holds, which has its own
    # `escrow.backup` record, the newest for that file name (a heartbeat may come after it).
    backed_up = [str(r["seq"]) for r in recorded(site, book.says("escrow.backup"), file=path)]
    at_head = [str(r["seq"]) for r in site.audit() if r["hash"] == head]
    assert backed_up, path
    assert len(at_head) == 1, at_head
    assert int(at_head[0]) >= int(backed_up[-1])
    # "It says what it left out: `tls/server.key` ..., the token and its PIN."
    assert book.says("tls/server.key") in made.stderr, made.stderr
    assert book.says("the token and its PIN") in made.stderr, made.stderr
    assert site.file(path).stat().st_mode & 0o777 == 0o600
    listing = site.box.run(["tar", "tzf", path]).stdout.split()
    assert "tls/server.key" not in listing, listing
    assert "tls/ca.pem" in listing, listing
    return path, head


def test_rotate_wrapping_key_runbook_rewraps_while_managers_run_and_the_old_key_is_destroyed(
        site: Site) -> None:
    book = Runbook(ROTATE)
    site.wait_swarm("active")
    key = site.unlock_key()
    share = paper_share(site, "alice")
    config = site.file("/var/lib/escrow/escrow.toml")
    assert 'key_label = "escrow-wrap"\n' in config.read_text()

    stop, rewrap = book.section("1. Stop the escrow and re-wrap")
    assert stop.text == "systemctl stop escrow"
    assert "Embedded SoftHSM token" in rewrap.label
    # Refused while the escrow still serves, as the page says, and nothing changes.
    serving = site.unit("escrow", "MainPID")["MainPID"]
    refused = site.type(rewrap, check=False)
    assert refused.returncode == 1
    in_use = book.says("is in use by escrow serve (pid")
    assert f"{in_use} {serving})" in refused.stderr, refused.stderr
    assert book.says("systemctl stop escrow") in refused.stderr
    assert 'key_label = "escrow-wrap"\n' in config.read_text()
    assert not recorded(site, "hsm.rewrap")

    site.type(stop)
    rewrapped = site.type(rewrap)
    assert "re-wrapped " in rewrapped.stdout, rewrapped.stdout
    assert "escrow hsm destroy-key escrow-wrap" in rewrapped.stdout, rewrapped.stdout
    assert 'key_label = "escrow-wrap-2026-11"\n' in config.read_text()
    # "Managers keep running throughout."
    assert site.swarm_state() == "active"

    start, health, verify, show = book.section("2. Start and check")
    site.type(start)
    assert site.type(health).stdout.strip() == health.said
    assert health.said == book.says('{"status":"ok","store":"sqlite","writable":true}')
    assert site.type(verify).stdout.startswith("audit log intact: ")
    assert show.said == book.says("hsm.rewrap")
    assert show.said in site.type(show).stdout
    # The unlock key and the custodians' paper do not change, only how the copies are wrapped.
    same = site.unlock_key() == key and paper_share(site, "alice") == share
    assert same, "the unlock key or a paper share changed with the wrapping key"

    destroy_the_old_key(site, book)
    assert site.type(health).stdout.strip() == health.said
    audit_verifies(site)
    unlocks_through_the_escrow(site)
    same = site.unlock_key() == key
    assert same, "the manager's unlock key changed"


def destroy_the_old_key(site: Site, book: Runbook) -> None:
    """Step 3: a new backup, stored away from the host, then the old key destroyed."""
    backup, _ = take_backup(site)
    site.sh(f"install -d -m 0700 {OFFSITE} && mv {backup} {OFFSITE}/")
    destroy = book.command("3. Take a new backup, then destroy the old key", "destroy-key")
    assert destroy.text.endswith(" escrow-wrap")
    # "It refuses to destroy the key in use."
    in_use_now = site.type(replace(destroy, text=destroy.text + "-2026-11"), check=False)
    assert in_use_now.returncode == 1
    assert "'escrow-wrap-2026-11' is the wrapping key the escrow uses now" in in_use_now.stderr
    # "It asks for confirmation": the operator answers y.
    destroyed = site.type(destroy, stdin="y\n")
    assert "Destroy the wrapping key 'escrow-wrap' for ever?" in destroyed.stdout
    assert "destroyed the wrapping key 'escrow-wrap'" in destroyed.stdout, destroyed.stdout
    assert recorded(site, book.says("hsm.destroy_key"), label="escrow-wrap")
    # Gone from the token: asked again, it names the missing key before asking anything.
    again = site.type(destroy, check=False)
    assert again.returncode == 1
    assert "has no wrapping key labelled 'escrow-wrap'" in again.stderr, again.stderr


def test_escrow_rebuilt_runbook_restores_a_lost_host_from_backup_and_kept_token_and_unlocks(
        site: Site) -> None:
    site.wait_swarm("active")
    share = paper_share(site, "alice")
    backup, head = take_backup(site)
    # The token, as the page says, is backed up apart from the backup file.
    site.sh(f"""
        install -d -m 0700 {KEPT}
        cp -a /var/lib/escrow/softhsm {KEPT}/softhsm
        cp -a /etc/escrow/hsm-pin {KEPT}/hsm-pin
    """)
    old_ca = site.file("/var/lib/escrow/tls/ca.pem").read_bytes()
    name = backup.rsplit("/", 1)[1]

    # The host is lost: its escrow, its data, its PIN and its backups directory; the operator
    # brings the backup file to the new host in root's home, and the token from where it is kept.
    site.sh(f"""
        systemctl stop escrow && systemctl disable --quiet escrow
        mv {backup} /root/{name}
        mv /var/lib/escrow /var/lib/escrow.lost
        mv /etc/escrow /etc/escrow.lost
        mv /var/backups/escrow /var/backups/escrow.lost
    """)
    assert site.swarm_state() == "active"  # the manager runs on, unlocked

    book = Runbook(REBUILT, site={"escrow-2026-11-23.backup": name})
    site.type(book.command(RESTORING, "install -d -o escrow -g escrow -m 0700 /var/lib/escrow"))
    site.type(book.command(RESTORING, "install -o escrow -g escrow -m 0600"))
    restore = book.command(RESTORING, "escrow restore")
    restored = site.type(restore)
    assert restored.stdout.startswith(f"restored /var/lib/escrow from /var/backups/escrow/{name}")
    assert restored.stdout.rstrip().endswith(f"ending {head})"), restored.stdout
    assert book.says("the TLS private key was not in the backup") in restored.stderr
    assert recorded(site, book.says("escrow.restore"))
    # "`restore` refuses a directory that already holds an escrow."
    twice = site.type(restore, check=False)
    assert twice.returncode == 1
    assert "/var/lib/escrow already holds an escrow" in twice.stderr, twice.stderr

    # The token back as the page says: softhsm/ at the same path, the escrow user's as it was,
    # and the PIN in a directory of root's.
    book.says("copy `softhsm/` back into `/var/lib/escrow/` at the same path, the escrow "
              "user's as it was")
    book.says("the PIN to `/etc/escrow/hsm-pin`, in a directory of root's, 0700 (`install -d "
              "-m 0700 /etc/escrow`)")
    site.sh(f"""
        cp -a {KEPT}/softhsm /var/lib/escrow/softhsm
        install -d -m 0700 /etc/escrow
        cp -a {KEPT}/hsm-pin /etc/escrow/hsm-pin
    """)

    # A new TLS key with the quickstart CA, and the new CA to the agent.
    site.type(book.command(RESTORING, "mv /var/lib/escrow/tls"))
    site.type(book.command(RESTORING, "escrow init --data-dir /var/lib/escrow --exist-ok"))
    new_ca = site.file("/var/lib/escrow/tls/ca.pem").read_bytes()
    assert new_ca != old_ca
    assert site.file("/var/lib/escrow/tls/server.key").stat().st_mode & 0o777 == 0o600
    site.sh("install -m 0644 /var/lib/escrow/tls/ca.pem /root/ca.pem")  # copied to the manager
    site.type(book.command(RESTORING, "/etc/unseal-agent/escrow-ca.pem"))
    assert site.file("/etc/unseal-agent/escrow-ca.pem").read_bytes() == new_ca

    enable = book.command(RESTORING, "systemctl enable --now escrow")
    site.type(enable)
    assert site.unit("escrow", "UnitFileState")["UnitFileState"] == "enabled"
    health = book.command(RESTORING, "/healthz")
    assert health.said == book.says('{"status":"ok","store":"sqlite","writable":true}')
    assert site.type(health).stdout.strip() == health.said
    assert site.type(book.command(RESTORING, "audit verify")).stdout.startswith(
        "audit log intact: ")
    # The shares came back wrapped as they were: custodians, with the new CA, see the same.
    same = paper_share(site, "alice") == share
    assert same, "alice's share differs after the restore"

    audit_verifies(site)
    unlocks_through_the_escrow(site)
