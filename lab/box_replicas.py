"""Two escrow replicas on PostgreSQL and one manager, each a booted Debian box under systemd in
one NetLab, for the runbooks of a lost replica and a lost database primary
(docs/runbooks/replica-lost.md, database-primary-lost.md).

`escrow-1` is the database primary (Debian's cluster 15/main) and replica 1; `escrow-2` a
streaming standby made with `pg_basebackup -R` and replica 2, joined as README's "Run several
replicas" says. Replication is asynchronous: each database host is also an escrow host, and a
synchronous standby would stop every write with the loss of the other host. The manager's
agent lists both replicas, escrow-2 first, and trusts both CAs from one bundle. Host names are
the pages' own (`escrow-1.example`, `db-2.example`), in every box's /etc/hosts as DNS would
have them, so the pages' commands run as written.

Passwords live in 0600 files only: the escrow role's beside each replica's data, the
replication role's in the postgres user's ~/.pgpass on both database hosts (which also keeps it
out of the primary_conninfo `pg_basebackup -R` writes).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from lab.box import Box
from lab.box_site import (
    AGENT,
    ESCROW,
    ESCROW_DROP_IN,
    ROOT_CA,
    Site,
    binds,
    install_agent,
    install_escrow,
    register_cluster,
)
from lab.box_swarm import PORT, poweroff_all
from lab.commands import readme_blocks
from lab.netlab import NetLab, run_all, wait_for
from lab.runbook import Runbook

PG_CONF = "/etc/postgresql/15/main"
PG_DATA = "/var/lib/postgresql/15/main"
# README's URL for a primary and its standby, with the pages' host names.
STORE_URL = ("postgresql://escrow@db-1.example,db-2.example/escrow"
             "?target_session_attrs=read-write")
# Readable by the escrow's user, who runs both the server and the pages' `runuser -u escrow --
# escrow audit verify`; README's /etc/escrow/store-password sits in root's 0700 /etc/escrow,
# which neither can enter (the unit loads only hsm-pin as a credential).
PASSWORD_FILE = "/var/lib/escrow/store-password"
TOKEN_COPY = "/root/escrow-token.tgz"
PUT_BACK = "3. Put a replica back"  # replica-lost.md
LISTEN_DROP_IN = ESCROW_DROP_IN + f"Environment=ESCROW_SERVER_LISTEN=0.0.0.0:{PORT}\\n"


def psql(site: Site, query: str) -> str:
    """One query as the database host's own superuser, over its unix socket; the bare value."""
    return site.box.run(["runuser", "-u", "postgres", "--", "psql", "-XAtqc", query]
                        ).stdout.strip()


