"""The unseal-cost benchmark runs in CI at a small scale (its figures are bench/'s business,
not asserted here): every step, each request answered as it should be."""

from __future__ import annotations

from bench import unseal_cost
from bench.machine import this_machine


def test_the_unseal_cost_benchmark_measures_each_step_with_every_unseal_given_its_shares(
        ) -> None:
    steps = unseal_cost.measure(20)  # raises if an unseal got other than its two shares
    assert [(s.name, s.requests) for s in steps] == [
        ("nonce, kept-alive connection", 20), ("nonce, new TLS connection", 20),
        ("unseal (nonce + request), kept-alive connection", 20),
        ("unseal (nonce + request), new TLS connection", 20)]
    assert "A new TLS connection (accept, handshake, close) costs the escrow" in (
        unseal_cost.document(steps, this_machine(), "test"))
