"""What the escrow counts for Prometheus (``GET /metrics``), in a registry of its own so that a
test or a second server in one process never meets another's series."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("escrow_requests_total", "API requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=self.registry)
        self.released = Counter("escrow_shares_released_total",
                                "Shares released (each encrypted to a requester)",
                                registry=self.registry)
        self.pending = Gauge("escrow_pending_approvals",
                             "Live unseal requests still waiting for custodian approvals",
                             registry=self.registry)
        self.free = Gauge("escrow_data_dir_free_bytes",
                          "Free space on the data directory's file system",
                          registry=self.registry)
        self.hsm = Histogram("escrow_hsm_seconds", "Latency of token operations",
                             buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
                             registry=self.registry)
        self.dropped = Counter("escrow_connections_dropped_total",
                               "Connections refused or cut by the limits on slow and greedy "
                               "clients (server/connections.py), by reason",
                               ["reason"], registry=self.registry)
        self.unidentified = Counter(
            "escrow_unauthenticated_refusals_total",
            "Refusals of callers who had not proved who they are (counted, never audited)",
            ["action", "reason"], registry=self.registry)
        self.nodes = Gauge("escrow_nodes",
                           "Enrolled nodes by cluster and state: what their heartbeats say "
                           "(unlocked, locked, unreachable), or revoked / quarantined",
                           ["cluster", "state"], registry=self.registry)
        self.limited = Counter("escrow_source_limited_total",
                               "Requests refused because their source exceeded its rate",
                               ["endpoint"], registry=self.registry)

    def latest(self, pending: int, free_bytes: int,
               nodes: Mapping[tuple[str, str], int]) -> bytes:
        """The text exposition, with the gauges that are sampled when scraped."""
        self.pending.set(pending)
        self.free.set(free_bytes)
        self.nodes.clear()  # a state no node is in any more must not linger
        for (cluster, state), count in nodes.items():
            self.nodes.labels(cluster, state).set(count)
        return generate_latest(self.registry)
