"""The faulty HTTP transport against a raw recording HTTP server, over http and https."""

from __future__ import annotations

import contextlib
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import trustme
from google.api_core.exceptions import BadRequest

from faultnet.counters import FaultCounters
from faultnet.engine import ConnectionFaults
from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from faultnet.plan import (
    Corrupt,
    Direction,
    FaultPlan,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    SlowClose,
    Stall,
    Toxic,
)
from faultnet.transport import FaultyHTTPAdapter, FaultySocket, faulty_session

BODY = bytes(range(256)) * 40  # 10240 bytes the client uploads
RESPONSE_BODY = b"0123456789" * 500  # 5000 bytes the server answers with


@dataclass
class Exchange:
    """What the server saw on one connection."""

    received: bytearray = field(default_factory=bytearray)
    sent: bytes = b""
    ending: str = ""  # "answered", "eof" or "reset"


class RecordingServer(socketserver.ThreadingTCPServer):
    """Answers one request per connection, recording the exact bytes that arrived."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tls = tls
        self.exchanges: list[Exchange] = []
        self.lock = threading.Lock()
        self.done = threading.Semaphore(0)

    def url(self, path: str = "/upload") -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://localhost:{self.server_address[1]}{path}"

    def wait_for(self, count: int) -> list[Exchange]:
        for _ in range(count):
            assert self.done.acquire(timeout=30), "the server never finished a connection"
        with self.lock:
            return list(self.exchanges)


class _Handler(socketserver.BaseRequestHandler):
    server: RecordingServer

    def handle(self) -> None:
        exchange = Exchange()
        with self.server.lock:
            self.server.exchanges.append(exchange)
        try:
            conn = self.request
            if self.server.tls is not None:
                # without ragged-EOF suppression, so that an RST reads as a reset
                conn = self.server.tls.wrap_socket(
                    conn, server_side=True, suppress_ragged_eofs=False
                )
            with conn:
                exchange.ending = self._serve(conn, exchange)
        finally:
            self.server.done.release()

    def _serve(self, conn: socket.socket, exchange: Exchange) -> str:
        while not _complete(exchange.received):
            try:
                chunk = conn.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                return "reset"
            if not chunk:
                return "eof"
            exchange.received += chunk
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        exchange.sent = head % len(RESPONSE_BODY) + RESPONSE_BODY
        with contextlib.suppress(OSError):
            conn.sendall(exchange.sent)
        return "answered"


def _complete(request: bytes | bytearray) -> bool:
    head, sep, body = request.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    with RecordingServer() as srv:
        thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        yield srv
        srv.shutdown()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_server(ca: trustme.CA) -> Iterator[RecordingServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    with RecordingServer(tls=context) as srv:
        thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        yield srv
        srv.shutdown()


def upload(
    server: RecordingServer, plan: str, *, verify: str | bool = True, timeout: float = 30
) -> tuple[requests.Response | Exception, Exchange, FaultCounters]:
    counters = FaultCounters()
    with faulty_session(FaultPlan.parse(plan), counters) as session:
        result: requests.Response | Exception
        try:
            result = session.post(server.url(), data=BODY, verify=verify, timeout=timeout)
        except requests.RequestException as exc:
            result = exc
    (exchange,) = server.wait_for(1)
    return result, exchange, counters


def test_without_faults_every_byte_is_counted(server: RecordingServer) -> None:
    response, exchange, counters = upload(server, "")
    assert isinstance(response, requests.Response)
    assert response.content == RESPONSE_BODY
    assert exchange.received.endswith(BODY)
    assert counters.as_dict() == {
        "connections": 1,
        "bytes_up": len(exchange.received),
        "bytes_down": len(exchange.sent),
        "faults": {},
    }


def test_reset_mid_body_sends_exactly_n_bytes_then_rst(server: RecordingServer) -> None:
    failure, exchange, counters = upload(server, "reset_peer:up(after=5000)")
    # urllib3 swallows ECONNRESET while sending the body; the response read must fail.
    assert isinstance(failure, requests.ConnectionError)
    assert exchange.ending == "reset"
    assert len(exchange.received) == 5000
    assert counters.bytes_moved(Direction.UPSTREAM) == 5000
    assert counters.faults_applied("reset_peer") == 1


def test_reset_on_the_response_after_n_bytes(server: RecordingServer) -> None:
    failure, exchange, counters = upload(server, "reset_peer:down(after=100)")
    # 100 bytes is past the response head, so the body read is what breaks
    assert isinstance(failure, requests.exceptions.ChunkedEncodingError)
    assert "ConnectionResetError" in str(failure)
    assert exchange.ending == "answered"
    assert counters.bytes_moved(Direction.DOWNSTREAM) == 100


def test_limit_data_closes_after_exactly_n_bytes(server: RecordingServer) -> None:
    failure, exchange, counters = upload(server, "limit_data:up(bytes=3000)")
    assert isinstance(failure, requests.ConnectionError)
    assert exchange.ending == "eof"
    assert len(exchange.received) == 3000
    assert counters.faults_applied("limit_data") == 1


def test_limit_data_on_the_response_truncates_it(server: RecordingServer) -> None:
    failure, _, counters = upload(server, "limit_data:down(bytes=200)")
    assert isinstance(failure, requests.exceptions.ChunkedEncodingError)
    assert "IncompleteRead" in str(failure)
    assert counters.bytes_moved(Direction.DOWNSTREAM) == 200


def test_corrupt_flips_one_request_byte(server: RecordingServer) -> None:
    position = 9000
    response, exchange, _ = upload(server, f"corrupt:up(at={position},mask=1)")
    assert isinstance(response, requests.Response)
    header_length = len(exchange.received) - len(BODY)
    damaged = exchange.received[header_length:]
    assert [i for i in range(len(BODY)) if damaged[i] != BODY[i]] == [position - header_length]
    assert damaged[position - header_length] == BODY[position - header_length] ^ 0x01


def test_corrupt_flips_one_response_byte(server: RecordingServer) -> None:
    response, exchange, _ = upload(server, "corrupt:down(at=4000)")
    assert isinstance(response, requests.Response)
    offset = 4000 - (len(exchange.sent) - len(RESPONSE_BODY))
    assert len(response.content) == len(RESPONSE_BODY)
    differences = [
        i for i, (a, b) in enumerate(zip(response.content, RESPONSE_BODY, strict=True)) if a != b
    ]
    assert differences == [offset]


def test_slicer_and_slow_close_do_not_change_the_bytes(server: RecordingServer) -> None:
    response, exchange, counters = upload(
        server, "slicer:up(size=1000); slicer:down(size=7); slow_close:down(ms=1)"
    )
    assert isinstance(response, requests.Response)
    assert response.content == RESPONSE_BODY
    assert exchange.received.endswith(BODY)
    assert counters.faults_applied("slicer") >= 2


def test_stall_on_the_response_ends_in_a_read_timeout(server: RecordingServer) -> None:
    failure, exchange, counters = upload(server, "stall:down(after=10)", timeout=0.3)
    assert isinstance(failure, requests.exceptions.ReadTimeout)
    assert exchange.ending == "answered"
    assert counters.faults_applied("stall") == 1
    assert counters.bytes_moved(Direction.DOWNSTREAM) >= 10


def test_stall_on_the_request_times_out_the_send(server: RecordingServer) -> None:
    failure, _, counters = upload(server, "stall:up(after=2000,seconds=60)", timeout=0.3)
    assert isinstance(failure, requests.ConnectionError)
    assert counters.bytes_moved(Direction.UPSTREAM) == 2000


def test_faults_apply_to_the_http_bytes_inside_tls(
    tls_server: RecordingServer, ca: trustme.CA, tmp_path: Path
) -> None:
    ca_file = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    response, exchange, _ = upload(tls_server, "corrupt:up(at=6000,mask=4)", verify=ca_file)
    assert isinstance(response, requests.Response)
    header_length = len(exchange.received) - len(BODY)
    damaged = exchange.received[header_length:]
    assert [i for i in range(len(BODY)) if damaged[i] != BODY[i]] == [6000 - header_length]


def test_reset_over_tls(tls_server: RecordingServer, ca: trustme.CA, tmp_path: Path) -> None:
    ca_file = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    failure, exchange, _ = upload(tls_server, "reset_peer:up(after=1234)", verify=ca_file)
    assert isinstance(failure, requests.ConnectionError)
    assert exchange.ending == "reset"
    assert len(exchange.received) == 1234


def test_connections_are_numbered_so_toxicity_is_deterministic(server: RecordingServer) -> None:
    plan = FaultPlan.parse("seed=11; reset_peer:up(after=10)~0.5")
    expected = [bool(plan.for_connection(i)) for i in range(8)]
    assert any(expected)
    assert not all(expected)
    with faulty_session(plan) as session:
        failed = []
        for _ in range(8):
            try:
                session.post(server.url(), data=BODY, timeout=30)
                failed.append(False)
            except requests.ConnectionError:
                failed.append(True)
    server.wait_for(8)
    assert failed == expected


def test_latency_delays_each_request_write(server: RecordingServer) -> None:
    started = time.monotonic()
    response, _, counters = upload(server, "latency:up(ms=100)")
    assert isinstance(response, requests.Response)
    writes = counters.faults_applied("latency")
    assert writes >= 1
    assert time.monotonic() - started >= 0.1 * writes  # a lower bound only: sleeps never shrink


def test_abort_connections_wakes_a_thread_stalled_forever(server: RecordingServer) -> None:
    adapter = FaultyHTTPAdapter(FaultPlan.parse("stall:down(after=0)"))
    session = requests.Session()
    session.mount("http://", adapter)
    outcome: list[BaseException] = []

    def post() -> None:
        try:
            session.post(server.url(), data=BODY)  # no timeout: only an abort can end it
        except requests.RequestException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=post)
    worker.start()
    server.wait_for(1)
    while adapter.counters.faults_applied("stall") == 0:
        time.sleep(0.01)
    assert adapter.abort_connections() == 1
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert isinstance(outcome[0], requests.ConnectionError)
    session.close()


EMPTY_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class KeepAliveServer(socketserver.ThreadingTCPServer):
    """Answers every bodiless request with :data:`EMPTY_RESPONSE`, keeping connections open."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _KeepAliveHandler)
        self.connections = 0

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _KeepAliveHandler(socketserver.BaseRequestHandler):
    server: KeepAliveServer

    def handle(self) -> None:
        self.server.connections += 1
        pending = b""
        with contextlib.suppress(OSError):
            while chunk := self.request.recv(65536):
                pending += chunk
                while b"\r\n\r\n" in pending:
                    _, _, pending = pending.partition(b"\r\n\r\n")
                    self.request.sendall(EMPTY_RESPONSE)


