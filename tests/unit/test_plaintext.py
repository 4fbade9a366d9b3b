"""Node- and custodian-controlled text is plain text: refused where it enters unless it is, and
shown as text (never markup, never terminal control) wherever it is shown.

The attack: a node names itself ``[/]`` and every custodian's `escrow requests` fails; names
itself ``manager-1\\x1b[2K\\rmanager-2`` and custodians read another host; a deny reason or an
error message carries escapes to an operator's terminal or a forged line to a log; a hostname
``<!channel>`` pages a whole chat.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from agent import cli as agent_cli
from agent import client as agent_client
from agent import config as agent_config
from agent import host
from agent import status as agent_status
from agent.errors import EscrowRejected, EscrowUnavailable
from escrow import api_client
from escrow.cli import context
from escrow.core import plaintext, protocol
from escrow.core.errors import IdentityError, InputError
from escrow.core.states import RequestState
from escrow.notifications import body as notification_body
from escrow.notifications import events
from escrow.store import RequestRecord

HOSTILE = ["[/]", "[bold red]x[/]", "[/x]", "\x1b[2K\r", "\u202e", "mgr\x1b]0;pwned\x07",
           "a\nINFO escrow.server: forged line", "\u2066x\u2069", "\x9b31m", "\ud800"]
MARKUP = ["[/]", "[bold red]x[/]", "[/x]", "[link=https://evil.example]ok[/link]"]
CONTROLS = [text for text in HOSTILE if text not in MARKUP]
# Every character escrow.core.plaintext refuses and escapes.
UNSAFE_CHARS = st.sampled_from(
    [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), 0x061C, 0x200E, 0x200F, 0x2028,
                      0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0xD800, 0xDFFF]])
TEXT = st.text(alphabet=st.characters(), max_size=60) | st.lists(
    st.text(max_size=5) | UNSAFE_CHARS, max_size=12).map("".join)
LABEL = st.from_regex(r"\A[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
HOSTNAMES = st.lists(LABEL, min_size=1, max_size=4).map(".".join).filter(lambda h: len(h) <= 253)
VALID_UNSEAL: dict[str, Any] = {
    "cluster_id": "a" * 25, "node_id": "b" * 25, "node_cert": "x", "ephemeral_public_key": "AAAA",
    "hostname": "manager-1", "boot_id": str(uuid.uuid4()), "kek_version": "3", "nonce": "AAAA",
    "signature": "AAAA"}


def _raw_unsafe(text: str) -> bool:
    return plaintext.UNSAFE.search(text) is not None


# -- the helper ----------------------------------------------------------------------------

@pytest.mark.parametrize("text", HOSTILE)
def test_terminal_controls_and_bidi_overrides_are_shown_as_their_escape(text: str) -> None:
    shown = plaintext.plain(text)
    assert not _raw_unsafe(shown)
    shown.encode("utf-8")  # a lone surrogate would have raised UnicodeEncodeError on print
    assert plaintext.plain("\x1b[2K\r") == "\\x1b[2K\\x0d"
    assert plaintext.plain("\u202e") == "\\u202e"


@given(TEXT)
@example("\x1b[2K\rmanager-2")
def test_plain_never_lets_an_unsafe_character_through_and_keeps_safe_text(text: str) -> None:
    shown = plaintext.plain(text)
    assert not _raw_unsafe(shown)
    assert plaintext.plain(shown) == shown  # nothing left to escape
    if not _raw_unsafe(text):
        assert shown == text
    assert plaintext.plain(123) == "123"


@given(TEXT)
def test_plain_text_is_accepted_exactly_when_it_has_no_unsafe_character(text: str) -> None:
    if not _raw_unsafe(text):
        assert plaintext.check_plain_text(text) == text
        return
    with pytest.raises(ValueError, match="must be plain text") as caught:
        plaintext.check_plain_text(text)
    assert not _raw_unsafe(str(caught.value))  # the message names the character by its escape


@pytest.mark.parametrize("text", HOSTILE + MARKUP)
def test_markup_in_a_table_cell_is_shown_literally(text: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    context.table(f"About to approve {text}", ["field", text],
                  [["hostname", text], ["boot id", text], ["details", {"reason": text}]])
    out = capsys.readouterr().out
    assert not _raw_unsafe(out.replace("\n", ""))
    assert plaintext.plain(text) in out
    if text in MARKUP:
        assert text in out  # the brackets themselves, not what rich would make of them


# -- validation where text enters ----------------------------------------------------------

@given(HOSTNAMES)
@example("manager-1")
@example("m1")
@example("1.2.3.4")
@example("a" * 63 + ".example")
def test_dns_host_names_are_accepted(name: str) -> None:
    assert plaintext.check_hostname(name) == name
    assert protocol.UnsealRequest(**{**VALID_UNSEAL, "hostname": name}).hostname == name


@pytest.mark.parametrize("name", [
    *HOSTILE, *MARKUP, "", "-manager", "manager-", "a..b", ".a", "a.", "under_score",
    "a" * 64, ".".join(["a" * 63] * 4) + ".a", "münchen", "host name", "<!channel>", "*bold*",
    "`code`", "@channel", "a&b"])
def test_markup_in_hostname_is_refused_by_the_request_models(name: str) -> None:
    with pytest.raises(ValueError, match="must be a DNS host name"):
        plaintext.check_hostname(name)
    for model, valid in ((protocol.UnsealRequest, VALID_UNSEAL),
                         (protocol.EnrollRequest, {
                             k: v for k, v in VALID_UNSEAL.items()
                             if k not in ("ephemeral_public_key", "boot_id", "kek_version",
                                          "signature")} | {
                             "agent_public_key": "x", "swarm_signature": "", "agent_signature": ""
                         })):
        with pytest.raises(ValidationError) as caught:
            model.model_validate({**valid, "hostname": name})
        assert [e["loc"] for e in caught.value.errors()] == [("hostname",)]


@given(HOSTNAMES | TEXT)
def test_an_accepted_hostname_has_no_character_that_markup_or_chat_would_read(
        name: str) -> None:
    try:
        plaintext.check_hostname(name)
    except ValueError:
        return
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-")
    assert 1 <= len(name) <= 253


def test_boot_ids_are_the_kernels_uuid_or_unknown() -> None:
    kernel = str(uuid.uuid4())
    for boot_id in (kernel, "unknown"):
        assert protocol.UnsealRequest(**{**VALID_UNSEAL, "boot_id": boot_id}).boot_id == boot_id
    for bad in [*HOSTILE, *MARKUP, "", "a" * 65, "boot 1", "boot_1", "{" + kernel + "}",
                kernel.upper(), "boot-1", kernel + "0"]:
        with pytest.raises(ValidationError) as caught:
            protocol.UnsealRequest.model_validate({**VALID_UNSEAL, "boot_id": bad})
        assert [e["loc"] for e in caught.value.errors()] == [("boot_id",)]
    assert plaintext.is_uuid(kernel)
    assert not plaintext.is_uuid(kernel.upper())


@pytest.mark.parametrize("text", CONTROLS)
def test_terminal_escapes_in_a_deny_reason_or_kek_version_are_refused(text: str) -> None:
    with pytest.raises(ValidationError) as caught:
        protocol.DenyRequest.model_validate({"reason": f"not planned{text}", "signature": "AA"})
    assert [e["loc"] for e in caught.value.errors()] == [("reason",)]
    with pytest.raises(ValidationError) as caught:
        protocol.UnsealRequest.model_validate({**VALID_UNSEAL, "kek_version": f"1{text}"})
    assert [e["loc"] for e in caught.value.errors()] == [("kek_version",)]
    # Brackets are text like any other: it is rendering that never reads them as markup.
    assert protocol.DenyRequest(reason="not planned [/] [bold]yet", signature="AA").reason


def test_lengths_are_checked_before_characters() -> None:
    with pytest.raises(ValidationError, match="at most 500 characters"):
        protocol.DenyRequest.model_validate({"reason": "\x1b" * 501, "signature": "AA"})
    with pytest.raises(ValidationError, match="at most 32 characters"):
        protocol.UnsealRequest.model_validate({**VALID_UNSEAL, "kek_version": "1" * 33})
    assert TypeAdapter(protocol.PlainText).validate_python("any length " * 100)


def test_a_lone_surrogate_from_json_is_refused_not_crashed_on() -> None:
    body = json.loads('{"reason": "x\\ud800", "signature": "AA"}')  # as the server parses
    with pytest.raises(ValidationError) as caught:
        protocol.DenyRequest.model_validate(body)
    assert [e["loc"] for e in caught.value.errors()] == [("reason",)]


@pytest.mark.parametrize("text", ["ok\x1b[2K\rapproved", "a\nb", "\u202eevil", "x" * 501, ""])
def test_a_cli_option_with_terminal_escapes_is_an_input_error(text: str) -> None:
    with pytest.raises(InputError, match="--reason") as caught:
        context.checked_text(text, "--reason", 500)
    assert not _raw_unsafe(caught.value.diagnostics().replace("\n", ""))
    assert context.checked_text("not planned [yet]", "--reason", 500) == "not planned [yet]"


# -- what the escrow or a proxy answers ----------------------------------------------------

@pytest.mark.parametrize("text", HOSTILE)
def test_terminal_escapes_in_an_escrow_error_do_not_reach_the_operator(text: str) -> None:
    body = f'{{"error": "x{text}", "message": "approved{text}", "hint": "{text}"}}'
    body = body.replace("\n", "\\n").replace("\r", "\\r")
    for raw in (body, f"<html>{text}</html>"):
        with pytest.raises(IdentityError) as custodian:
            api_client.parse_answer(403, raw, protocol.DecisionResponse)
        with pytest.raises(EscrowRejected) as agent:
            agent_client.parse_answer(403, raw, protocol.RequestStatus)
        with pytest.raises(EscrowUnavailable) as down:
            agent_client.parse_answer(503, raw, protocol.RequestStatus)
        for error in (custodian.value, agent.value, down.value):
            assert not _raw_unsafe(error.diagnostics().replace("\nhint: ", " "))


# -- the agent -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["[/]", "bad_name", "mgr\x1b[2K", "host.local."])
def test_the_agent_refuses_to_send_a_hostname_that_is_not_a_dns_name(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: name)
    with pytest.raises(host.BadHostname, match="is not a DNS name") as caught:
        host.hostname()
    assert "hostnamectl set-hostname" in caught.value.hint
    assert not _raw_unsafe(caught.value.message)
    monkeypatch.setattr(socket, "gethostname", lambda: "manager-1")
    assert host.hostname() == "manager-1"


def test_the_agent_sends_systemds_boot_id_else_the_kernels_or_unknown(tmp_path: Path) -> None:
    path = tmp_path / "boot_id"
    kernel = str(uuid.uuid4())
    path.write_text(kernel + "\n")
    assert host.boot_id(path, {}) == kernel
    container = uuid.uuid4()
    assert host.boot_id(path, {host.BOOT_ID_VARIABLE: container.hex}) == str(container)
    for content in ("[/]\n", "\x1b[2K\n", "", "\xff"):
        path.write_text(content, encoding="latin-1")
        assert host.boot_id(path, {}) == host.UNKNOWN_BOOT
        assert host.boot_id(path, {host.BOOT_ID_VARIABLE: content}) == host.UNKNOWN_BOOT
    assert host.boot_id(tmp_path / "missing", {}) == host.UNKNOWN_BOOT
    protocol.UnsealRequest(**{**VALID_UNSEAL, "boot_id": host.UNKNOWN_BOOT})


def test_terminal_escapes_from_dockerd_or_the_escrow_do_not_reach_agent_status(
        monkeypatch: pytest.MonkeyPatch) -> None:
    report = agent_status.Status(node_id="n\x1b[2K", lock_state="locked\x1b]0;x\x07",
                                 escrow_url="https://e\u202e", problems=["bad\r\x1b[1Aok"])

    async def gather(config: object) -> agent_status.Status:
        return report

    monkeypatch.setattr(agent_status, "gather", gather)
    monkeypatch.setattr(agent_config, "load", lambda *_: None)
    result = CliRunner().invoke(agent_cli.cli, ["status"])
    assert result.exit_code == 1
    assert "locked\\x1b]0;x\\x07" in result.output
    assert not _raw_unsafe(result.output.replace("\n", ""))


# -- logs ----------------------------------------------------------------------------------

def test_a_quoted_value_cannot_forge_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.plaintext")
    logger.addFilter(plaintext.PlainLogArgs())
    with caplog.at_level(logging.INFO, "tests.plaintext"):
        logger.info("webhook for %s failed", "r-1\nERROR escrow.server: forged\x1b[2K")
        logger.info("%(who)s", {"who": "a\rb"})
    assert [r.getMessage() for r in caplog.records] == [
        "webhook for r-1\\x0aERROR escrow.server: forged\\x1b[2K failed", "a\\x0db"]


# -- the webhook ---------------------------------------------------------------------------

def _asking(hostname: str) -> RequestRecord:
    return RequestRecord("r-abc", "a" * 25, "b" * 25, hostname, "unknown", "192.0.2.1", "pem",
                         b"k", "1", "2026-01-01T00:00:00Z", "2026-01-01T00:15:00Z",
                         RequestState.PENDING)


@pytest.mark.parametrize("name", [
    "<!channel>", "<!here|here>", "@channel", "*urgent* _now_ ~x~", "`rm -rf /`",
    "<https://evil.example|escrow approve r-other>", "a&lt;b", "[/]", "x\x1b[2K\rmanager-2"])
def test_webhook_text_neutralises_chat_markup(name: str) -> None:
    body = notification_body.body(events.requested(_asking(name), 1, datetime.now(UTC)))
    text = body["text"]
    assert isinstance(text, str)
    span = text.split("Swarm manager ", 1)[1].split(" is locked", 1)[0]
    assert span.startswith("`")
    assert span.endswith("`")
    assert span.count("`") == 2
    inner = span[1:-1]
    assert "<" not in inner
    assert ">" not in inner
    assert "@channel" not in text
    assert "@here" not in text
    assert "&" not in inner.replace("&amp;", "").replace("&lt;", "").replace("&gt;", "")
    assert not _raw_unsafe(text)
    assert text.endswith("escrow approve r-abc")
    assert body["hostname"] == plaintext.plain(name)
    assert sorted(body) == ["cluster_id", "event", "expires_at", "hostname", "id", "needed",
                            "node_id", "request_id", "text", "time"]


def test_webhook_text_keeps_a_dns_hostname_readable() -> None:
    body = notification_body.body(events.requested(_asking("manager-1.example"), 2,
                                                   datetime.now(UTC)))
    assert body["text"] == ("Swarm manager `manager-1.example` is locked and waits for 2 "
                            "custodian approval(s): escrow approve r-abc")

