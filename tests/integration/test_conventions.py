"""What an operator who knows the ecosystem expects of the commands (issue 20, first pieces):
`error:` and `hint:` with exit 1 instead of a traceback, and `--version`."""

from __future__ import annotations

import json
import os
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

from agent import config as agent_config
from agent.client import parse_answer
from agent.errors import EscrowRejected
from escrow.cli import cli
from escrow.core.protocol import InfoResponse
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


@pytest.mark.parametrize(("program", "variable", "typed", "offered"), [
    ("escrow", "_ESCROW_COMPLETE", "escrow clu", "cluster"),
    ("unseal-agent", "_UNSEAL_AGENT_COMPLETE", "unseal-agent st", "status"),
])
def test_the_installed_commands_complete_in_bash_as_readme_sets_them_up(
        program: str, variable: str, typed: str, offered: str) -> None:
    command = Path(sys.executable).parent / program
    env = {**os.environ, "PATH": f"{command.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # click's protocol: the words typed so far, the index of the one being completed.
    answer = subprocess.run([str(command)], capture_output=True, text=True, check=False,
                            timeout=60, cwd=REPO, env={**env, variable: "bash_complete",
                                                       "COMP_WORDS": typed, "COMP_CWORD": "1"})
    assert ok(answer).splitlines() == [f"plain,{offered}"]
    # README's line for ~/.bashrc, then what bash runs on Tab after what was typed.
    function = f"_{program.replace('-', '_')}_completion"
    shell = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c",
         f'eval "$({variable}=bash_source {program})"\n'
         f"complete -p {program}\n"
         f"COMP_WORDS=({typed}); COMP_CWORD=1; {function} {program}\n"
         'printf "%s\\n" "${COMPREPLY[@]}"\n'],
        capture_output=True, text=True, check=False, timeout=60, cwd=REPO, env=env)
    assert ok(shell).splitlines() == [f"complete -o nosort -F {function} {program}", offered]


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


def agent(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real `unseal-agent`, with only the environment variables given here of its own."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(agent_config.ENV_PREFIX)}
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, cwd=REPO, check=False, timeout=60, env={**clean, **env})


def test_every_agent_setting_is_a_flag_and_an_environment_variable() -> None:
    shown = ok(agent("run", "--help"))
    for setting in (*agent_config.SETTINGS, "config"):
        assert agent_config.flag_name(setting) in shown, setting
        assert agent_config.env_name(setting) in shown, setting


def test_an_agent_setting_from_the_environment_is_used_and_named_in_its_error(
        tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('escrow_ca = "/nope.pem"\n')
    config.chmod(0o600)
    said = fails(agent("enroll", UNSEAL_AGENT_CONFIG=str(config),
                       UNSEAL_AGENT_ESCROW_URL="http://escrow.example"), 1,
                 "UNSEAL_AGENT_ESCROW_URL: escrow_url", "over TLS only")
    assert "Traceback" not in said
    # A flag wins over the variable.
    fails(agent("enroll", "--escrow-url", "ftp://escrow.example", UNSEAL_AGENT_CONFIG=str(config),
                UNSEAL_AGENT_ESCROW_URL="http://escrow.example"), 1, "--escrow-url: escrow_url")


def test_the_agent_key_token_settings_are_flags_too(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('escrow_url = "https://escrow.example"\nescrow_ca = "/nope.pem"\n')
    config.chmod(0o600)
    fails(agent("enroll", "--config", str(config), "--agent-key-pkcs11-module",
                "/usr/lib/softhsm/libsofthsm2.so"), 1,
          "agent_key_pkcs11_module is set but agent_key_pkcs11_token is not")


def test_an_error_is_an_rfc_9457_problem_and_agents_still_read_it(
        tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path / "escrow")
    escrow.start()
    try:
        context = ssl.create_default_context(cafile=str(escrow.ca))
        answers = []
        # The escrow's own refusal, and aiohttp's for a path it has no route for.
        for path, body in (("/v1/enroll", b"{"), ("/v1/nowhere", None)):
            request = urllib.request.Request(escrow.url + path, data=body,  # noqa: S310
                                             method="POST" if body else "GET")
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(request, context=context, timeout=30)  # noqa: S310
            assert answer.value.headers["Content-Type"] == "application/problem+json"
            answers.append((answer.value.code, answer.value.read().decode()))
    finally:
        assert escrow.stop() == 0
    (refused, text), (unknown, missing) = answers
    problem = json.loads(text)
    assert (refused, problem) == (400, {
        "type": "https://swarm-unseal.invalid/problems/malformed_json",
        "title": "Malformed json", "status": 400, "detail": "the body is not JSON",
        "error": "malformed_json", "message": "the body is not JSON",
        "hint": "see /v1/openapi.json for the request format"})
    assert (unknown, json.loads(missing)) == (404, {
        "type": "https://swarm-unseal.invalid/problems/not_found", "title": "Not Found",
        "status": 404, "detail": "Not Found", "error": "not_found", "message": "Not Found",
        "hint": ""})
    # What agents make of it: the reason, message and hint, as before.
    with pytest.raises(EscrowRejected) as rejected:
        parse_answer(refused, text, InfoResponse)
    assert (rejected.value.status, rejected.value.reason, rejected.value.hint) == (
        400, "malformed_json", "see /v1/openapi.json for the request format")
    assert rejected.value.message.endswith(": the body is not JSON")