@pytest.fixture
def keep_alive_server() -> Iterator[KeepAliveServer]:
    with KeepAliveServer() as srv:
        thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
        thread.start()
        yield srv
        srv.shutdown()


def test_a_pooled_connection_ended_by_limit_data_is_replaced(
    keep_alive_server: KeepAliveServer,
) -> None:
    # The cut falls just before the head's closing blank line: http.client takes the EOF
    # for the end of the head, so the first answer is whole and its connection is pooled.
    cut = len(EMPTY_RESPONSE) - len(b"\r\n")
    plan = FaultPlan.parse(f"seed=0; limit_data:down(bytes={cut})~0.3")
    assert [bool(plan.for_connection(i)) for i in range(2)] == [True, False]
    counters = FaultCounters()
    with faulty_session(plan, counters) as session:
        first = session.get(keep_alive_server.url(), timeout=30)
        # urllib3 polls the pooled connection, sees the peer's FIN and opens a new one.
        second = session.get(keep_alive_server.url(), timeout=30)
    assert (first.status_code, second.status_code) == (200, 200)
    assert counters.faults_applied("limit_data") == 1
    assert counters.as_dict()["connections"] == 2
    assert keep_alive_server.connections == 2


# -- FaultySocket on its own, over a socketpair ------------------------------------------


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair (a socketpair would not carry a real RST)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    ours.settimeout(10)
    theirs.settimeout(10)
    with ours, theirs:
        yield ours, theirs


