"""The replica benchmarks run in CI, at a small scale (their figures are bench/'s business, not
asserted here): the unseal storm on two replicas, and the replica-loss pairs."""

from __future__ import annotations

from bench import replica_loss, unseal_storm
from bench.machine import this_machine


def test_the_unseal_storm_runs_on_two_replicas_with_no_error() -> None:
    storm = unseal_storm.measure(20, "postgresql-2")
    assert (len(storm.latencies), storm.errors) == (20, {})
    assert "| postgresql-2 | 20 | 20 | 0 |" in unseal_storm.table([storm])


def test_the_replica_loss_benchmark_measures_a_pair_of_storms() -> None:
    pairs = replica_loss.measure(agents=60, runs=1)
    (pair,) = pairs
    # Every agent unlocked in both storms (or measure would have raised), none was refused,
    # and each one cut mid-request has its loss. At 60 agents few or none are mid-request
    # when the kill comes: the 200-agent drill (test_replicas.py) is the one that counts them.
    assert pair.refused == 0
    assert len(pair.lost) == pair.cut
    assert all(lost < replica_loss.GOAL_SECONDS * 5 for lost in pair.lost)
    assert "Worst time lost over all runs" in replica_loss.document(
        pairs, 60, this_machine(), "test")
