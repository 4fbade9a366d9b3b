"""``unseal-agent``: the node agent's commands.

Exit codes: 0 ok, 1 failure, 2 usage error, 78 (EX_CONFIG) when `run` cannot start because of
its configuration, so systemd's RestartPreventExitStatus=78 stops a restart loop that no
restart can fix.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from agent import config as agent_config
from agent import daemon, log, status
from agent.enroll import enroll as do_enroll
from agent.rotate import rotate as do_rotate
from escrow.core.errors import EscrowError
from escrow.core.plaintext import plain
from escrow.core.version import VERSION

EX_CONFIG = 78


class AgentGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EscrowError as exc:
            click.echo(exc.diagnostics(), err=True)
            ctx.exit(1)


@click.group(cls=AgentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name="unseal-agent")
def cli() -> None:
    """Auto-unseal agent for a Docker Swarm manager with autolock."""


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--config plus one flag per setting of the config file, each also an environment
    variable (UNSEAL_AGENT_CONFIG, UNSEAL_AGENT_ESCROW_URL, ...): a flag wins over the variable,
    the variable over the file."""
    options = [click.option("--config", type=click.Path(path_type=Path),
                            envvar=agent_config.env_name("config"), show_envvar=True,
                            help=f"Config file (default {agent_config.DEFAULT_CONFIG}).")]
    for name in agent_config.SETTINGS:
        several = " (several: comma-separated)" if name == "escrow_url" else ""
        options.append(click.option(
            agent_config.flag_name(name), name,
            type=float if name in agent_config.SECONDS else str,
            envvar=agent_config.env_name(name), show_envvar=True,
            help=f"Overrides {name} of the config file{several}."))
    for option in reversed(options):
        command = option(command)
    return command


def load_settings(config: Path | None, flags: dict[str, Any]) -> agent_config.AgentConfig:
    """The agent's settings, each error naming where the wrong value came from."""
    context = click.get_current_context()
    from_environment = {name for name in flags if context.get_parameter_source(name)
                        == click.core.ParameterSource.ENVIRONMENT}
    return agent_config.load(config, flags, from_environment)


@cli.command()
@config_options
def enroll(config: Path | None, **flags: Any) -> None:
    """Enroll this unlocked manager and escrow its current unlock key if needed.

    \b
    Example:
      unseal-agent enroll                         # on an unlocked manager, as root
      unseal-agent enroll --escrow-deposit-key-sha256 FINGERPRINT   # after `escrow init` anew
    """
    result = asyncio.run(do_enroll(load_settings(config, flags)))
    click.echo(f"enrolled node {result.node_id} of cluster {result.cluster_id}")
    if result.deposited:
        click.echo(f"deposited the current unlock key as version {result.version}")
    else:
        click.echo(f"the escrow already holds the current unlock key (version {result.version})")
    click.echo(f"deposits go only to the escrow's deposit key sha256 {result.deposit_key_sha256}"
               + (" (pinned now, on first use: compare it with the escrow host's)"
                  if result.pinned_now else ""))


@cli.command()
@config_options
def run(config: Path | None, **flags: Any) -> None:
    """Watch this manager and unlock it from the escrow whenever it is locked (the daemon).

    \b
    Example:
      unseal-agent run --config /etc/unseal-agent/config.toml   # what the systemd unit starts
    """
    logger = log.setup()
    try:
        settings = load_settings(config, flags)
        # Checked before READY=1, so a wrong path fails the start instead of every unlock.
        daemon.check_startup(settings)
    except EscrowError as exc:
        # No traceback: the message names the setting, and a trace would bury it.
        logger.error("cannot start: %s%s",  # noqa: TRY400
                     exc.message, f" ({exc.hint})" if exc.hint else "")
        raise SystemExit(EX_CONFIG) from None
    asyncio.run(daemon.run(settings, logger))


@cli.command()
@config_options
def rotate(config: Path | None, **flags: Any) -> None:
    """Rotate the swarm's unlock key and escrow the new one (fails loudly if it cannot).

    \b
    Example:
      unseal-agent rotate                         # new unlock key, escrowed in the same step
    """
    logger = log.setup(journal_too=True)
    result = asyncio.run(do_rotate(load_settings(config, flags), logger))
    click.echo(f"rotated the unlock key of cluster {result.cluster_id}: the escrow holds the "
               f"new key as version {result.new_version} (old: version {result.old_version})")


@cli.command(name="status")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status_command(config: Path | None, as_json: bool, **flags: Any) -> None:
    """Show node, cluster, lock state, enrollment, escrow reachability and key versions.
    Exits 1 if anything needs attention.

    \b
    Example:
      unseal-agent status --json
    """
    report = asyncio.run(status.gather(load_settings(config, flags)))
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2))
    else:
        last = report.last_unlock
        rows = [
            ("node", f"{report.node_id or '?'} ({report.role or 'unknown role'})"),
            ("cluster", report.cluster_id or "?"),
            ("lock state", report.lock_state),
            ("enrolled", f"yes, at {report.enrolled_at}" if report.enrolled else "no"),
            ("escrow", _escrow_row(report)),
            ("clock offset", "?" if report.clock_offset_seconds is None
             else f"escrow {report.clock_offset_seconds:+.0f} s from this host"),
            ("escrowed keys", ", ".join(f"v{v}" for v in report.escrowed_versions) or "none"),
            ("key generation", report.kek_version or "?"),
            ("last unlock", f"{last.at}, key version {last.version}, request "
                            f"{last.request_id}, {last.seconds:.2f} s" if last else "never"),
        ]
        # Values come from dockerd, swarm's files and the escrow: shown as plain text only.
        for label, value in rows:
            click.echo(f"{label + ':':<16}{plain(value)}")
        for problem in report.problems:
            click.echo(f"problem: {plain(problem)}", err=True)
    if report.problems:
        raise SystemExit(1)


def _escrow_row(report: status.Status) -> str:
    if len(report.escrow_urls) <= 1:
        return (f"{report.escrow_url} "
                f"({'reachable' if report.escrow_reachable else 'UNREACHABLE'})")
    others = ", ".join(url for url in report.escrow_urls if url != report.escrow_url)
    if report.escrow_reachable:
        return f"{report.escrow_url} (reachable, answered; also {others})"
    return f"UNREACHABLE at {', '.join(report.escrow_urls)}"


def main() -> None:
    cli(prog_name="unseal-agent")
