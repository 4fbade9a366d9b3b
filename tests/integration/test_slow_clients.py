"""Slow and greedy clients cannot hold a real `escrow serve` (escrow/server/connections.py,
the body deadline in escrow/server/app.py, the TLS suites in escrow/core/tls.py).

Each test is named after the attack it stops and makes that attack over loopback, with the
deadlines shortened through the environment so that it takes seconds. Attackers come from
127.0.0.2 and 127.0.0.3 (loopback answers the whole 127/8), the legitimate client from
127.0.0.1, so that per-source caps tell them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from bench.slow_clients import SlowClients, soft_open_files
from escrow.core.tls import client_context
from lab import api
from lab.server import EscrowProcess, make_escrow

T = TypeVar("T")
GOOD, SLOW, SLOWER = "127.0.0.1", "127.0.0.2", "127.0.0.3"
REQUEST_START = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: "


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., EscrowProcess]]:
    """Start `escrow serve` with these environment overrides; stopped at the end."""
    started: list[EscrowProcess] = []

    def start(**env: str) -> EscrowProcess:
        escrow = make_escrow(tmp_path / f"escrow-{len(started)}", **env)
        started.append(escrow)
        escrow.start()
        return escrow

    yield start
    for escrow in started:
        escrow.stop()


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Every socket a test opens goes here, and is closed at the end whatever happened."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        with contextlib.suppress(OSError):
            sock.close()


def tcp(escrow: EscrowProcess, opened: list[socket.socket], source: str = GOOD) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", escrow.port), timeout=5,
                                    source_address=(source, 0))
    opened.append(sock)
    return sock


def tls(escrow: EscrowProcess, opened: list[socket.socket], source: str = GOOD,
        context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    """A TLS connection, handshake done."""
    context = context or ssl.create_default_context(cafile=str(escrow.ca))
    wrapped = context.wrap_socket(tcp(escrow, opened, source), server_hostname="localhost")
    opened.append(wrapped)
    return wrapped


def seconds_until_closed(sock: socket.socket, limit: float, trickle: bytes = b"",
                         every: float = 0.2) -> float | None:
    """Seconds until the server closed ``sock`` (sending ``trickle`` every ``every`` seconds
    meanwhile, whatever it answers), or None if it was still open after ``limit``."""
    began = time.monotonic()
    sock.settimeout(every)
    while time.monotonic() - began < limit:
        try:
            if not sock.recv(4096):
                return time.monotonic() - began
        except TimeoutError:
            if trickle:
                try:
                    sock.sendall(trickle)
                except OSError:
                    return time.monotonic() - began
        except OSError:  # reset, or TLS without close_notify (ssl.SSLError is an OSError)
            return time.monotonic() - began
    return None


def exchange(sock: ssl.SSLSocket, request: bytes) -> tuple[int, bytes]:
    """Send a whole request on a kept-alive connection; its answer's status and body."""
    sock.settimeout(5)
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "closed before an answer"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(4096)
    return int(head.split()[1]), body


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


