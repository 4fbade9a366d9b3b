"""What an operator who knows the ecosystem expects of the commands (issue 20, first pieces):
`error:` and `hint:` with exit 1 instead of a traceback, and `--version`."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from escrow.cli import cli
from escrow.core.version import VERSION
from escrow.custodian_keys import MIN_PASSPHRASE
from lab.commands import REPO, run_escrow
from lab.server import make_escrow
from tests.conftest import fails, ok

pytestmark = pytest.mark.slow
MOMENT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")


def test_serve_on_a_port_in_use_or_an_address_not_of_this_host_says_what_to_do(
        tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path / "escrow")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = fails(escrow.cli("serve", "--listen", f"127.0.0.1:{port}"), 1,
                     f"error: cannot listen on 127.0.0.1:{port}", "another process listens")
    assert "Traceback" not in busy
    # 192.0.2.1 (TEST-NET-1) is no address of this host's.
    elsewhere = fails(escrow.cli("serve", "--listen", "192.0.2.1:8443"), 1,
                      "error: cannot listen on 192.0.2.1:8443", "not one of this host's")
    assert "Traceback" not in elsewhere


def test_init_with_a_data_dir_that_is_a_file_refuses_and_leaves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "not-a-dir"
    path.write_text("mine\n")
    said = fails(run_escrow("init", "--data-dir", str(path)), 1,
                 "exists and is not a directory", "hint:")
    assert "Traceback" not in said
    assert path.read_text() == "mine\n"


@pytest.mark.parametrize(("module", "name"), [("escrow", "escrow"), ("agent", "unseal-agent")])
def test_both_commands_say_their_version(module: str, name: str) -> None:
    said = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                          text=True, cwd=REPO, check=False, timeout=60)
    assert ok(said).strip() == f"{name}, version {VERSION}"


def test_listings_spell_every_moment_one_way_with_milliseconds(tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path / "escrow")
    cluster = escrow.cluster(2, "auto,auto", "--allow-no-paper-recovery")
    shown = json.loads(ok(escrow.cli("cluster", "show", cluster.cluster_id, "--json")))
    for field in ("root_ca_not_after", "created_at"):
        assert MOMENT.fullmatch(shown[field]), (field, shown[field])


def test_keygen_help_says_the_passphrase_minimum() -> None:
    said = CliRunner().invoke(cli, ["custodian", "keygen", "--help"])
    assert said.exit_code == 0
    assert f"at least {MIN_PASSPHRASE} characters" in " ".join(said.output.split())


def test_a_method_the_path_does_not_take_is_answered_405_with_allow(tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path / "escrow")
    escrow.start()
    try:
        context = ssl.create_default_context(cafile=str(escrow.ca))
        request = urllib.request.Request(escrow.url + "/v1/unseal", method="GET")  # noqa: S310
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, context=context, timeout=30)  # noqa: S310 - https
        assert answer.value.code == 405
        assert answer.value.headers["Allow"] == "POST"
        assert json.loads(answer.value.read())["error"] == "method_not_allowed"
    finally:
        assert escrow.stop() == 0