class BoxReplicas:
    """`escrow_1` (primary, replica 1), `escrow_2` (standby, replica 2) and `manager`."""

    def __init__(self, lab: NetLab, workdir: Path, wheels: Path) -> None:
        self.lab = lab
        mounts = binds(wheels)
        self.boxes = [Box(f"unseal-{lab.tag}-{role}", workdir / role, mounts, rebootable=True,
                          netns=lab.nodes[index])
                      for index, role in enumerate(["escrow-1", "escrow-2", "m1"])]
        self.escrow_1, self.escrow_2, self.manager = (Site(box) for box in self.boxes)
        self._passwords = {"escrow": secrets.token_urlsafe(24),
                           "replicator": secrets.token_urlsafe(24)}

    @property
    def sites(self) -> list[Site]:
        return [self.escrow_1, self.escrow_2, self.manager]

    def install(self) -> None:
        for error in run_all([box.boot for box in self.boxes]):
            raise error
        # Before `escrow init`: each replica's quickstart certificate names its host as
        # getfqdn() finds it here.
        hosts = (f"{self.lab.address(0)} escrow-1.example db-1.example {self.boxes[0].name}\n"
                 f"{self.lab.address(1)} escrow-2.example db-2.example {self.boxes[1].name}\n"
                 f"{self.lab.address(2)} {self.boxes[2].name}\n")
        for site in self.sites:
            with site.file("/etc/hosts").open("a") as etc_hosts:
                etc_hosts.write(hosts)
        self._together(self._primary_and_replica_1, self._standby_host, self._manager_host)
        self._together(self._move_replica_1_to_postgresql, self._standby)
        self._join_replica_2()
        register_cluster(self.escrow_1, self.manager)
        self.escrow_2.cluster_id = self.manager.cluster_id
        bundle = b"".join(site.file("/var/lib/escrow/tls/ca.pem").read_bytes()
                          for site in (self.escrow_1, self.escrow_2))
        install_agent(self.manager, 'escrow_url = ["https://escrow-2.example:8443", '
                                    '"https://escrow-1.example:8443"]\n'
                                    'escrow_ca = "/etc/unseal-agent/escrow-ca.pem"\n', bundle)

    @staticmethod
    def _together(*steps: Callable[[], None]) -> None:
        for error in run_all(list(steps)):
            raise error

    def _database_host(self, site: Site) -> None:
        """What both database hosts share: listening on the lab address, scram for the escrow
        and the replication role from the lab's network, asynchronous commits, and WAL kept
        for a standby that was powered off a while."""
        index = self.sites.index(site)
        subnet = self.lab.address(0).rsplit(".", 1)[0] + ".0/24"
        site.file(f"{PG_CONF}/conf.d/escrow.conf").write_text(
            f"listen_addresses = 'localhost,{self.lab.address(index)}'\n"
            "synchronous_standby_names = ''\n"
            "wal_keep_size = '256MB'\n")
        with site.file(f"{PG_CONF}/pg_hba.conf").open("a") as hba:
            hba.write(f"host escrow escrow {subnet} scram-sha-256\n"
                      f"host replication replicator {subnet} scram-sha-256\n")
        pgpass = site.file("/var/lib/postgresql/.pgpass")
        pgpass.write_text(f"*:5432:replication:replicator:{self._passwords['replicator']}\n")
        site.sh("chown postgres:postgres /var/lib/postgresql/.pgpass && "
                "chmod 0600 /var/lib/postgresql/.pgpass")

    def _primary_and_replica_1(self) -> None:
        site = self.escrow_1
        self._database_host(site)
        site.sh("systemctl enable --quiet postgresql && systemctl start postgresql@15-main")
        # On standard input, never in a command line.
        site.box.run(["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-v",
                      "ON_ERROR_STOP=1"], stdin=(
            f"CREATE ROLE escrow LOGIN PASSWORD '{self._passwords['escrow']}';\n"
            f"CREATE ROLE replicator LOGIN REPLICATION "
            f"PASSWORD '{self._passwords['replicator']}';\n"
            "CREATE DATABASE escrow OWNER escrow;\n"))
        install_escrow(site, LISTEN_DROP_IN)
        self._password_file(site)

    def _password_file(self, site: Site) -> None:
        site.file(PASSWORD_FILE).write_text(self._passwords["escrow"] + "\n")
        site.sh(f"chown escrow:escrow {PASSWORD_FILE} && chmod 0600 {PASSWORD_FILE}")

    def _standby_host(self) -> None:
        site = self.escrow_2
        self._database_host(site)
        venv, escrow, _ = readme_blocks("Install with systemd")
        # README's escrow block up to `escrow init`: replica 2 joins instead (_join_replica_2).
        assert escrow[3].startswith(f"runuser -u escrow -- {ESCROW} init"), escrow
        for line in venv + escrow[:3]:
            site.sh(line)
        self._password_file(site)

    def _manager_host(self) -> None:
        site = self.manager
        venv, _, _ = readme_blocks("Install with systemd")
        for line in venv:
            site.sh(line)
        site.sh(f"""
            docker swarm init --autolock --advertise-addr {self.lab.address(2)} >/dev/null
            install -m 0644 /var/lib/docker/swarm/certificates/swarm-root-ca.crt {ROOT_CA}
        """)

    def _move_replica_1_to_postgresql(self) -> None:
        """README's "Moving an SQLite escrow to PostgreSQL", as the escrow's user."""
        site = self.escrow_1
        (copy,) = readme_blocks("Moving an SQLite escrow to PostgreSQL", level=4)
        command = " ".join(line.strip().removesuffix("\\") for line in copy)
        command = (command.replace("escrow store copy", f"runuser -u escrow -- {ESCROW} store copy")
                   .replace("postgresql://escrow@db.example/escrow", STORE_URL)
                   .replace("/etc/escrow/store-password", PASSWORD_FILE))
        site.sh("systemctl stop escrow")
        site.box.run(["bash", "-c", command])
        site.sh("systemctl start escrow")

    def _standby(self) -> None:
        """The standby of escrow-1's cluster in place of escrow-2's own, as Debian keeps it."""
        site = self.escrow_2
        site.sh(f"""
            rm -rf {PG_DATA}
            runuser -u postgres -- pg_basebackup -h db-1.example -U replicator -D {PG_DATA} \
                -R -X stream --checkpoint=fast
            systemctl enable --quiet postgresql && systemctl start postgresql@15-main
        """)
        assert psql(site, "SELECT pg_is_in_recovery()") == "t"

    def _join_replica_2(self) -> None:
        """README's "Run several replicas": the first replica's token copied over, then
        `escrow init --join`, then the rest of README's install of an escrow."""
        first, site = self.escrow_1, self.escrow_2
        # The page's own copy: README's tar takes hsm-pin from the data directory, where
        # `escrow init` left it before README's systemd install moved it to /etc/escrow.
        page = Runbook("replica-lost.md")
        first.type(page.command(PUT_BACK, f"-czf {TOKEN_COPY}"))
        site.file(TOKEN_COPY).write_bytes(first.file(TOKEN_COPY).read_bytes())
        site.sh(f"chmod 0600 {TOKEN_COPY}")
        first.sh(f"rm -f {TOKEN_COPY}")
        _, join, _ = readme_blocks("Run several replicas", level=3)[:3]
        script = "\n".join(join).replace("escrow init", f"{ESCROW} init").replace(
            "postgresql://escrow@db.example/escrow", STORE_URL).replace(
            "/etc/escrow/store-password", PASSWORD_FILE)
        site.box.run(["bash", "-e", "-c", script])
        _, escrow, _ = readme_blocks("Install with systemd")
        moves_pin = "install -d -m 0700 /etc/escrow && mv /var/lib/escrow/hsm-pin"
        assert escrow[4].startswith(moves_pin), escrow
        # Root typed `init`, as README's lines are given: the server's user must own its data,
        # and the PIN goes where README's install puts it.
        site.type(page.command(PUT_BACK, "chown -R escrow:escrow /var/lib/escrow"))
        site.type(page.command(PUT_BACK, moves_pin))
        site.sh(f"""
            install -d /etc/systemd/system/escrow.service.d
            printf '{LISTEN_DROP_IN}' > /etc/systemd/system/escrow.service.d/lab.conf
        """)
        site.sh(escrow[5])

    def healthz(self, site: Site, host: str) -> str:
        """What `curl .../healthz` at `host` answers, from `site` (which holds the bundle)."""
        return site.box.run(["curl", "-sS", "--max-time", "30", "--cacert",
                             "/etc/unseal-agent/escrow-ca.pem",
                             f"https://{host}:{PORT}/healthz"], check=False).stdout.strip()

    def standby_caught_up(self, timeout: float = 60) -> float:
        """Seconds until the standby streams from the primary and has replayed all the primary
        had written when asked."""
        def replayed() -> bool:
            streaming = psql(self.escrow_1, "SELECT count(*) FROM pg_stat_replication"
                                            " WHERE state = 'streaming'")
            written = psql(self.escrow_1, "SELECT pg_current_wal_lsn()")
            return streaming == "1" and psql(
                self.escrow_2, f"SELECT pg_last_wal_replay_lsn() >= '{written}'") == "t"
        return wait_for(replayed, timeout, "the standby streaming and replayed")

    def close(self) -> list[str]:
        """Power every box off and clean the host; what was left behind."""
        return poweroff_all(self.boxes)


def agent_status(site: Site) -> str:
    return site.box.run([AGENT, "status"], check=False).stdout


@contextlib.contextmanager
def box_replicas(workdir: Path, wheels: Path) -> Iterator[BoxReplicas]:
    """The boxes, installed, and everything removed again however the block ends (the boxes
    first, then the lab's namespaces, which raises if anything is left)."""
    with NetLab(nodes=3) as lab:
        site = BoxReplicas(lab, workdir, wheels)
        try:
            site.install()
            yield site
        finally:
            left = site.close()
            assert left == [], f"the boxes left {left} on the host"
