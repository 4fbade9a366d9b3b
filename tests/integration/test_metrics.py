"""GET /metrics of a real `escrow serve`, as Prometheus scrapes it: up while the HSM or the
store is down (saying which), the latency of each endpoint under its route's template, the
build, OpenMetrics to a scraper that asks for it, and an exposition promtool finds clean."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from escrow.core.version import VERSION
from lab import postgres as lab_postgres
from lab.api import enrolled, waiting_manager
from lab.server import EscrowProcess, make_escrow

pytestmark = pytest.mark.slow

# What Prometheus 2.x sends when it scrapes.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,"
                     "application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
LATENCY = "escrow_http_request_duration_seconds"


def scrape(escrow: EscrowProcess, accept: str = "") -> tuple[int, str, str]:
    """GET /metrics: its status, content type and body. Long enough for a store that does
    not answer (the PostgreSQL pool waits 10 s for a connection)."""
    context = ssl.create_default_context(cafile=str(escrow.ca))
    request = urllib.request.Request(escrow.url + "/metrics",  # noqa: S310 - https://
                                     headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as answer:  # noqa: S310
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample ``name{labels}`` of a text exposition, or None when it is absent."""
    return next((sample.value for family in text_string_to_metric_families(text)
                 for sample in family.samples
                 if sample.name == name and sample.labels == labels), None)


def nodes_counted(text: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "escrow_nodes" for sample in family.samples)


def healthy_scrape(escrow: EscrowProcess) -> str:
    status, _, text = scrape(escrow)
    assert status == 200, text
    return text


