"""``escrow serve``: the HTTPS API."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import ssl
from dataclasses import replace
from pathlib import Path
from typing import cast

import click
from aiohttp import web

from escrow import config
from escrow.cli.context import data_dir_option
from escrow.core.errors import ConfigError
from escrow.core.notify import Notifier
from escrow.core.plaintext import PlainLogArgs
from escrow.core.tls import server_context
from escrow.lock import DataDirLock
from escrow.server.app import EscrowServer
from escrow.server.connections import ConnectionGate, Limits, fit_open_files, shrink_tls_buffers
from escrow.wrapping import resolve_pin


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"listen address {listen!r} is not HOST:PORT",
                          "for example 127.0.0.1:8443 or 0.0.0.0:8443")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - explicit operator choice


def cannot_listen(listen: str, error: OSError) -> ConfigError:
    """What to do when the listening socket cannot be had (pure)."""
    hints = {
        errno.EADDRINUSE: "another process listens there (`ss -ltnp` names it): stop it, or "
                          "choose another port with --listen or server.listen",
        errno.EADDRNOTAVAIL: "that address is not one of this host's (`ip -brief addr`): "
                             "listen on one of them, 127.0.0.1, or 0.0.0.0 for all",
        errno.EACCES: "ports below 1024 need CAP_NET_BIND_SERVICE: choose a port above 1023 "
                      "(8443, say) or grant the capability to the service",
    }
    return ConfigError(f"cannot listen on {listen}: {error.strerror or error}",
                       hints.get(error.errno or 0, "check server.listen (HOST:PORT) and "
                                                    "that nothing else holds the port"))


@click.command()
@data_dir_option
@click.option("--listen", help="HOST:PORT to listen on (server.listen; default 127.0.0.1:8443).")
@click.option("--hsm-pin-file", type=click.Path(path_type=Path),
              help="File holding the token's user PIN (overrides the config).")
def serve(data_dir: Path, listen: str | None, hsm_pin_file: Path | None) -> None:
    """Serve the escrow API over TLS until SIGTERM or SIGINT.

    \b
    Example:
      escrow serve --listen 0.0.0.0:8443
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        # Every logger's quoted values, not only the server's: nothing a client sent can start
        # a forged line or carry terminal escapes into the journal.
        handler.addFilter(PlainLogArgs())
    settings = config.load(data_dir)
    if listen:
        settings = replace(settings, server=replace(settings.server, listen=listen))
    host, port = parse_listen(settings.server.listen)
    context = server_context(settings.server.tls_cert, settings.server.tls_key)
    pin = resolve_pin(hsm_pin_file, settings.hsm.pin_file, os.environ)
    server = EscrowServer(settings, pin)
    with DataDirLock(data_dir, "escrow serve"):
        asyncio.run(_serve(server, host, port, context, settings.server.listen))


# Seconds aiohttp goes on reading a body it was answered before the end of (413, 429, the body
# deadline's 408), so that the client reads the answer instead of a reset; then it closes.
LINGER_SECONDS = 2.0
# Connections the kernel completes before the escrow accepts them. A power cut brings every
# manager back at once: with aiohttp's default of 128, a storm of 1,000 agents overflowed it
# hundreds of times, each overflow a SYN retransmitted a second later. The kernel caps it at
# net.core.somaxconn (4,096 by default), so asking for the most it takes lets a site that
# raises that sysctl have a longer queue (README, "Capacity").
BACKLOG = 65535


async def _serve(server: EscrowServer, host: str, port: int, context: ssl.SSLContext,
                 listen: str) -> None:
    # READY=1 goes to systemd only once the socket listens, so `active` means serving.
    settings = server.settings.server
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=10,
                           keepalive_timeout=settings.keepalive_seconds,
                           lingering_time=LINGER_SECONDS)
    await runner.setup()
    http = cast(web.Server, runner.server)  # made by setup()
    notifier = Notifier()
    loop = asyncio.get_running_loop()
    # TLS is started by the gate, not the listener, so that the connection limits count
    # connections from accept on, handshakes included (escrow/server/connections.py).
    gate = ConnectionGate(http, context, fit_open_files(Limits.of(settings)),
                          server.metrics.dropped, server.metrics.registry)
    listener: asyncio.Server | None = None
    shrink_tls_buffers()
    try:
        try:
            listener = await loop.create_server(gate, host, port, backlog=BACKLOG)
        except OSError as exc:
            raise cannot_listen(listen, exc) from None
        click.echo(f"escrow serving https://{listen} from {server.settings.data_dir}", err=True)
        notifier.ready(f"serving https://{listen}")
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        notifier.stopping()
    finally:
        if listener is not None:
            listener.close()
        gate.close()  # no new connections; handshakes in progress cut
        await runner.cleanup()  # requests answered, kept-alive connections closed
        gate.abort_all()
        if listener is not None:
            await listener.wait_closed()