Pair = tuple[socket.socket, socket.socket]


def wrap(pair: Pair, *toxics: Toxic) -> tuple[FaultySocket, socket.socket]:
    ours, theirs = pair
    return FaultySocket(ours, ConnectionFaults(toxics)), theirs


def test_slicer_downstream_gives_short_reads(tcp_pair: Pair) -> None:
    faulty, peer = wrap(tcp_pair, Slicer(direction=Direction.DOWNSTREAM, size=3))
    peer.sendall(b"abcdefgh")
    assert [faulty.recv(100) for _ in range(3)] == [b"abc", b"def", b"gh"]


def test_recv_into_respects_the_callers_size(tcp_pair: Pair) -> None:
    faulty, peer = wrap(tcp_pair)
    peer.sendall(b"abcdefgh")
    buffer = bytearray(10)
    assert faulty.recv_into(buffer, 5) == 5
    assert faulty.recv(100) == b"fgh"
    assert bytes(buffer[:5]) == b"abcde"


def test_downstream_reset_is_sticky_for_both_directions(tcp_pair: Pair) -> None:
    faulty, peer = wrap(tcp_pair, ResetPeer(direction=Direction.DOWNSTREAM, after=2))
    peer.sendall(b"abcd")
    assert faulty.recv(100) == b"ab"
    with pytest.raises(ConnectionResetError):
        faulty.recv(100)
    with pytest.raises(ConnectionResetError):
        faulty.sendall(b"x")
    with pytest.raises(ConnectionResetError):
        peer.recv(100)  # a real RST reached the peer
    faulty.settimeout(5)  # urllib3 does this on a dead socket; it must not raise
    faulty.close()
    faulty.settimeout(1)


