"""Nonces, per-source buckets, refusal summaries and signature spellings:
the pure pieces that keep unauthenticated traffic from costing the escrow disk, memory or time."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from escrow.core import protocol
from escrow.nonces import NONCE_TTL, REPLICA_SKEW, NonceMinter
from escrow.ratelimit import SourceLimiter, source_key
from escrow.server.refusal_log import RefusalLog

NOW = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
SECRET = b"s" * 32


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def test_a_nonce_flood_stores_nothing_and_costs_the_same_for_every_nonce() -> None:
    minter = NonceMinter(SECRET, Clock())
    issued = [minter.issue()[0] for _ in range(20_000)]
    assert len(set(issued)) == len(issued)
    assert all(minter.expiry(n) == NOW + NONCE_TTL for n in issued[:100])
    assert not vars(minter).keys() - {"_secret", "_clock"}  # no table grew


def test_a_forged_or_altered_nonce_is_not_fresh() -> None:
    minter = NonceMinter(SECRET, Clock())
    nonce, _ = minter.issue()
    for altered in (bytes([nonce[0] ^ 1]) + nonce[1:], nonce[:-1] + bytes([nonce[-1] ^ 1]),
                    nonce[:-8] + b"\0" * 8, b"\0" * 32, nonce[:31]):
        assert minter.expiry(altered) is None
    assert NonceMinter(b"t" * 32, Clock()).expiry(nonce) is None  # another escrow's secret


def test_a_nonce_is_stale_after_its_lifetime_and_one_from_the_far_future_is_refused() -> None:
    clock = Clock()
    minter = NonceMinter(SECRET, clock)
    nonce, _ = minter.issue()
    clock.now = NOW + NONCE_TTL + timedelta(milliseconds=1)
    assert minter.expiry(nonce) is None
    clock.now = NOW - timedelta(hours=1)  # the escrow's clock stepped back an hour
    assert minter.expiry(nonce) is None


def test_a_nonce_from_a_replica_a_few_seconds_ahead_is_fresh_but_not_one_from_further() -> None:
    ahead = Clock()
    ahead.now = NOW + REPLICA_SKEW - timedelta(seconds=1)
    close_enough, _ = NonceMinter(SECRET, ahead).issue()
    ahead.now = NOW + REPLICA_SKEW + timedelta(seconds=1)
    too_far, _ = NonceMinter(SECRET, ahead).issue()
    here = NonceMinter(SECRET, Clock())
    assert here.expiry(close_enough) is not None
    assert here.expiry(too_far) is None


def test_one_source_runs_out_of_tokens_and_is_told_when_to_come_back() -> None:
    limiter = SourceLimiter(rate=2.0, burst=5)
    assert [limiter.take("192.0.2.1", 0.0) for _ in range(5)] == [0.0] * 5
    assert limiter.take("192.0.2.1", 0.0) == pytest.approx(0.5)
    assert limiter.take("192.0.2.2", 0.0) == 0.0  # another source is not affected
    assert limiter.take("192.0.2.1", 0.5) == 0.0  # a token came back


def test_an_ipv6_host_cannot_rotate_through_its_addresses_to_evade_the_limit() -> None:
    limiter = SourceLimiter(rate=1.0, burst=3)
    waits = [limiter.take(f"2001:db8:1:2::{i:x}", 0.0) for i in range(1, 6)]
    assert waits[:3] == [0.0] * 3
    assert all(w > 0 for w in waits[3:])
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"


def test_a_flood_from_many_sources_keeps_the_limiter_bounded() -> None:
    limiter = SourceLimiter(rate=1.0, burst=1, max_sources=100)
    for i in range(10_000):
        limiter.take(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", float(i))
    assert len(limiter) == 100


def test_unauthenticated_refusals_make_one_log_line_per_source_per_interval() -> None:
    log = RefusalLog(interval=60)
    lines = [s.line() for t in range(7_571) for s in log.note("192.0.2.9", "unseal",
                                                              "bad_signature", t / 1000)]
    assert len(lines) == 1  # the first, at once; the rest are summed up for the next one
    [summary] = log.note("192.0.2.9", "unseal", "unknown_node", 61.0)
    assert summary.total == 7_571
    assert summary.reasons[0] == ("unseal.bad_signature", 7_570)
    assert "from 192.0.2.9" in summary.line()


def test_a_burst_that_stops_is_reported_all_the_same() -> None:
    log = RefusalLog(interval=60)
    for t in range(1_000):
        log.note("192.0.2.9", "unseal", "unknown_node", t / 1000)
    assert log.flush(30.0) == []  # not an interval old yet
    [summary] = log.flush(61.0)
    assert summary.total == 999  # the first was reported when it came
    log.note("192.0.2.9", "nonce", "x", 62.0)
    log.note("192.0.2.9", "nonce", "x", 63.0)
    [last] = log.flush(64.0, everything=True)  # at shutdown
    assert last.total == 1


def test_a_flood_from_many_sources_keeps_the_refusal_log_bounded() -> None:
    log = RefusalLog(max_sources=50)
    for i in range(1_000):
        log.note(f"198.51.100.{i % 250}", "nonce", "x", float(i))
    assert len(log._tallies) <= 50


KEY = ec.generate_private_key(ec.SECP256R1())
ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def test_the_high_s_twin_and_a_respelled_signature_normalise_to_the_same_bytes() -> None:
    payload = b"approve r-123"
    signature = KEY.sign(payload, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(signature)
    twin = encode_dss_signature(r, ORDER - s)
    spellings = [base64.b64encode(signature).decode(), base64.b64encode(twin).decode()]
    normal = {protocol.normalize_signature(text) for text in spellings}
    assert len(normal) == 1
    assert all(protocol.verify(KEY.public_key(), text, payload) for text in spellings)
    (low,) = normal
    assert low is not None
    assert decode_dss_signature(low)[1] <= ORDER // 2


def test_malformed_signatures_do_not_normalise() -> None:
    for text in ("", "not base64!", base64.b64encode(b"\x30\x00").decode(),
                 base64.b64encode(encode_dss_signature(0, 1)).decode(),
                 base64.b64encode(encode_dss_signature(1, ORDER)).decode()):
        assert protocol.normalize_signature(text) is None
