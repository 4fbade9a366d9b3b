"""The unseal-cost, status-load and TPM-signature benchmarks run in CI at a small scale (their
figures are bench/'s business, not asserted here): every step, each request answered as it
should be."""

from __future__ import annotations

from bench import status_load, tpm_signature, unseal_cost
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


def test_the_status_load_benchmark_serves_the_page_alone_and_beside_a_storm() -> None:
    runs = status_load.measure(agents=20, viewers=1, seconds=1.0)
    assert [r.name for r in runs] == ["1 viewers, no storm", "storm of 20, no viewer",
                                      "storm of 20 with 1 viewers"]
    assert runs[0].pages > 0
    assert [(len(r.unseal_latencies), r.unseal_errors) for r in runs[1:]] == [(20, 0), (20, 0)]
    assert "| storm of 20 with 1 viewers |" in status_load.table(runs)


def test_the_tpm_signature_benchmark_signs_with_each_place_the_agent_key_can_live() -> None:
    storages = tpm_signature.measure(20)
    assert [(s.name, len(s.seconds)) for s in storages] == [
        ("file key (cryptography)", 20), ("SoftHSM token", 20),
        ("TPM 2.0 (swtpm, tpm2-abrmd, tpm2-pkcs11)", 20)]
    assert "A TPM signature costs" in tpm_signature.document(storages, this_machine(), "test")