def _polls_readable(sock: FaultySocket) -> bool:
    """urllib3's liveness check on a pooled connection: a readable idle socket is dead."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def test_limit_data_shuts_down_but_leaves_closing_to_the_owner(tcp_pair: Pair) -> None:
    faulty, peer = wrap(tcp_pair, LimitData(direction=Direction.UPSTREAM, bytes=3))
    with pytest.raises(BrokenPipeError):
        faulty.sendall(b"abcdef")
    assert peer.recv(100) == b"abc"
    assert peer.recv(100) == b""  # a FIN, not a reset
    assert faulty.fileno() != -1
    assert _polls_readable(faulty)
    assert faulty.recv(100) == b""
    faulty.settimeout(5)
    faulty.close()
    assert faulty.fileno() == -1


def test_after_a_reset_the_socket_polls_dead_and_stays_reset(tcp_pair: Pair) -> None:
    faulty, peer = wrap(tcp_pair, ResetPeer(direction=Direction.UPSTREAM, after=0))
    with pytest.raises(ConnectionResetError):
        faulty.sendall(b"x")
    with pytest.raises(ConnectionResetError):
        peer.recv(100)  # the RST is real
    assert faulty.fileno() != -1  # as a kernel socket's, until its owner closes it
    assert _polls_readable(faulty)
    faulty.settimeout(5)
    with pytest.raises(ConnectionResetError):
        faulty.recv(100)
    faulty.close()
    assert faulty.fileno() == -1


def test_slow_close_delays_the_eof(tcp_pair: Pair) -> None:
    faulty, peer = wrap(tcp_pair, SlowClose(direction=Direction.DOWNSTREAM, ms=50))
    peer.close()
    started = time.monotonic()
    assert faulty.recv(10) == b""
    assert time.monotonic() - started >= 0.05
    assert faulty.recv(10) == b""


def test_stall_persists_across_timeouts(tcp_pair: Pair) -> None:
    faulty, peer = wrap(tcp_pair, Stall(direction=Direction.DOWNSTREAM, after=0, seconds=60))
    faulty.settimeout(0.05)
    peer.sendall(b"late")
    for _ in range(2):
        with pytest.raises(TimeoutError):
            faulty.recv(10)


def test_makefile_reads_through_the_faults(tcp_pair: Pair) -> None:
    faulty, peer = wrap(tcp_pair, Corrupt(direction=Direction.DOWNSTREAM, at=1, mask=0x20))
    peer.sendall(b"HELLO\n")
    reader = faulty.makefile("rb")
    faulty.close()  # like http.client: the reader keeps the socket usable
    assert reader.readline() == b"HeLLO\n"
    reader.close()
    assert faulty.fileno() == -1


def test_latency_on_send_is_a_lower_bound(tcp_pair: Pair) -> None:
    faulty, peer = wrap(tcp_pair, Latency(ms=30))
    started = time.monotonic()
    faulty.sendall(b"abc")
    faulty.sendall(b"def")
    assert time.monotonic() - started >= 0.06
    received = b""
    while len(received) < 6:
        received += peer.recv(10)
    assert received == b"abcdef"


# -- google-cloud-storage through the adapter ---------------------------------------------


def test_a_storage_client_sends_every_request_through_the_faults(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    data = bytes(range(256)) * 1024
    clean, corrupting = FaultCounters(), FaultCounters()
    client = anonymous_client(gcs_server.url, http=faulty_session(FaultPlan(), clean))
    client.bucket(gcs_bucket).blob("clean").upload_from_string(data, checksum="crc32c")
    assert clean.as_dict()["bytes_up"] > len(data)

    plan = FaultPlan.parse("corrupt:up(at=100k)")
    client = anonymous_client(gcs_server.url, http=faulty_session(plan, corrupting))
    with pytest.raises(BadRequest, match="CRC32C"):
        client.bucket(gcs_bucket).blob("corrupt").upload_from_string(data, checksum="crc32c")
    assert corrupting.faults_applied("corrupt") == 1
