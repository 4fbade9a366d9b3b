"""``escrow serve``: the HTTPS API."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import click
from aiohttp import web

from escrow import config
from escrow.cli.context import data_dir_option
from escrow.errors import ConfigError
from escrow.hsm import resolve_pin
from escrow.server.app import EscrowServer
from escrow.tls import server_context


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen address {listen!r} is not HOST:PORT",
                          "for example 127.0.0.1:8443 or 0.0.0.0:8443")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - explicit operator choice


@click.command()
@data_dir_option
@click.option("--listen", help="HOST:PORT to listen on (server.listen; default 127.0.0.1:8443).")
@click.option("--hsm-pin-file", type=click.Path(path_type=Path),
              help="File holding the token's user PIN (overrides the config).")
def serve(data_dir: Path, listen: str | None, hsm_pin_file: Path | None) -> None:
    """Serve the escrow API over TLS until SIGTERM or SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = config.load(data_dir)
    if listen:
        settings = replace(settings, server=replace(settings.server, listen=listen))
    host, port = parse_listen(settings.server.listen)
    context = server_context(settings.server.tls_cert, settings.server.tls_key)
    pin = resolve_pin(hsm_pin_file, settings.hsm.pin_file, os.environ)
    server = EscrowServer(settings, pin)
    click.echo(f"escrow serving https://{settings.server.listen} from {settings.data_dir}",
               err=True)
    web.run_app(server.app(), host=host, port=port, ssl_context=context, print=None,
                shutdown_timeout=10, access_log=None, handle_signals=True)
