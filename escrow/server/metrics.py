"""What the escrow counts for Prometheus (``GET /metrics``), in a registry of its own so that a
test or a second server in one process never meets another's series."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from escrow.core.version import VERSION
from escrow.service.readings import Tally

# Long polls of /v1/unseal/{request_id} wait up to 60 s (escrow.server.waiters).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class Sample:
    """What is looked at when scraped."""

    free_bytes: int
    hsm_up: bool
    tally: Tally | None  # None: the store did not answer


class _FromStore(Collector):
    """The series read from the store at each scrape, absent while it does not answer
    (escrow_store_up says so) rather than stale."""

    def __init__(self) -> None:
        self.tally: Tally | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.tally is None:
            return
        yield GaugeMetricFamily("escrow_pending_approvals",
                                "Live unseal requests still waiting for custodian approvals",
                                value=self.tally.awaiting_approval)
        # Made anew at each scrape, so a state no node is in any more does not linger.
        nodes = GaugeMetricFamily("escrow_nodes",
                                  "Enrolled nodes by cluster and state: what their heartbeats "
                                  "say (unlocked, locked, unreachable), or revoked / quarantined",
                                  labels=("cluster", "state"))
        for (cluster, state), count in sorted(self.tally.nodes.items()):
            nodes.add_metric((cluster, state), count)
        yield nodes
        # Labelled `cluster` as escrow_nodes is, so the two join in a query.
        drills = GaugeMetricFamily("escrow_share_drill_age_seconds",
                                   "Seconds since the least recently drilled custodian share "
                                   "of each cluster's newest key version was last proved to "
                                   "match its paper copy (`escrow share verify`); a share "
                                   "never drilled counts from the version's creation",
                                   labels=("cluster",))
        for cluster, age in sorted(self.tally.drill_ages.items()):
            drills.add_metric((cluster,), age)
        yield drills


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The process's CPU, memory, open files and start time, and the Python that runs it.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("escrow_build", "The escrow's release (its installed package's version)",
             registry=self.registry).info({"version": VERSION})
        self.latency = Histogram("escrow_http_request_duration_seconds",
                                 "Time to answer API requests, by endpoint: the route's "
                                 "template, or unmatched", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.hsm_up = Gauge("escrow_hsm_up",
                            "1 when the token wrapped and unwrapped a test value at this "
                            "scrape, 0 while it cannot (what needs it answers 503)",
                            registry=self.registry)
        self.store_up = Gauge("escrow_store_up",
                              "1 when the store answered this scrape's reads, 0 while it does "
                              "not (the series read from it are left out)",
                              registry=self.registry)
        self._from_store = _FromStore()
        self.registry.register(self._from_store)
        self.requests = Counter("escrow_requests_total", "API requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=self.registry)
        self.released = Counter("escrow_shares_released_total",
                                "Shares released (each encrypted to a requester)",
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
        self.limited = Counter("escrow_source_limited_total",
                               "Requests refused because their source exceeded its rate",
                               ["endpoint"], registry=self.registry)
        # Receivers by their name in escrow.toml, never their URL (it may hold a token).
        self.webhook_deliveries = Counter(
            "escrow_webhook_deliveries_total",
            "Events sent to webhook receivers, by receiver, event and outcome (delivered, or "
            "given_up after its attempts)", ["receiver", "event", "outcome"],
            registry=self.registry)
        self.webhook_failures = Counter(
            "escrow_webhook_failed_attempts_total",
            "Webhook delivery attempts that did not deliver (an error status, a redirect, a "
            "timeout, no connection), whether retried or not", ["receiver", "event"],
            registry=self.registry)

    def latest(self, sample: Sample, accept: str = "") -> tuple[bytes, str]:
        """The exposition in the format the scraper's Accept header asks for (OpenMetrics, or
        else the text format), and its content type, with ``sample`` in it."""
        self.free.set(sample.free_bytes)
        self.hsm_up.set(sample.hsm_up)
        self.store_up.set(sample.tally is not None)
        self._from_store.tally = sample.tally
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
