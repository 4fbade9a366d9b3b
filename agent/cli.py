"""``unseal-agent``: the node agent's commands. Exit codes: 0 ok, 1 failure, 2 usage error."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from agent import config as agent_config
from agent.enroll import enroll as do_enroll
from agent.errors import AgentError
from escrow.errors import EscrowError


class AgentGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (AgentError, EscrowError) as exc:
            click.echo(exc.diagnostics(), err=True)
            ctx.exit(1)


@click.group(cls=AgentGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Auto-unseal agent for a Docker Swarm manager with autolock."""


def _config(config: Path | None, **flags: Any) -> agent_config.AgentConfig:
    return agent_config.load(config, flags)


@cli.command()
@click.option("--config", type=click.Path(path_type=Path),
              help=f"Config file (default {agent_config.DEFAULT_CONFIG}).")
@click.option("--escrow-url")
@click.option("--escrow-ca")
@click.option("--docker-host")
@click.option("--docker-root")
@click.option("--state-dir")
def enroll(config: Path | None, **flags: Any) -> None:
    """Enroll this unlocked manager and escrow its current unlock key if needed."""
    result = asyncio.run(do_enroll(_config(config, **flags)))
    click.echo(f"enrolled node {result.node_id} of cluster {result.cluster_id}")
    if result.deposited_version is None:
        click.echo("the escrow already holds the current unlock key")
    else:
        click.echo(f"deposited the current unlock key as version {result.deposited_version}")


def main() -> None:
    cli(prog_name="unseal-agent")
