"""``escrow``: the escrow's admin, custodian and recovery commands.

Exit codes: 0 success, 1 operational failure (``error:`` and ``hint:`` on stderr), 2 usage error.
"""

from __future__ import annotations

from typing import Any

import click

from escrow.cli import (
    approvals,
    audit,
    backup,
    cluster,
    custodian,
    drills,
    hsm,
    init,
    keys,
    node,
    recover,
    serve,
    status,
    store,
    viewer,
    windows,
)
from escrow.core.errors import EscrowError
from escrow.core.version import VERSION


class EscrowGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EscrowError as exc:
            click.echo(exc.diagnostics(), err=True)
            ctx.exit(1)


@click.group(cls=EscrowGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name="escrow")
def cli() -> None:
    """Unlock-key escrow for Docker Swarm managers with autolock."""


for command in (init.init, custodian.custodian, cluster.cluster, keys.deposit, keys.key,
                audit.audit, recover.recover, serve.serve, node.node, approvals.requests,
                approvals.approve, approvals.deny, approvals.share, backup.backup,
                backup.restore, hsm.hsm, store.store, viewer.viewer, status.status,
                windows.window):
    cli.add_command(command)
for command in (drills.verify, drills.drills):
    approvals.share.add_command(command)


def main() -> None:
    cli(prog_name="escrow")
