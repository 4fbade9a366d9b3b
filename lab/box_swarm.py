"""Several booted boxes on one bridge: an escrow host and the managers of one autolocked swarm,
each a real systemd host installed for its role as README's "Install with systemd" says, so that
a runbook written for more than one machine (a power cut, a compromised manager) runs on hosts
like the operator's. The boxes live in the network namespaces of a NetLab (docs/design.md, "The
lab"), find the escrow by its host name (each manager's /etc/hosts, as DNS would) and are
powered off, or have their power cut, together or one by one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from lab.box import Box
from lab.box_site import (
    ESCROW_DROP_IN,
    Site,
    binds,
    install_agent,
    install_escrow,
    register_cluster,
)
from lab.netlab import NetLab, run_all, wait_for

PORT = 8443


class BoxSwarm:
    """`escrow`, a box serving the escrow on the bridge, and `managers`, boxes whose docker is a
    manager of one autolocked swarm with an enrolled agent under systemd each."""

    def __init__(self, lab: NetLab, workdir: Path, wheels: Path, managers: int,
                 agent_settings: str = "") -> None:
        self.lab = lab
        self.workdir = workdir
        self.agent_settings = agent_settings
        mounts = binds(wheels)
        self.boxes = [Box(f"unseal-{lab.tag}-{role}", workdir / role, mounts, rebootable=True,
                          netns=lab.nodes[index])
                      for index, role in enumerate(
                          ["escrow", *(f"m{n}" for n in range(1, managers + 1))])]
        self.escrow = Site(self.boxes[0])
        self.managers = [Site(box) for box in self.boxes[1:]]
        self.escrow_url = f"https://{self.boxes[0].name}:{PORT}"

    @property
    def sites(self) -> list[Site]:
        return [self.escrow, *self.managers]

    def install(self) -> None:
        for error in run_all([box.boot for box in self.boxes]):
            raise error
        install_escrow(self.escrow, ESCROW_DROP_IN
                       + f"Environment=ESCROW_SERVER_LISTEN=0.0.0.0:{PORT}\\n")
        hosts = f"{self.lab.address(0)} {self.boxes[0].name}\n"
        first = self.managers[0]
        first.sh(f"docker swarm init --autolock --advertise-addr {self.lab.address(1)} "
                 ">/dev/null")
        token = first.box.run(["docker", "swarm", "join-token", "-q", "manager"]).stdout.strip()
        for index, site in enumerate(self.managers[1:], start=2):
            site.sh(f"docker swarm join --token {token} {self.lab.address(1)}:2377 >/dev/null")
            self.wait_ready(index)
        register_cluster(self.escrow, first)
        ca = self.escrow.file("/var/lib/escrow/tls/ca.pem").read_bytes()
        config = (f'escrow_url = "{self.escrow_url}"\n'
                  'escrow_ca = "/etc/unseal-agent/escrow-ca.pem"\n' + self.agent_settings)
        for site in self.managers:
            site.cluster_id = first.cluster_id
            site.unlock_keys = first.unlock_keys
            with site.file("/etc/hosts").open("a") as etc_hosts:
                etc_hosts.write(hosts)
        # One at a time: enrolment is the escrow's to count, not a race to test here.
        for site in self.managers:
            install_agent(site, config, ca)

    def wait_ready(self, count: int | None = None, timeout: float = 90) -> None:
        """`count` managers (all by default) seen ready and reachable by the first."""
        wanted = {box.name for box in self.boxes[1:(count or len(self.managers)) + 1]}
        try:
            wait_for(lambda: wanted <= ready_managers(self.managers[0]), timeout,
                     f"managers {sorted(wanted)} ready and reachable")
        except AssertionError as error:
            shown = self.managers[0].box.run(["docker", "node", "ls"], check=False)
            raise AssertionError(f"{error}:\n{shown.stdout}{shown.stderr}") from None

    def add_box(self, role: str) -> Box:
        """A box of the test's own on the next free network node, powered off with the rest."""
        box = Box(f"unseal-{self.lab.tag}-{role}", self.workdir / role, self.boxes[0].binds_ro,
                  rebootable=True, netns=self.lab.nodes[len(self.boxes)])
        self.boxes.append(box)
        return box

    def cut_power(self, sites: Sequence[Site]) -> None:
        for error in run_all([site.box.cut_power for site in sites]):
            raise error

    def power_on(self, sites: Sequence[Site]) -> dict[str, float]:
        """Boot them together; each box's start on the monotonic clock, by name."""
        started: dict[str, float] = {}

        def boot(site: Site) -> Callable[[], None]:
            def start() -> None:
                started[site.box.name] = site.box.power_on()
            return start
        for error in run_all([boot(site) for site in sites]):
            raise error
        return started

    def close(self) -> list[str]:
        """Power every box off and clean the host; what was left behind."""
        return poweroff_all(self.boxes)


def poweroff_all(boxes: Sequence[Box]) -> list[str]:
    """Power the boxes off together and clean the host; what was left behind."""
    errors = run_all([box.poweroff for box in boxes])
    left = [f"{box.name}: {item}" for box in boxes for item in box.leftovers()]
    return left + [repr(error) for error in errors]


def ready_managers(site: Site) -> set[str]:
    """Host names of the managers this manager's docker sees ready and reachable."""
    shown = site.box.run(["docker", "node", "ls", "--format",
                          "{{.Hostname}} {{.Status}} {{.ManagerStatus}}"], check=False,
                         timeout=30)
    return {line.split()[0] for line in shown.stdout.splitlines()
            if line.split()[1:2] == ["Ready"] and ("Reachable" in line or "Leader" in line)}


@contextlib.contextmanager
def box_swarm(workdir: Path, wheels: Path, managers: int = 3, *, spare: int = 0,
              agent_settings: str = "") -> Iterator[BoxSwarm]:
    """The boxes, installed, and everything removed again however the block ends (the boxes
    first, then the lab's namespaces, which raises if anything is left). `spare` network
    nodes are left free for the test's own machines (`add_box`); `agent_settings` are lines
    of every agent's config.toml."""
    with NetLab(nodes=managers + 1 + spare) as lab:
        swarm = BoxSwarm(lab, workdir, wheels, managers, agent_settings)
        try:
            swarm.install()
            yield swarm
        finally:
            left = swarm.close()
            assert left == [], f"the boxes left {left} on the host"