def wait_for(escrow: EscrowProcess, series: str, wanted: float, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while value(healthy_scrape(escrow), series) != wanted:
        assert time.monotonic() < deadline, f"{series} never became {wanted}"
        time.sleep(0.5)


@contextmanager
def token_away(escrow: EscrowProcess) -> Iterator[None]:
    """The token's storage goes away under the escrow (as in tests/swarm/test_hsm_outage.py),
    and comes back afterwards, even when the test fails."""
    tokens = escrow.data_dir / "softhsm" / "tokens"
    away = tokens.with_name("tokens.away")
    tokens.rename(away)
    try:
        yield
    finally:
        away.rename(tokens)


def test_the_metrics_stay_up_and_say_the_hsm_is_down_while_its_token_is_away(
        escrow: EscrowProcess) -> None:
    enrolled(escrow)
    assert value(healthy_scrape(escrow), "escrow_hsm_up") == 1.0
    with token_away(escrow):
        text = healthy_scrape(escrow)
        assert escrow.health()[0] == 503  # the API's HSM work is refused meanwhile
        assert value(text, "escrow_hsm_up") == 0.0
        assert value(text, "escrow_store_up") == 1.0
        assert nodes_counted(text) == 1
        assert value(text, "escrow_pending_approvals") == 0.0
    wait_for(escrow, "escrow_hsm_up", 1.0, 15)  # the escrow tries the token every 2 s


def test_an_escrow_started_without_its_token_counts_nodes_and_waiting_requests_from_the_store(
        escrow: EscrowProcess) -> None:
    waiting_manager(escrow)  # two managers, one asking with one more approval needed
    escrow.stop()
    with token_away(escrow):
        escrow.start(healthy=False)
        text = healthy_scrape(escrow)
        assert escrow.health()[0] == 503
        assert value(text, "escrow_hsm_up") == 0.0
        assert value(text, "escrow_pending_approvals") == 1.0
        assert nodes_counted(text) == 2
        assert value(text, "escrow_build_info", version=VERSION) == 1.0


def test_the_latency_histogram_is_by_route_template_never_by_the_raw_path(
        escrow: EscrowProcess) -> None:
    context = ssl.create_default_context(cafile=str(escrow.ca))
    for path in ("/v1/unseal/r-made-up-by-the-caller", "/a/path/made-up-by-the-caller"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(escrow.url + path, context=context, timeout=10)  # noqa: S310
        assert refused.value.code == 404
    text = healthy_scrape(escrow)
    assert "made-up-by-the-caller" not in text
    counted = {sample.labels["endpoint"]: sample.value
               for family in text_string_to_metric_families(text) if family.name == LATENCY
               for sample in family.samples if sample.name == f"{LATENCY}_count"}
    # /healthz: the start's polls; this scrape is counted once it is answered.
    assert set(counted) == {"/healthz", "/metrics", "/v1/unseal/{request_id}", "unmatched"}
    assert counted["/v1/unseal/{request_id}"] == counted["unmatched"] == 1
    assert counted["/metrics"] == 0
    assert value(text, f"{LATENCY}_bucket", endpoint="unmatched", le="60.0") == 1
    assert value(healthy_scrape(escrow), f"{LATENCY}_count", endpoint="/metrics") == 1


def test_build_info_and_the_process_s_own_series_are_exposed(escrow: EscrowProcess) -> None:
    text = healthy_scrape(escrow)
    assert value(text, "escrow_build_info", version=VERSION) == 1.0
    for series in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                   "process_open_fds", "process_start_time_seconds"):
        assert (value(text, series) or 0) > 0, series
    assert "# TYPE python_info gauge" in text


def test_a_scraper_that_asks_for_openmetrics_gets_it_and_one_that_does_not_the_text_format(
        escrow: EscrowProcess) -> None:
    enrolled(escrow)
    status, content_type, text = scrape(escrow, PROMETHEUS_ACCEPT)
    assert status == 200
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    # The strict OpenMetrics parser: it refuses anything out of the format (and no # EOF).
    families = {family.name: family
                for family in openmetrics_families(text)}  # type: ignore[no-untyped-call]
    assert families["escrow_build"].type == "info"
    assert families["escrow_requests"].type == "counter"
    assert families["escrow_hsm_up"].samples[0].value == 1.0
    for accept in ("", "text/plain", "application/json"):
        status, content_type, text = scrape(escrow, accept)
        assert (status, content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
        assert "# EOF" not in text
        assert value(text, "escrow_store_up") == 1.0


def promtool() -> Callable[[str], subprocess.CompletedProcess[str]]:
    found = shutil.which("promtool")
    assert found, "promtool is missing: ./scripts/setup installs it (Debian's prometheus)"
    return lambda text: subprocess.run([found, "check", "metrics"], input=text,
                                       capture_output=True, text=True, check=False, timeout=60)


def test_promtool_finds_the_exposition_well_formed_with_nothing_to_lint_hsm_up_or_down(
        escrow: EscrowProcess) -> None:
    # promtool (2.42) reads the text format only: OpenMetrics is checked by the strict parser
    # above.
    check = promtool()
    waiting_manager(escrow)  # series in every labelled family: nodes, requests, latency
    texts = [healthy_scrape(escrow)]
    with token_away(escrow):
        texts.append(healthy_scrape(escrow))
    for text in texts:
        checked = check(text)
        assert (checked.returncode, checked.stdout + checked.stderr) == (0, ""), text


@contextmanager
def connections_refused(server: lab_postgres.Server, database: str) -> Iterator[None]:
    """The database takes no connection and its open ones are cut, until the end."""
    with server.connect() as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
            sql.Identifier(database)))
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE datname = %s", (database,))
    try:
        yield
    finally:
        with server.connect() as admin:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                sql.Identifier(database)))


def test_the_metrics_stay_up_and_say_the_store_is_down_while_its_database_refuses_connections(
        postgres: lab_postgres.Server, tmp_path: Path) -> None:
    check = promtool()
    with postgres.database() as database:
        escrow = make_escrow(tmp_path, "--store-url", postgres.url(database),
                             "--store-password-file", str(postgres.password_file))
        escrow.start()
        try:
            enrolled(escrow, slots="auto,auto")
            with connections_refused(postgres, database):
                text = healthy_scrape(escrow)
                assert value(text, "escrow_store_up") == 0.0
                assert value(text, "escrow_hsm_up") == 1.0
                assert value(text, "escrow_build_info", version=VERSION) == 1.0
                # Left out rather than stale:
                assert "# TYPE escrow_nodes " not in text
                assert "# TYPE escrow_pending_approvals " not in text
                checked = check(text)
                assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")
            wait_for(escrow, "escrow_store_up", 1.0, 30)
            assert nodes_counted(healthy_scrape(escrow)) == 1
        finally:
            escrow.stop()
