"""Which of the escrow's URLs a client asks, and which failures move a call on to the next
(escrow.core.failover): pure, shared by the agent's client and the custodian's."""

from __future__ import annotations

import re

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from escrow.api_client import CustodianClient
from escrow.core import failover
from escrow.core.errors import ConfigError, EscrowError
from escrow.core.failover import Failure, Replicas

URLS = ("https://e1:8443", "https://e2:8443", "https://e3:8443")


def test_calls_start_at_the_first_url_until_another_answers_then_stay_there() -> None:
    replicas = Replicas(URLS)
    assert (replicas.current, replicas.order()) == (URLS[0], (0, 1, 2))
    replicas.answered(1)
    assert (replicas.current, replicas.order()) == (URLS[1], (1, 2, 0))
    replicas.answered(1)
    assert replicas.order() == (1, 2, 0)  # not back to the first on every call
    replicas.answered(0)
    assert replicas.order() == (0, 1, 2)


def test_one_url_is_tried_once() -> None:
    assert Replicas(URLS[:1]).order() == (0,)
    with pytest.raises(ValueError, match="no escrow URL"):
        Replicas([])


@pytest.mark.parametrize(("failure", "repeatable", "moves"), [
    (Failure.NOT_SENT, False, True),
    (Failure.NOT_SENT, True, True),
    (Failure.UNAVAILABLE, False, True),
    (Failure.UNAVAILABLE, True, True),
    (Failure.NO_ANSWER, True, True),
    (Failure.NO_ANSWER, False, False),  # the POST may have been processed
])
def test_only_a_request_that_may_have_been_processed_stays_where_it_got_no_answer(
        failure: Failure, repeatable: bool, moves: bool) -> None:
    assert failover.moves_on(failure, repeatable=repeatable) is moves


def test_urls_come_from_a_comma_separated_string_or_a_list() -> None:
    assert failover.parse_urls("https://e1:8443") == URLS[:1]
    assert failover.parse_urls(" https://e1:8443 ,https://e2:8443, https://e3:8443") == URLS
    assert failover.parse_urls(list(URLS)) == URLS
    assert failover.parse_urls("https://[::1]:8443/escrow") == ("https://[::1]:8443/escrow",)


@pytest.mark.parametrize(("value", "wrong"), [
    ("", "names no URL"),
    ("https://e1:8443,,https://e2:8443", "has an empty entry (a comma too many?)"),
    ("http://e1:8443", "'http://e1:8443' is not an https:// URL"),
    ("https://", "'https://' is not an https:// URL"),
    ("https://e1:http", "'https://e1:http' has no valid port"),
    ("https://[::1", "'https://[::1' is not an https:// URL"),
    ("https://e1:8443,https://e1:8443", "names 'https://e1:8443' twice"),
    ("https://root:hunter2@e1:8443", "the URL of e1:8443 carries a user name or password"),
])
def test_a_wrong_url_list_says_what_is_wrong_and_never_shows_a_password(
        value: str, wrong: str) -> None:
    with pytest.raises(ValueError, match=re.escape(wrong)) as caught:
        failover.parse_urls(value)
    assert str(caught.value) == wrong
    assert "hunter2" not in wrong


def test_a_call_no_url_took_names_each_url_tried_and_why_then_those_it_had_no_time_for(
        ) -> None:
    message, hint = failover.unavailable(
        [("the escrow at https://e1:8443 is unreachable: refused", "check the network"),
         ("the escrow at https://e2:8443 cannot serve now (503): db away", "it retries"),
         ("the escrow at https://e3:8443 is unreachable: reset", "check the network")],
        ["https://e4:8443", "https://e5:8443"], 90)
    assert message == ("no URL of the escrow could take the request: the escrow at "
                       "https://e1:8443 is unreachable: refused; the escrow at https://e2:8443 "
                       "cannot serve now (503): db away; the escrow at https://e3:8443 is "
                       "unreachable: reset; not tried within the 90 s the request may take: "
                       "https://e4:8443, https://e5:8443")
    assert hint == "check the network; it retries"


def test_the_custodian_cli_refuses_a_wrong_url_list_before_anything_else() -> None:
    with pytest.raises(ConfigError) as caught:
        CustodianClient("https://e1:8443,http://e2:8443", "/nonexistent/ca.pem",
                        ec.generate_private_key(ec.SECP256R1()))
    assert caught.value.message == "escrow URL 'http://e2:8443' is not an https:// URL"
    assert "separated by commas" in caught.value.hint


def test_an_attempt_that_moves_on_carries_its_error_and_one_that_stays_raises_it() -> None:
    error = EscrowError("the escrow at https://e1:8443 did not answer within 30 s", "check")
    moved = failover.failed(error, Failure.NOT_SENT, repeatable=False)
    assert isinstance(moved, failover.MovesOn)
    assert moved.error is error
    assert failover.failed(error, Failure.NO_ANSWER, repeatable=False) is error
