"""What a client reports of an answer that is not the one it asked for, or of no answer
(escrow.core.answers): pure, and one mapping for the agent's client and the CLI's, each making
errors of its own family and naming its own CA setting."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime

import pytest

from agent import client as agent_client
from agent.config import CA_SETTING as AGENT_CA_SETTING
from agent.errors import EscrowRejected, EscrowUnavailable
from escrow import api_client
from escrow.core import answers, protocol
from escrow.core.answers import ErrorBody, Kind
from escrow.core.errors import EscrowError, IdentityError, RequestError

URL = "https://escrow.example/escrow"
NOW = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)
UNAVAILABLE = ('{"error": "unhealthy", "message": "the database is away", '
               '"hint": "retry in a moment"}')
LIMITED = ('{"error": "source_rate_limited", "message": "too many requests from 10.0.0.7", '
           '"hint": "slow down; agents back off by themselves"}')
REFUSED = ('{"error": "bad_signature", "message": "the request signature does not match", '
           '"hint": "use the key registered for you"}')


@pytest.mark.parametrize(("status", "kind"), [
    (200, Kind.ANSWER), (201, Kind.ANSWER), (302, Kind.ANSWER),
    (400, Kind.REFUSED), (401, Kind.REFUSED), (403, Kind.REFUSED), (409, Kind.REFUSED),
    (429, Kind.RATE_LIMITED),
    (500, Kind.UNAVAILABLE), (502, Kind.UNAVAILABLE), (503, Kind.UNAVAILABLE),
    (507, Kind.UNAVAILABLE),
])
def test_a_5xx_is_the_escrow_unavailable_a_429_a_rate_limit_another_4xx_a_refusal(
        status: int, kind: Kind) -> None:
    assert answers.kind(status) is kind


def test_the_escrow_s_error_body_gives_its_fields_and_a_proxy_s_page_its_start() -> None:
    assert answers.error_body(UNAVAILABLE) == ErrorBody(
        "unhealthy", "the database is away", "retry in a moment", escrow=True)
    assert answers.error_body('{"error": 7, "message": "m", "hint": null}') == ErrorBody(
        "", "m", "", escrow=True)
    page = "<html><body>502 Bad Gateway \x1b[2K</body></html>" + "x" * 300
    body = answers.error_body(page)
    assert (body.reason, body.hint, body.escrow) == ("unknown", "", False)
    assert body.message.startswith("<html><body>502 Bad Gateway \\x1b[2K</body>")
    assert len(body.message) < 220
    for other in ('["message"]', '{"message": 1}', "[" * 100_000, ""):
        assert answers.error_body(other).reason == "unknown"


def test_a_5xx_names_the_escrow_the_status_and_what_it_said() -> None:
    assert answers.cannot_serve(URL, 503, answers.error_body(UNAVAILABLE)) == (
        f"the escrow at {URL} cannot serve now (503): unhealthy: the database is away")
    assert answers.cannot_serve("", 502, answers.error_body("Bad Gateway")) == (
        "the escrow cannot serve now (502): Bad Gateway")


@pytest.mark.parametrize(("value", "seconds"), [
    ("30", 30.0), (" 7 ", 7.0), ("0", 0.0),
    ("Sun, 01 Nov 2026 12:02:00 GMT", 120.0),
    ("Sun, 01 Nov 2026 11:00:00 GMT", 0.0),  # already past
    ("Sun, 01 Nov 2026 12:00:05 -0000", 5.0),
    (None, None), ("", None), ("soon", None), ("1.5", None), ("-3", None), ("٣", None),
    ("9" * 5000, None),
])
def test_retry_after_is_read_as_seconds_or_an_http_date_and_nothing_else(
        value: str | None, seconds: float | None) -> None:
    assert answers.retry_after_seconds(value, NOW) == seconds


def test_a_429_says_it_was_rate_limited_and_how_long_retry_after_says_to_wait() -> None:
    body = answers.error_body(LIMITED)
    message, hint = answers.rate_limited(URL, 429, body, 2.2)
    assert message == (f"the escrow at {URL} rate-limited this request (429 "
                       "source_rate_limited): too many requests from 10.0.0.7")
    assert hint == "wait 3 s (its Retry-After), then retry"
    assert answers.rate_limited(URL, 429, body, None)[1] == "wait a minute, then retry"


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
                                            f"verify failed: {message}")
    error.verify_code, error.verify_message = code, message
    return error


def test_an_untrusted_certificate_is_named_with_the_client_s_own_ca_setting() -> None:
    untrusted = _verify_error(20, "unable to get local issuer certificate")
    for client, setting in (("this agent", AGENT_CA_SETTING),
                            ("this command", api_client.CA_SETTING)):
        message, hint = answers.no_answer(URL, untrusted, 30, client=client,
                                          ca_setting=setting, hint="unused", now=NOW)
        assert message == (f"the escrow at {URL} presented a certificate {client} does not "
                           "trust: unable to get local issuer certificate")
        assert hint == (f"check {setting}: the escrow's tls/ca.pem, or the CA of its "
                        "server.tls_cert")
    assert api_client.CA_SETTING == "--ca / ESCROW_CA"


@pytest.mark.parametrize(("code", "said"), [(9, "is not valid yet"), (10, "has expired")])
def test_a_certificate_out_of_its_dates_blames_a_clock(code: int, said: str) -> None:
    message, hint = answers.no_answer(URL, _verify_error(code, said), 30, client="this agent",
                                      ca_setting="x", hint="unused", now=NOW)
    assert message == (f"the TLS certificate of the escrow at {URL} {said} by this host's "
                       "clock (2026-11-01 12:00:00 UTC): this clock or the escrow's is wrong")
    assert "timedatectl" in hint


def test_no_answer_in_time_says_how_long_and_a_network_failure_says_what_failed() -> None:
    def said(exc: BaseException) -> tuple[str, str]:
        return answers.no_answer(URL, exc, 0.25, client="this command", ca_setting="x",
                                 hint="check --url", now=NOW)

    assert said(TimeoutError()) == (f"the escrow at {URL} did not answer within 0.25 s",
                                    "check --url")
    assert said(ConnectionRefusedError(111, "Connect call failed\x1b[2K")) == (
        f"the escrow at {URL} is unreachable: ConnectionRefusedError: [Errno 111] Connect "
        "call failed\\x1b[2K", "check --url")
    assert said(TimeoutError(110, "Connection timed out"))[0].startswith(
        f"the escrow at {URL} is unreachable: TimeoutError: ")  # the kernel's, not ours


def test_the_cli_reports_a_5xx_as_the_escrow_unavailable_as_the_agent_does() -> None:
    with pytest.raises(EscrowError) as cli:
        api_client.parse_answer(503, UNAVAILABLE, protocol.DecisionResponse, URL)
    with pytest.raises(EscrowUnavailable) as agent:
        agent_client.parse_answer(503, UNAVAILABLE, protocol.RequestStatus, URL)
    assert not isinstance(cli.value, IdentityError)
    assert cli.value.message == agent.value.message == (
        f"the escrow at {URL} cannot serve now (503): unhealthy: the database is away")
    assert cli.value.hint == "retry in a moment"
    with pytest.raises(EscrowError) as internal:
        api_client.parse_answer(500, '{"error": "internal", "message": "internal error"}',
                                protocol.DecisionResponse, URL)
    assert internal.value.hint == api_client.RETRY_HINT


def test_the_cli_reports_a_429_as_a_rate_limit_with_its_wait_and_the_agent_as_a_429() -> None:
    with pytest.raises(RequestError) as cli:
        api_client.parse_answer(429, LIMITED, protocol.DecisionResponse, URL, "12")
    assert not isinstance(cli.value, IdentityError)
    assert (cli.value.reason, cli.value.status, cli.value.retry_after) == (
        "source_rate_limited", 429, 12.0)
    assert cli.value.message.startswith(f"the escrow at {URL} rate-limited this request")
    assert cli.value.hint == "wait 12 s (its Retry-After), then retry"
    with pytest.raises(EscrowRejected) as agent:  # agent/decision.py backs off on a 429
        agent_client.parse_answer(429, LIMITED, protocol.RequestStatus, URL)
    assert (agent.value.status, agent.value.reason) == (429, "source_rate_limited")


def test_any_other_4xx_is_the_escrow_s_refusal_in_both_clients() -> None:
    with pytest.raises(IdentityError) as cli:
        api_client.parse_answer(401, REFUSED, protocol.DecisionResponse, URL)
    assert (cli.value.reason, cli.value.status, cli.value.message, cli.value.hint) == (
        "bad_signature", 401, "the escrow refused (401): the request signature does not match",
        "use the key registered for you")
    with pytest.raises(EscrowRejected) as agent:
        agent_client.parse_answer(401, REFUSED, protocol.RequestStatus, URL)
    assert (agent.value.status, agent.value.reason, agent.value.hint) == (
        401, "bad_signature", "use the key registered for you")