def dropped(escrow: EscrowProcess, reason: str) -> float:
    """escrow_connections_dropped_total for ``reason``, from /metrics."""
    context = ssl.create_default_context(cafile=str(escrow.ca))
    with urllib.request.urlopen(escrow.url + "/metrics", context=context,  # noqa: S310
                                timeout=10) as answer:
        text = answer.read().decode()
    found = re.search(rf'^escrow_connections_dropped_total{{reason="{reason}"}} (\S+)$', text,
                      re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def timed(call: Callable[[], T]) -> tuple[float, T | BaseException]:
    began = time.monotonic()
    try:
        result: T | BaseException = call()
    except Exception as exc:  # the test says what went wrong, with the time it took
        result = exc
    return time.monotonic() - began, result


# -- deadlines ------------------------------------------------------------------------------------


def test_slowloris_headers_are_cut_at_the_deadline(
        serve: Callable[..., EscrowProcess], sockets: list[socket.socket]) -> None:
    escrow = serve(ESCROW_SERVER_HEADER_TIMEOUT_SECONDS="1", ESCROW_SERVER_KEEPALIVE_SECONDS="60")
    # A header byte every 0.2 s: never idle, never done.
    trickling = tls(escrow, sockets, SLOW)
    trickling.sendall(REQUEST_START)
    cut = seconds_until_closed(trickling, 8, trickle=b"a")
    assert cut is not None, "a request whose headers never end was kept open"
    assert 0.5 < cut < 3
    # Connected, then not a byte.
    silent = tls(escrow, sockets, SLOW)
    cut = seconds_until_closed(silent, 8)
    assert cut is not None, "a connection that never sends a request was kept open"
    assert cut < 3
    assert dropped(escrow, "header_timeout") == 2
    assert escrow.health()[0] == 200


def test_slowloris_after_a_response_is_cut_at_the_deadline(
        serve: Callable[..., EscrowProcess], sockets: list[socket.socket]) -> None:
    escrow = serve(ESCROW_SERVER_HEADER_TIMEOUT_SECONDS="1", ESCROW_SERVER_KEEPALIVE_SECONDS="60")
    kept = tls(escrow, sockets, SLOW)
    assert exchange(kept, HEALTHZ)[0] == 200
    # Kept alive and quiet: the header deadline does not apply until the next request starts.
    assert seconds_until_closed(kept, 2.5) is None
    assert exchange(kept, HEALTHZ)[0] == 200
    kept.sendall(REQUEST_START)
    cut = seconds_until_closed(kept, 8, trickle=b"a")
    assert cut is not None, "the second request's headers were waited for without end"
    assert 0.5 < cut < 3
    assert dropped(escrow, "header_timeout") == 1


def test_idle_keepalive_connections_are_closed(
        serve: Callable[..., EscrowProcess], sockets: list[socket.socket]) -> None:
    escrow = serve(ESCROW_SERVER_KEEPALIVE_SECONDS="1", ESCROW_SERVER_HEADER_TIMEOUT_SECONDS="30")
    idle = tls(escrow, sockets, SLOW)
    assert exchange(idle, HEALTHZ)[0] == 200
    closed = seconds_until_closed(idle, 8)
    assert closed is not None, "an idle kept-alive connection was kept without end"
    assert closed < 3


def test_slow_body_is_cut_at_the_deadline(
        serve: Callable[..., EscrowProcess], sockets: list[socket.socket]) -> None:
    escrow = serve(ESCROW_SERVER_BODY_TIMEOUT_SECONDS="1",
                   ESCROW_SERVER_HEADER_TIMEOUT_SECONDS="30")
    slow = tls(escrow, sockets, SLOW)
    began = time.monotonic()
    slow.sendall(b"POST /v1/enroll HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                 b"\r\nContent-Length: 4000\r\n\r\n{\"cluster_id\": \"")
    answer = b""
    slow.settimeout(0.2)
    closed_after: float | None = None
    while time.monotonic() - began < 10:
        try:
            chunk = slow.recv(4096)
        except TimeoutError:
            with contextlib.suppress(OSError):
                slow.sendall(b"a")  # a byte of body every 0.2 s
            continue
        except OSError:
            chunk = b""
        if not chunk:
            closed_after = time.monotonic() - began
            break
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), f"no 408 for a body that never ends: {answer!r}"
    assert b'"error":"body_timeout"' in answer.replace(b" ", b"")
    assert closed_after is not None, "the connection stayed open after the 408"
    assert closed_after < 5  # 1 s of deadline, then at most 2 s of lingering
    assert dropped(escrow, "body_timeout") == 1


def client_hello() -> bytes:
    """The first flight of a real TLS client, to send half of."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing,
                                                   server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def test_tls_handshake_that_never_finishes_is_dropped(
        serve: Callable[..., EscrowProcess], sockets: list[socket.socket]) -> None:
    escrow = serve(ESCROW_SERVER_TLS_HANDSHAKE_TIMEOUT_SECONDS="1")
    silent = tcp(escrow, sockets, SLOW)
    half = tcp(escrow, sockets, SLOW)
    hello = client_hello()
    half.sendall(hello[:len(hello) // 2])
    for sock in (silent, half):
        closed = seconds_until_closed(sock, 8)
        assert closed is not None, "a TLS handshake that never ends was waited for"
        assert closed < 3
    assert dropped(escrow, "tls_handshake_timeout") == 2
    assert escrow.health()[0] == 200


# -- connection caps ------------------------------------------------------------------------------


def refused(connect: Callable[[], socket.socket]) -> bool:
    """Whether the server closed this connection at once (before or during the handshake)."""
    try:
        sock = connect()
    except OSError:  # reset or EOF during the TLS handshake
        return True
    return seconds_until_closed(sock, 1.0) is not None


def test_one_source_cannot_take_every_connection(
        serve: Callable[..., EscrowProcess], sockets: list[socket.socket]) -> None:
    escrow = serve(ESCROW_SERVER_MAX_CONNECTIONS_PER_SOURCE="20",
                   ESCROW_SERVER_MAX_CONNECTIONS="100",
                   ESCROW_SERVER_HEADER_TIMEOUT_SECONDS="60",
                   ESCROW_SERVER_TLS_HANDSHAKE_TIMEOUT_SECONDS="60")
    held = [tls(escrow, sockets, SLOW) for _ in range(20)]
    assert refused(lambda: tls(escrow, sockets, SLOW)), "a 21st connection from one source"
    # Connections still before their handshake count too: a source cannot park them instead.
    parked = [tcp(escrow, sockets, SLOWER) for _ in range(20)]
    assert refused(lambda: tcp(escrow, sockets, SLOWER)), "a 21st TCP connection, no TLS yet"
    assert seconds_until_closed(parked[0], 0.5) is None  # the first 20 stay
    # Everyone else is served.
    assert escrow.health()[0] == 200
    # A slot given back can be taken again.
    held.pop().close()
    time.sleep(0.3)
    assert not refused(lambda: tls(escrow, sockets, SLOW))
    assert dropped(escrow, "max_connections_per_source") == 2


def test_connections_beyond_the_total_cap_are_refused(
        serve: Callable[..., EscrowProcess], sockets: list[socket.socket]) -> None:
    escrow = serve(ESCROW_SERVER_MAX_CONNECTIONS="30",
                   ESCROW_SERVER_MAX_CONNECTIONS_PER_SOURCE="15",
                   ESCROW_SERVER_HEADER_TIMEOUT_SECONDS="60")
    held = [tls(escrow, sockets, source) for source in (SLOW, SLOWER) for _ in range(15)]
    assert refused(lambda: tls(escrow, sockets, GOOD)), "a 31st connection"
    for sock in held[:2]:  # room for /healthz, then /metrics while that one closes
        sock.close()
    time.sleep(0.3)
    assert escrow.health()[0] == 200
    assert dropped(escrow, "max_connections") == 1


def test_a_low_open_files_limit_lowers_the_caps_and_keeps_a_share_for_other_sources() -> None:
    # Imported here, so that the other tests also run against a checkout without the module.
    from escrow.server.connections import RESERVED_FILES, Limits  # noqa: PLC0415

    limits = Limits(8192, 6144, 10.0, 10.0)
    assert limits.within(65536) == limits  # systemd's LimitNOFILE=65536
    fitted = limits.within(1024)  # the usual soft limit
    assert fitted.max_connections == 1024 - RESERVED_FILES
    assert fitted.max_connections_per_source == fitted.max_connections * 3 // 4


# -- TLS suites -----------------------------------------------------------------------------------


def tls12(cipher: str) -> Callable[[EscrowProcess], ssl.SSLContext]:
    def context(escrow: EscrowProcess) -> ssl.SSLContext:
        made = ssl.create_default_context(cafile=str(escrow.ca))
        made.maximum_version = ssl.TLSVersion.TLSv1_2
        made.set_ciphers(cipher)
        return made
    return context


def test_cbc_suites_are_refused(serve: Callable[..., EscrowProcess],
                                sockets: list[socket.socket]) -> None:
    escrow = serve()
    certificate = x509.load_pem_x509_certificate((escrow.data_dir / "tls/server.pem").read_bytes())
    assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)  # so: ECDSA suites
    # The two CBC suites OpenSSL's default list offers with an ECDSA key.
    for cbc in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384"):
        with pytest.raises(ssl.SSLError):
            tls(escrow, sockets, context=tls12(cbc)(escrow))
    for aead in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                 "ECDHE-ECDSA-CHACHA20-POLY1305"):
        connection = tls(escrow, sockets, context=tls12(aead)(escrow))
        assert connection.cipher()[0] == aead  # type: ignore[index]
        assert exchange(connection, HEALTHZ)[0] == 200
    assert tls(escrow, sockets).version() == "TLSv1.3"
    assert dropped(escrow, "tls_handshake_failed") == 2


def test_agents_refuse_a_server_offering_only_cbc(tmp_path: Path) -> None:
    escrow = make_escrow(tmp_path / "escrow")  # for its quickstart certificate
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.maximum_version = ssl.TLSVersion.TLSv1_2
    server.set_ciphers("ECDHE-ECDSA-AES128-SHA256")
    server.load_cert_chain(escrow.data_dir / "tls/server.pem", escrow.data_dir / "tls/server.key")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        failures: list[BaseException] = []

        def answer() -> None:
            with contextlib.suppress(OSError), listener.accept()[0] as accepted:
                try:
                    server.wrap_socket(accepted, server_side=True).close()
                except ssl.SSLError as exc:
                    failures.append(exc)

        thread = threading.Thread(target=answer)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    pytest.raises(ssl.SSLError):
                client_context(escrow.ca).wrap_socket(raw, server_hostname="localhost")
        finally:
            thread.join(10)
    assert failures, "the server's side of the handshake did not fail"


# -- the attack as reported -----------------------------------------------------------------------

ATTACKERS = 1024  # as many as the files the escrow had in the report
DEADLINE = 5  # seconds, for TLS handshakes and request headers


def test_a_thousand_slow_clients_do_not_stop_healthz_or_an_unseal(tmp_path: Path) -> None:
    """Over a thousand TLS connections sending a header byte now and then are held open (one
    cut is opened again at once) while a legitimate client checks /healthz and unseals."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = ATTACKERS + 500  # this process holds the attackers' sockets
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files; the hard limit is {hard}")
    escrow = make_escrow(tmp_path / "escrow",
                         ESCROW_SERVER_HEADER_TIMEOUT_SECONDS=str(DEADLINE),
                         ESCROW_SERVER_TLS_HANDSHAKE_TIMEOUT_SECONDS=str(DEADLINE))
    for name in ("alice", "bob"):
        escrow.custodian(name)
    try:
        # As in the report: an escrow started by hand, with the usual 1,024 open files.
        with soft_open_files(1024):
            escrow.start()
        _, node, key = api.enrolled(escrow)
        with soft_open_files(max(soft, needed)), \
                SlowClients(escrow.port, escrow.ca, ATTACKERS, interval=1.0) as attack:
            attack.wait_open(ATTACKERS * 3 // 4, 60)
            # Past the deadline, so the legitimate client comes while they are being cut and
            # opened again, as an attacker keeps them.
            time.sleep(DEADLINE + 1)
            held = attack.open
            health_seconds, health = timed(escrow.health)
            unseal_seconds, unsealed = timed(lambda: api.run(
                asyncio.wait_for(api.unseal(escrow, node), 15)))
            held = min(held, attack.open)
        assert held >= 500, f"only {held} slow connections were open"
        assert not isinstance(health, BaseException), f"/healthz failed: {health!r}"
        assert health[0] == 200
        assert health_seconds < 2, f"/healthz took {health_seconds:.1f} s"
        assert unsealed == [(1, key)], f"the unseal failed: {unsealed!r}"
        assert unseal_seconds < 5, f"the unseal took {unseal_seconds:.1f} s"
        assert attack.cut > 0, "no slow connection was cut"
        assert attack.longest < DEADLINE + 2, f"a slow connection lived {attack.longest:.1f} s"
        assert dropped(escrow, "header_timeout") > 0
    finally:
        escrow.stop()
