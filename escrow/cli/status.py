"""``escrow status``: the fleet as the status page shows it, in the terminal, from any machine
that reaches the escrow, with a viewer's token. Exits 0 when no manager is locked, 2 when one
is (waiting for custodians or not), 1 on error, as `vault status` does for a sealed Vault."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Group, RenderableType
from rich.live import Live
from rich.text import Text

from escrow.api_client import ViewerClient
from escrow.cli.context import console, grid, json_option, print_json
from escrow.core.errors import EscrowError
from escrow.core.fleet import FleetCluster, FleetStatus
from escrow.core.hsm import read_pin_file
from escrow.core.plaintext import plain
from escrow.core.states import NodeState

LOCKED_EXIT = 2
_SAYS = {NodeState.WAITING: "LOCKED, waiting for custodians", NodeState.LOCKED: "LOCKED",
         NodeState.QUARANTINED: "quarantined (suspected copy)"}


class _UsageError(click.UsageError):
    exit_code = 1


class _StatusCommand(click.Command):
    """Usage errors exit 1 here, not click's 2: 2 says "a manager is locked"."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _UsageError(exc.format_message(), exc.ctx) from None


def _health(status: FleetStatus) -> RenderableType:
    health = status.health
    hsm = "up" if health.hsm == "up" else f"DOWN: {health.hsm_error}"
    rows = [["HSM", hsm],
            ["store", f"{health.store}, {'writable' if health.writable else 'READ-ONLY'}"],
            ["disk", f"{health.data_dir_free_bytes / 2**20:,.0f} MiB free, "
                     f"{health.disk_reserve_bytes / 2**20:,.0f} MiB held back for releases"]]
    if health.replicas:
        rows.append(["replicas", ", ".join(health.replicas)])
    rows.append(["version", status.version])
    return grid(f"Escrow (as of {status.generated_at})", ["part", "state"], rows)


def _cluster(cluster: FleetCluster) -> list[RenderableType]:
    versions = ", ".join(f"v{v.version}" for v in cluster.versions) or "none escrowed yet"
    shown: list[RenderableType] = [grid(
        f"Cluster {cluster.cluster_id}: {cluster.threshold} of {', '.join(cluster.slots)}; "
        f"key versions {versions}",
        ["manager", "node", "state", "last heartbeat", "last unlock", "KEK version", "agent"],
        [[n.hostname, n.node_id, _SAYS.get(n.state, str(n.state)), n.last_seen or "never",
          f"{n.last_unlock} (v{n.last_unlock_version})" if n.last_unlock else "never",
          n.kek_version or "-", n.agent_version or "-"] for n in cluster.nodes])]
    if cluster.requests:
        shown.append(grid(
            f"Waiting for custodians in {cluster.cluster_id}",
            ["request", "manager", "asked", "expires", "needs", "approved by", "could approve"],
            [[r.request_id, r.hostname, r.created_at, r.expires_at,
              f"{r.needed} more of {r.threshold}"
              + (f", or none from {r.approves_by_default_at} unless denied"
                 if r.approves_by_default_at else ""),
              ", ".join(r.approved_by) or "no one yet",
              ", ".join(r.could_approve)] for r in cluster.requests]))
    return shown


def render(status: FleetStatus) -> RenderableType:
    """The whole view; every string from the escrow as plain text, never markup."""
    locked = status.locked
    summary = (f"{len(locked)} manager(s) locked: " + ", ".join(n.hostname for n in locked)
               if locked else "Every reachable manager is unlocked.")
    parts: list[RenderableType] = [Text(plain(summary)), _health(status)]
    for cluster in status.clusters:
        parts += _cluster(cluster)
    if not status.clusters:
        parts.append(Text("No cluster is registered yet."))
    return Group(*parts)


@click.command(cls=_StatusCommand)
@click.option("--url", envvar="ESCROW_URL", required=True, show_envvar=True,
              help="The escrow, e.g. https://escrow.example:8443; its replicas separated by "
                   "commas, in order of preference.")
@click.option("--ca", envvar="ESCROW_CA", required=True, show_envvar=True,
              type=click.Path(path_type=Path), help="The escrow's CA (tls/ca.pem).")
@click.option("--token-file", envvar="ESCROW_VIEWER_TOKEN_FILE", required=True,
              show_envvar=True, type=click.Path(path_type=Path),
              help="Your viewer token (from `escrow viewer add`), in a file of mode 0600.")
@json_option
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=1), default=5.0, show_default=True,
              help="Seconds between redraws with --watch.")
@click.pass_context
def status(ctx: click.Context, url: str, ca: Path, token_file: Path, as_json: bool,
           watch: bool, interval: float) -> None:
    """Show every cluster's managers (unlocked, locked, waiting for custodians, unreachable,
    quarantined, revoked), the requests waiting for custodians and the escrow's health.

    Exits 0 when no manager is locked, 2 when one is, 1 on error.

    \b
    Examples:
      escrow status --url https://escrow.example:8443 --ca ca.pem --token-file viewer.token
      ESCROW_VIEWER_TOKEN_FILE=~/.escrow-viewer escrow status --watch
    """
    if watch and as_json:
        raise _UsageError("--watch redraws tables; --json prints once", ctx)
    token = read_pin_file(token_file, str(token_file), "--token-file", "viewer token").value
    client = ViewerClient(url, str(ca), token)

    def fetch() -> FleetStatus:
        return client.call("GET", "/v1/status", FleetStatus)

    current = fetch()
    if as_json:
        print_json(_json(current))
    elif watch:
        current = _watch(current, fetch, interval)
    else:
        console().print(render(current))
    ctx.exit(LOCKED_EXIT if current.any_locked else 0)


def _watch(current: FleetStatus, fetch: Callable[[], FleetStatus],
           interval: float) -> FleetStatus:
    """Redraw in place on a terminal, one view after another into a pipe or a log, until
    Ctrl-C; the last view fetched."""
    terminal = console().is_terminal
    with Live(render(current), console=console(), auto_refresh=False,
              transient=False) if terminal else contextlib.nullcontext() as live:
        if live is None:
            console().print(render(current))
        try:
            while True:
                time.sleep(interval)
                try:
                    current = fetch()
                    view = render(current)
                except EscrowError as exc:  # a replica restarting: say so, keep watching
                    view = Group(Text(plain(f"{exc.message} (retrying every {interval:g} s)")),
                                 render(current))
                if live is None:
                    console().print(view)
                else:
                    live.update(view, refresh=True)
        except KeyboardInterrupt:
            pass
    return current


def _json(status: FleetStatus) -> Any:
    return status.model_dump(mode="json")
