"""The TCP chaos proxy, over real loopback sockets: relaying, half-close, resets, the HTTP
control API, toxics applied per connection, and the ``rup faultproxy`` command line."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from faultnet import tcpproxy_command as faultproxy_command
from faultnet.http_json import MAX_CONNECTIONS
from faultnet.plan import Bandwidth, Corrupt, Direction, FaultPlan, Latency, LimitData, Stall
from faultnet.tcpproxy import (
    Address,
    ChaosProxy,
    DuplicateToxicError,
    ToxicNotFoundError,
    open_chaos_proxy,
)
from tests.faultnet.command_output import read_lines

Handler = Callable[[trio.SocketStream], Awaitable[None]]


# -- upstream servers --------------------------------------------------------------------


async def start_server(nursery: trio.Nursery, handler: Handler) -> Address:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    host, port = listeners[0].socket.getsockname()[:2]
    return host, port


async def echo(stream: trio.SocketStream) -> None:
    """Echo until EOF, then half-close back; a connection the proxy cuts just ends."""
    async with stream:
        with suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until EOF; an EOF that never comes fails the test instead of hanging it."""
    received = bytearray()
    with trio.fail_after(30):  # a deadline against a hang, not a timing assertion
        while data := await stream.receive_some(65536):
            received += data
    return bytes(received)


@pytest.fixture
async def echo_address(nursery: trio.Nursery) -> Address:
    return await start_server(nursery, echo)


@pytest.fixture
async def proxy(echo_address: Address) -> AsyncIterator[ChaosProxy]:
    async with open_chaos_proxy(echo_address, control=("127.0.0.1", 0)) as running:
        yield running


async def connect(proxy: ChaosProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream(*proxy.address)


async def round_trip(proxy: ChaosProxy, payload: bytes) -> bytes:
    """Send ``payload`` through ``proxy`` to the echo server, half-close, return the echo."""
    async with await connect(proxy) as stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(send)
        return await receive_all(stream)


def abort(stream: trio.SocketStream) -> None:
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- relaying ----------------------------------------------------------------------------


async def test_bytes_pass_intact_both_ways(proxy: ChaosProxy) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)

    assert await round_trip(proxy, payload) == payload

    # Each direction is counted before its EOF is passed on, so the client's final EOF
    # means both counts are complete.
    stats = proxy.stats()
    assert stats.bytes_upstream == len(payload)
    assert stats.bytes_downstream == len(payload)
    assert stats.connections_accepted == 1


async def test_connections_are_independent(proxy: ChaosProxy) -> None:
    payloads = [os.urandom(100_000 + i) for i in range(8)]
    echoes: dict[int, bytes] = {}

    async def one(i: int) -> None:
        echoes[i] = await round_trip(proxy, payloads[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(payloads)):
            nursery.start_soon(one, i)

    assert [echoes[i] for i in range(len(payloads))] == payloads
    assert proxy.stats().connections_accepted == 8
    assert proxy.stats().bytes_upstream == sum(map(len, payloads))


async def test_client_eof_reaches_server_and_server_can_still_answer(
    nursery: trio.Nursery,
) -> None:
    async def answer_after_eof(stream: trio.SocketStream) -> None:
        async with stream:
            request = await receive_all(stream)
            await stream.send_all(b"got %d bytes" % len(request))

    upstream = await start_server(nursery, answer_after_eof)
    async with open_chaos_proxy(upstream) as proxy, await connect(proxy) as stream:
        await stream.send_all(b"x" * 1000)
        await stream.send_eof()
        assert await receive_all(stream) == b"got 1000 bytes"


async def test_server_eof_reaches_client_and_client_can_still_send(
    nursery: trio.Nursery,
) -> None:
    received_after_eof = trio.Event()
    received: list[bytes] = []

    async def greet_then_listen(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hello")
            await stream.send_eof()
            received.append(await receive_all(stream))
            received_after_eof.set()

    upstream = await start_server(nursery, greet_then_listen)
    async with open_chaos_proxy(upstream) as proxy, await connect(proxy) as stream:
        assert await receive_all(stream) == b"hello"
        await stream.send_all(b"still talking")
        await stream.send_eof()
        await received_after_eof.wait()
    assert received == [b"still talking"]


async def test_client_reset_resets_the_server_side(nursery: trio.Nursery) -> None:
    outcome: list[BaseException | bytes] = []
    request_arrived = trio.Event()
    done = trio.Event()

    async def record(stream: trio.SocketStream) -> None:
        async with stream:
            received = b""
            while len(received) < len(b"partial request"):
                received += await stream.receive_some()
            request_arrived.set()
            try:
                outcome.append(await receive_all(stream))
            except trio.BrokenResourceError as exc:
                outcome.append(exc)
            done.set()

    upstream = await start_server(nursery, record)
    async with open_chaos_proxy(upstream) as proxy:
        stream = await connect(proxy)
        await stream.send_all(b"partial request")
        await request_arrived.wait()
        abort(stream)
        await stream.aclose()
        await done.wait()

    [error] = outcome
    assert isinstance(error, trio.BrokenResourceError)
    assert isinstance(error.__cause__, ConnectionResetError)


async def test_server_reset_resets_the_client(nursery: trio.Nursery) -> None:
    async def reset_after_greeting(stream: trio.SocketStream) -> None:
        await stream.send_all(b"bye")
        await stream.receive_some()  # wait for the client's answer before resetting
        abort(stream)
        await stream.aclose()

    upstream = await start_server(nursery, reset_after_greeting)
    async with open_chaos_proxy(upstream) as proxy, await connect(proxy) as stream:
        assert await stream.receive_some() == b"bye"
        await stream.send_all(b"ok")
        with pytest.raises(trio.BrokenResourceError) as error:
            await receive_all(stream)
    assert isinstance(error.value.__cause__, ConnectionResetError)


async def test_unreachable_upstream_closes_the_client_and_is_counted() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_address = unused.getsockname()  # bound but not listening: refuses connections
        async with open_chaos_proxy(dead_address) as proxy, await connect(proxy) as stream:
            assert await stream.receive_some() == b""
            assert proxy.stats().upstream_connect_failures == 1


async def test_closing_the_proxy_closes_relayed_connections(echo_address: Address) -> None:
    async with open_chaos_proxy(echo_address) as proxy:
        stream = await connect(proxy)
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"
    with trio.fail_after(5):  # a deadline against a hang, not a timing assertion
        assert await stream.receive_some() == b""
    await stream.aclose()


# -- the Python control API --------------------------------------------------------------


async def test_toxics_get_unique_default_names(proxy: ChaosProxy) -> None:
    first = proxy.add_toxic(Latency(direction=Direction.DOWNSTREAM, ms=5))
    second = proxy.add_toxic(Latency(direction=Direction.DOWNSTREAM, ms=7))
    named = proxy.add_toxic(LimitData(bytes=10), name="cut")

    assert [t.name for t in proxy.toxics()] == ["latency_downstream", "latency_downstream_2", "cut"]
    assert proxy.plan.toxics == (first.toxic, second.toxic, named.toxic)
    with pytest.raises(DuplicateToxicError):
        proxy.add_toxic(LimitData(bytes=1), name="cut")

    assert proxy.remove_toxic("latency_downstream") == first
    assert proxy.remove_toxic(1) == named
    assert proxy.toxics() == (second,)
    with pytest.raises(ToxicNotFoundError):
        proxy.remove_toxic("cut")
    with pytest.raises(ToxicNotFoundError):
        proxy.remove_toxic(1)


async def test_reset_clears_toxics_and_counters(proxy: ChaosProxy) -> None:
    await round_trip(proxy, b"abc")
    proxy.add_toxic(Latency(ms=1))

    proxy.reset()

    assert proxy.toxics() == ()
    stats = proxy.stats().to_dict()
    assert stats == {
        "connections_accepted": 0,
        "connections_active": stats["connections_active"],  # a gauge, not a counter
        "upstream_connect_failures": 0,
        "bytes": {"upstream": 0, "downstream": 0},
        "faults": {},
    }


# -- the HTTP control API ----------------------------------------------------------------


async def control(proxy: ChaosProxy, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One request to the proxy's control API, with the standard library's HTTP client."""
    assert proxy.control_address is not None
    host, port = proxy.control_address
    payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()

    def request() -> tuple[int, Any]:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        try:
            connection.request(method, path, body=payload)
            response = connection.getresponse()
            if response.status == 204:  # Toxiproxy's answer to a reset or a delete: no body
                assert response.read() == b""
                return response.status, None
            assert response.getheader("Content-Type") == "application/json"
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    return await trio.to_thread.run_sync(request)


async def test_control_api_lists_adds_and_removes_toxics(proxy: ChaosProxy) -> None:
    assert await control(proxy, "GET", "/toxics") == (200, {"plan": "seed=0", "toxics": []})

    status, added = await control(
        proxy,
        "POST",
        "/toxics",
        {"type": "latency", "stream": "downstream", "attributes": {"ms": 20, "jitter": 5}},
    )
    assert status == 201
    assert added == {
        "index": 0,
        "name": "latency_downstream",
        "type": "latency",
        "direction": "down",
        "stream": "downstream",
        "toxicity": 1.0,
        "attributes": {"ms": 20.0, "jitter": 5.0},
    }
    status, added = await control(
        proxy, "POST", "/toxics", {"type": "limit_data", "name": "cut", "attributes": {"bytes": 9}}
    )
    assert (status, added["index"], added["name"]) == (201, 1, "cut")
    assert proxy.plan.toxics == (
        Latency(direction=Direction.DOWNSTREAM, ms=20, jitter=5),
        LimitData(bytes=9),
    )

    status, listing = await control(proxy, "GET", "/toxics")
    assert status == 200
    assert [t["name"] for t in listing["toxics"]] == ["latency_downstream", "cut"]
    assert FaultPlan.parse(listing["plan"]) == proxy.plan

    status, removed = await control(proxy, "DELETE", "/toxics/latency_downstream")
    assert (status, removed["removed"]["type"]) == (200, "latency")
    status, removed = await control(proxy, "DELETE", "/toxics/0")
    assert (status, removed["removed"]["name"]) == (200, "cut")
    assert proxy.toxics() == ()


async def test_control_api_reset_and_stats(proxy: ChaosProxy) -> None:
    await round_trip(proxy, b"0123456789")
    proxy.add_toxic(Latency(ms=1))

    status, stats = await control(proxy, "GET", "/stats")
    assert status == 200
    assert stats == {
        "connections_accepted": 1,
        "connections_active": stats["connections_active"],  # 0 or 1: closing is async
        "upstream_connect_failures": 0,
        "bytes": {"upstream": 10, "downstream": 10},
        "faults": {},
    }

    # /reset is Toxiproxy's route, whose answer is a bare 204
    assert await control(proxy, "POST", "/reset") == (204, None)
    assert await control(proxy, "GET", "/toxics") == (200, {"plan": "seed=0", "toxics": []})
    status, stats = await control(proxy, "GET", "/stats")
    assert stats["connections_accepted"] == 0
    assert stats["bytes"] == {"upstream": 0, "downstream": 0}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/toxics", b"{not json", 400, "not valid JSON"),
        ("POST", "/toxics", b"[1, 2]", 400, "must be a JSON object"),
        ("POST", "/toxics", {"type": "teleport"}, 400, "unknown toxic 'teleport'"),
        ("POST", "/toxics", {"attributes": {}}, 400, "needs a 'type'"),
        ("POST", "/toxics", {"type": "latency", "stream": "sideways"}, 400, "direction"),
        ("POST", "/toxics", {"type": "latency", "attributes": {"ms": -1}}, 400, "negative"),
        ("POST", "/toxics", {"type": "latency", "toxicity": "lots"}, 400, "malformed toxic"),
        ("POST", "/toxics", {"type": "latency", "attributes": {"nope": 1}}, 400, "'nope'"),
        ("POST", "/toxics", {"type": "latency", "name": 5}, 400, "name must be a string"),
        ("POST", "/toxics", {"type": "latency", "name": "12"}, 400, "not a number"),
        ("DELETE", "/toxics/7", None, 404, "no toxic at index 7"),
        ("DELETE", "/toxics/ghost", None, 404, "no toxic named 'ghost'"),
        ("DELETE", "/toxics/%C2%B2", None, 404, "no toxic named '\u00b2'"),
        ("GET", "/nowhere", None, 404, "no such resource"),
        ("GET", "/toxics/1/2", None, 404, "no such resource"),
        ("PUT", "/toxics", b"{}", 405, "use GET, POST"),
        ("GET", "/reset", None, 405, "use POST"),
        ("POST", "/toxics", b"x" * (64 * 1024 + 1), 413, "body longer than"),
    ],
)
async def test_control_api_refuses_bad_requests(
    proxy: ChaosProxy, method: str, path: str, body: Any, status: int, message: str
) -> None:
    got_status, answer = await control(proxy, method, path, body)

    assert (got_status, message in answer["error"]) == (status, True), answer
    assert proxy.toxics() == ()
    assert await round_trip(proxy, b"still relaying") == b"still relaying"


async def test_control_api_refuses_duplicate_names(proxy: ChaosProxy) -> None:
    toxic = {"type": "latency", "name": "slow"}
    assert (await control(proxy, "POST", "/toxics", toxic))[0] == 201
    status, answer = await control(proxy, "POST", "/toxics", toxic)
    assert (status, answer) == (409, {"error": "a toxic named 'slow' already exists"})
    assert len(proxy.toxics()) == 1


@pytest.mark.parametrize(
    ("raw_request", "status"),
    [
        (b"NONSENSE\r\n\r\n", 400),
        (b"GET /toxics\r\n\r\n", 400),
        (b"GET /toxics HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
        (b"POST /toxics HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400),
        (
            "POST /toxics HTTP/1.1\r\nHost: x\r\nContent-Length: \u00b2\r\n\r\n".encode("latin-1"),
            400,
        ),
        (b"POST /toxics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"POST /toxics HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{}", 400),  # cut short
        (b"GET /toxics HTTP/1.1\r\n" + b"X-Filler: y\r\n" * 2000, 431),
        (b"GET /toxics HTTP/1.1", 400),  # head cut short
        (b"GET /toxics HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without the mandatory Host
    ],
)
async def test_control_api_survives_malformed_http(
    proxy: ChaosProxy, raw_request: bytes, status: int
) -> None:
    assert proxy.control_address is not None
    async with await trio.open_tcp_stream(*proxy.control_address) as stream:
        await stream.send_all(raw_request)
        await stream.send_eof()
        answer = await receive_all(stream)

    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    assert (await control(proxy, "GET", "/toxics"))[0] == 200


async def test_control_api_keeps_a_connection_alive_across_requests(proxy: ChaosProxy) -> None:
    assert proxy.control_address is not None
    host, port = proxy.control_address

    def two_requests() -> list[tuple[int, Any]]:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        try:
            answers = []
            for method, path in (("POST", "/toxics"), ("GET", "/toxics")):
                body = json.dumps({"type": "latency", "name": "slow"}) if method == "POST" else None
                connection.request(method, path, body=body)
                response = connection.getresponse()
                answers.append((response.status, json.loads(response.read())))
            return answers
        finally:
            connection.close()

    (created, _), (listed, listing) = await trio.to_thread.run_sync(two_requests)

    assert (created, listed) == (201, 200)
    assert [t["name"] for t in listing["toxics"]] == ["slow"]


async def test_control_api_drops_a_client_that_stalls(
    mock_clock: trio.testing.MockClock, proxy: ChaosProxy
) -> None:
    mock_clock.autojump_threshold = 0.01
    assert proxy.control_address is not None
    async with await trio.open_tcp_stream(*proxy.control_address) as stalled:
        await stalled.send_all(b"GET /toxics HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        start = trio.current_time()
        assert await receive_all(stalled) == b""
        assert trio.current_time() - start == pytest.approx(10.0)  # REQUEST_TIMEOUT
    assert (await control(proxy, "GET", "/toxics"))[0] == 200


# -- toxics ------------------------------------------------------------------------------


class Recorder:
    """An upstream server that records what arrives, when (in trio time), and how it ended."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, bytes]] = []
        self.ending: BaseException | None = None
        self.finished = trio.Event()

    @property
    def received(self) -> bytes:
        return b"".join(data for _, data in self.arrivals)

    async def __call__(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    self.arrivals.append((trio.current_time(), data))
            except trio.BrokenResourceError as exc:
                self.ending = exc
            self.finished.set()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def recorder_address(nursery: trio.Nursery, recorder: Recorder) -> Address:
    return await start_server(nursery, recorder)


async def test_limit_data_added_over_http_cuts_the_next_connection_only(
    echo_address: Address,
) -> None:
    async with open_chaos_proxy(echo_address, control=("127.0.0.1", 0)) as proxy:
        earlier = await connect(proxy)
        await earlier.send_all(b"hi")  # the echo proves the proxy has taken it on
        assert await earlier.receive_some() == b"hi"
        status, _ = await control(
            proxy, "POST", "/toxics", {"type": "limit_data", "attributes": {"bytes": 1000}}
        )
        assert status == 201

        cut = await round_trip_tolerating_reset(proxy, os.urandom(5000))

        # Opened before the toxic: unaffected.
        payload = os.urandom(5000)
        await earlier.send_all(payload)
        await earlier.send_eof()
        assert await receive_all(earlier) == payload
        await earlier.aclose()

    assert len(cut) <= 1000  # the echo server only ever got 1000 bytes to echo
    stats = proxy.stats()
    assert stats.faults == {"limit_data": 1}
    assert stats.bytes_upstream == 2 + 5000 + 1000


async def test_removing_a_toxic_over_http_heals_the_next_connection(
    echo_address: Address,
) -> None:
    plan = FaultPlan.parse("corrupt:down(at=0)")
    async with open_chaos_proxy(echo_address, plan, control=("127.0.0.1", 0)) as proxy:
        assert await round_trip(proxy, b"\x00abc") == b"\xffabc"
        assert (await control(proxy, "DELETE", "/toxics/corrupt_downstream"))[0] == 200
        assert await round_trip(proxy, b"\x00abc") == b"\x00abc"
    assert proxy.stats().faults == {"corrupt": 1}


async def test_limit_data_delivers_exactly_n_bytes_then_eof(
    recorder: Recorder, recorder_address: Address
) -> None:
    plan = FaultPlan.parse("limit_data:up(bytes=1000)")
    async with open_chaos_proxy(recorder_address, plan) as proxy:
        await round_trip_tolerating_reset(proxy, os.urandom(300_000))
        await recorder.finished.wait()

    assert len(recorder.received) == 1000
    assert recorder.ending is None  # a clean close, not a reset


async def test_reset_peer_added_over_http_resets_the_client(
    nursery: trio.Nursery, recorder: Recorder, recorder_address: Address
) -> None:
    async def talkative(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"0123456789" * 10)
            await trio.sleep_forever()

    upstream = await start_server(nursery, talkative)
    async with open_chaos_proxy(upstream, control=("127.0.0.1", 0)) as proxy:
        toxic = {"type": "reset_peer", "stream": "downstream", "attributes": {"after": 25}}
        assert (await control(proxy, "POST", "/toxics", toxic))[0] == 201
        async with await connect(proxy) as stream:
            received, error = await receive_until_broken(stream)

    assert received == (b"0123456789" * 3)[:25]
    assert isinstance(error.__cause__, ConnectionResetError)
    assert proxy.stats().faults == {"reset_peer": 1}


async def test_reset_peer_upstream_resets_the_server_after_exactly_n_bytes(
    recorder: Recorder, recorder_address: Address
) -> None:
    plan = FaultPlan.parse("reset_peer:up(after=64k)")
    async with open_chaos_proxy(recorder_address, plan) as proxy:
        async with await connect(proxy) as stream:
            with pytest.raises(trio.BrokenResourceError) as error:
                await send_then_receive(stream, os.urandom(1024 * 1024))
        await recorder.finished.wait()

    assert isinstance(error.value.__cause__, ConnectionResetError)
    assert len(recorder.received) == 64 * 1024
    assert isinstance(recorder.ending, trio.BrokenResourceError)
    assert isinstance(recorder.ending.__cause__, ConnectionResetError)


async def test_corrupt_flips_exactly_one_byte(proxy: ChaosProxy) -> None:
    proxy.add_toxic(Corrupt(direction=Direction.DOWNSTREAM, at=100_000, mask=0x01))
    payload = bytes(300_000)

    echoed = await round_trip(proxy, payload)

    assert len(echoed) == len(payload)
    assert [i for i, byte in enumerate(echoed) if byte] == [100_000]
    assert echoed[100_000] == 0x01
    assert proxy.stats().faults == {"corrupt": 1}


async def test_latency_delays_each_write(
    mock_clock: trio.testing.MockClock, proxy: ChaosProxy
) -> None:
    mock_clock.autojump_threshold = 0.01  # jump only once the loopback traffic has settled
    proxy.add_toxic(Latency(direction=Direction.DOWNSTREAM, ms=500))
    async with await connect(proxy) as stream:
        start = trio.current_time()
        await stream.send_all(b"ping")
        assert await stream.receive_some() == b"ping"
        assert trio.current_time() - start == pytest.approx(0.5)


async def test_bandwidth_limits_the_rate(
    mock_clock: trio.testing.MockClock, recorder: Recorder, recorder_address: Address
) -> None:
    mock_clock.autojump_threshold = 0.01
    async with (
        open_chaos_proxy(recorder_address, FaultPlan.parse("bandwidth:up(rate=1000)")) as proxy,
        await connect(proxy) as stream,
    ):
        start = trio.current_time()
        await stream.send_all(bytes(3000))
        await stream.send_eof()
        await recorder.finished.wait()

    assert len(recorder.received) == 3000
    assert recorder.arrivals[-1][0] - start == pytest.approx(3.0)


async def test_slicer_cuts_writes_into_short_pieces(
    mock_clock: trio.testing.MockClock, recorder: Recorder, recorder_address: Address
) -> None:
    mock_clock.autojump_threshold = 0.01
    plan = FaultPlan.parse("slicer:up(size=10,delay_ms=100)")
    payload = bytes(range(100))
    async with open_chaos_proxy(recorder_address, plan) as proxy, await connect(proxy) as stream:
        start = trio.current_time()
        await stream.send_all(payload)  # one small write: the proxy reads it in one piece
        await stream.send_eof()
        await recorder.finished.wait()

    assert [data for _, data in recorder.arrivals] == [
        payload[i : i + 10] for i in range(0, 100, 10)
    ]
    assert [t - start for t, _ in recorder.arrivals] == pytest.approx([i / 10 for i in range(10)])
    assert proxy.stats().faults == {"slicer": 1}


async def test_timed_stall_holds_the_rest_back(
    mock_clock: trio.testing.MockClock, recorder: Recorder, recorder_address: Address
) -> None:
    mock_clock.autojump_threshold = 0.01
    plan = FaultPlan.parse("stall:up(after=4,seconds=10)")
    async with open_chaos_proxy(recorder_address, plan) as proxy, await connect(proxy) as stream:
        start = trio.current_time()
        await stream.send_all(b"0123456789")
        await stream.send_eof()
        await recorder.finished.wait()

    assert [(t - start, data) for t, data in recorder.arrivals] == [
        (0.0, b"0123"),
        (pytest.approx(10.0), b"456789"),
    ]


async def test_endless_stall_drops_data_until_the_client_gives_up(
    mock_clock: trio.testing.MockClock, recorder: Recorder, recorder_address: Address
) -> None:
    mock_clock.autojump_threshold = 0.01
    async with open_chaos_proxy(recorder_address, FaultPlan.parse("stall:up(after=4)")) as proxy:
        async with await connect(proxy) as stream:
            await stream.send_all(b"0123456789")
            await trio.sleep(3600)  # nothing more arrives, however long we wait
            assert recorder.received == b"0123"
            assert not recorder.finished.is_set()
        # The client hung up: the proxy notices even while stalled, and hangs up too.
        await recorder.finished.wait()
    assert recorder.received == b"0123"
    assert proxy.stats().faults == {"stall": 1}


async def test_a_stalled_connection_keeps_its_stall_and_blocks_no_other(
    mock_clock: trio.testing.MockClock, proxy: ChaosProxy
) -> None:
    mock_clock.autojump_threshold = 0.01
    proxy.add_toxic(Stall(direction=Direction.DOWNSTREAM))
    async with await connect(proxy) as stalled:
        await stalled.send_all(b"anyone there?")
        await trio.sleep(1)  # virtual time: lets the proxy take the connection on
        assert proxy.stats().connections_accepted == 1
        proxy.reset()  # too late for the open connection: it keeps the stall

        assert await round_trip(proxy, b"hello") == b"hello"
        with trio.move_on_after(3600):
            await stalled.receive_some()
            pytest.fail("a stalled connection delivered data")


async def test_slow_close_delays_the_eof(
    mock_clock: trio.testing.MockClock, recorder: Recorder, recorder_address: Address
) -> None:
    mock_clock.autojump_threshold = 0.01
    plan = FaultPlan.parse("slow_close:up(ms=2000)")
    async with open_chaos_proxy(recorder_address, plan) as proxy, await connect(proxy) as stream:
        await stream.send_all(b"bye")
        start = trio.current_time()
        await stream.send_eof()
        await recorder.finished.wait()
        assert trio.current_time() - start == pytest.approx(2.0)
    assert recorder.received == b"bye"


async def test_limit_time_closes_cleanly_after_exactly_t(
    mock_clock: trio.testing.MockClock, recorder: Recorder, recorder_address: Address
) -> None:
    mock_clock.autojump_threshold = 0.01
    plan = FaultPlan.parse("limit_time:up(ms=1500)")
    async with open_chaos_proxy(recorder_address, plan) as proxy, await connect(proxy) as stream:
        start = trio.current_time()
        await stream.send_all(b"early")
        assert await stream.receive_some() == b""  # the proxy hung up on us
        assert trio.current_time() - start == pytest.approx(1.5)
        await recorder.finished.wait()

    assert recorder.received == b"early"
    assert recorder.ending is None  # a clean close, not a reset
    assert trio.current_time() - start == pytest.approx(1.5)
    assert proxy.stats().faults == {"limit_time": 1}


async def test_a_byte_trigger_starts_limit_time_when_it_is_crossed(
    mock_clock: trio.testing.MockClock, recorder: Recorder, recorder_address: Address
) -> None:
    mock_clock.autojump_threshold = 0.01
    plan = FaultPlan.parse("limit_time:up(ms=1000)@bytes=4")
    async with open_chaos_proxy(recorder_address, plan) as proxy, await connect(proxy) as stream:
        start = trio.current_time()
        await stream.send_all(b"ab")
        await trio.sleep(5)  # below the trigger: no timer runs, however long
        await stream.send_all(b"cdef")  # crosses byte 4 at t=5
        await recorder.finished.wait()

    assert recorder.received == b"abcdef"
    assert trio.current_time() - start == pytest.approx(6.0)


async def test_timeout_drops_everything_then_closes(
    mock_clock: trio.testing.MockClock, recorder: Recorder, recorder_address: Address
) -> None:
    mock_clock.autojump_threshold = 0.01
    plan = FaultPlan.parse("timeout:up(ms=2000)")  # Toxiproxy's timeout toxic
    async with open_chaos_proxy(recorder_address, plan) as proxy, await connect(proxy) as stream:
        start = trio.current_time()
        await stream.send_all(b"never arrives")
        assert await stream.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(2.0)
        await recorder.finished.wait()

    assert recorder.received == b""
    assert proxy.stats().bytes_upstream == 0


async def test_reset_peer_with_a_delay_holds_the_data_then_resets(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    mock_clock.autojump_threshold = 0.01

    async def talkative(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"0123456789")
            await trio.sleep_forever()

    upstream = await start_server(nursery, talkative)
    plan = FaultPlan.parse("reset_peer:down(ms=500)")  # Toxiproxy's reset_peer{timeout: 500}
    async with open_chaos_proxy(upstream, plan) as proxy, await connect(proxy) as stream:
        start = trio.current_time()
        received, error = await receive_until_broken(stream)
        assert trio.current_time() - start == pytest.approx(0.5)

    assert received == b""
    assert isinstance(error.__cause__, ConnectionResetError)


async def test_loss_stalls_each_lost_segment_for_the_retransmission_timeout(
    mock_clock: trio.testing.MockClock, recorder: Recorder, recorder_address: Address
) -> None:
    mock_clock.autojump_threshold = 0.01
    # the first 2000 bytes pass; from there every 1000-byte segment is lost once
    plan = FaultPlan.parse("loss:up(p=1,segment=1000,rto_ms=200)@bytes=2000")
    payload = os.urandom(5000)
    async with open_chaos_proxy(recorder_address, plan) as proxy, await connect(proxy) as stream:
        start = trio.current_time()
        await stream.send_all(payload)
        await stream.send_eof()
        await recorder.finished.wait()

    assert recorder.received == payload  # delayed, never dropped or reordered
    by_time: dict[float, int] = {}
    for t, data in recorder.arrivals:
        by_time[round(t - start, 6)] = by_time.get(round(t - start, 6), 0) + len(data)
    assert by_time == {0.0: 2000, 0.2: 1000, 0.4: 1000, 0.6: 1000}
    assert proxy.stats().faults == {"loss": 3}


async def test_a_connection_trigger_spares_the_first_connections(proxy: ChaosProxy) -> None:
    proxy.add_toxic(LimitData(direction=Direction.DOWNSTREAM, bytes=3, trigger_connections=2))

    echoes = [await round_trip_tolerating_reset(proxy, b"abcdef") for _ in range(4)]

    assert echoes == [b"abcdef", b"abcdef", b"abc", b"abc"]


@pytest.mark.parametrize(
    ("plan", "round_trip_seconds"),
    [
        ("latency:up(ms=10); latency:down(ms=10)", 0.02),
        ("latency:down(ms=10)", 0.01),
        ("latency:up(ms=40)", 0.04),
    ],
)
async def test_latency_applies_per_direction(
    mock_clock: trio.testing.MockClock, echo_address: Address, plan: str, round_trip_seconds: float
) -> None:
    mock_clock.autojump_threshold = 0.01
    async with (
        open_chaos_proxy(echo_address, FaultPlan.parse(plan)) as proxy,
        await connect(proxy) as stream,
    ):
        for _ in range(3):
            start = trio.current_time()
            await stream.send_all(b"ping")
            assert await stream.receive_some() == b"ping"
            assert trio.current_time() - start == pytest.approx(round_trip_seconds)


@pytest.mark.parametrize("rate", [5_000_000, 20_000_000, 50_000_000])
async def test_bandwidth_is_exact_at_network_profile_rates(
    mock_clock: trio.testing.MockClock,
    recorder: Recorder,
    recorder_address: Address,
    rate: int,
) -> None:
    # each read the proxy makes ends in a wait: jump soon, or the test spends its time idle
    mock_clock.autojump_threshold = 0.002
    size = rate // 5  # 0.2 s worth: several reads and several bandwidth slices at every rate
    plan = FaultPlan((Bandwidth(rate=rate),))
    async with open_chaos_proxy(recorder_address, plan) as proxy, await connect(proxy) as stream:
        start = trio.current_time()
        await stream.send_all(bytes(size))
        await stream.send_eof()
        await recorder.finished.wait()

    assert len(recorder.received) == size
    assert recorder.arrivals[-1][0] - start == pytest.approx(size / rate, abs=1e-6)


async def test_latency_behind_bandwidth_is_a_pipe_not_a_queue(
    mock_clock: trio.testing.MockClock, recorder: Recorder, recorder_address: Address
) -> None:
    mock_clock.autojump_threshold = 0.01
    # the "wan" client leg: every byte is 10 ms late, and the link carries 20 MB/s
    plan = FaultPlan.parse("bandwidth:up(rate=20000000); latency:up(ms=10)")
    size = 10_000_000
    async with open_chaos_proxy(recorder_address, plan) as proxy, await connect(proxy) as stream:
        start = trio.current_time()
        await stream.send_all(bytes(size))
        await stream.send_eof()
        await recorder.finished.wait()

    assert len(recorder.received) == size
    assert recorder.arrivals[0][0] - start >= 0.01  # nothing arrives before the latency
    # 10 MB at 20 MB/s, plus the latency once, not once per read
    assert recorder.arrivals[-1][0] - start == pytest.approx(0.5 + 0.01, abs=1e-6)


async def test_toxicity_picks_the_same_connections_for_the_same_seed(
    recorder_address: Address, echo_address: Address
) -> None:
    plan = FaultPlan.parse("seed=11; corrupt:down(at=0)~0.5")
    expected = [bool(plan.for_connection(i)) for i in range(12)]
    assert sorted(set(expected)) == [False, True]  # the seed exercises both outcomes

    async with open_chaos_proxy(echo_address, plan) as proxy:
        corrupted = [await round_trip(proxy, b"\x00abc") != b"\x00abc" for _ in range(12)]

    assert corrupted == expected
    assert proxy.stats().faults == {"corrupt": expected.count(True)}


async def send_then_receive(stream: trio.abc.Stream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    return await receive_all(stream)


async def receive_until_broken(
    stream: trio.abc.ReceiveStream,
) -> tuple[bytes, trio.BrokenResourceError]:
    """What arrives before the stream breaks, and how it broke; an EOF fails the test."""
    received = bytearray()
    with trio.fail_after(30):  # a deadline against a hang, not a timing assertion
        try:
            while data := await stream.receive_some():
                received += data
        except trio.BrokenResourceError as exc:
            return bytes(received), exc
    raise AssertionError(f"clean EOF after {len(received)} bytes; expected a reset")


async def round_trip_tolerating_reset(proxy: ChaosProxy, payload: bytes) -> bytes:
    """Like :func:`round_trip`, for a connection the proxy may cut short.

    Whether the client sees a FIN or a reset depends on whether its unsent bytes were still
    in the proxy's receive buffer at the close, which is a race, so either is accepted.
    """
    received = bytearray()
    try:
        async with await connect(proxy) as stream, trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            nursery.start_soon(send)
            while data := await stream.receive_some():
                received += data
            nursery.cancel_scope.cancel()
    except* trio.BrokenResourceError:
        pass
    return bytes(received)


# -- the command line --------------------------------------------------------------------


def test_cli_reports_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="rup faultproxy")
    faultproxy_command.configure(parser)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = parser.parse_args(["--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:9"])

        assert faultproxy_command.run(args) == 1

    [error] = capsys.readouterr().err.splitlines()
    assert error.startswith("rup faultproxy: cannot listen on ")
    assert "in use" in error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--listen", "nowhere", "--upstream", "127.0.0.1:1"], "--listen: expected HOST:PORT"),
        (
            ["--listen", "127.0.0.1:70000", "--upstream", "127.0.0.1:1"],
            "port 70000 is out of range",
        ),
        (["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:x"], "--upstream: expected"),
        (["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:0"], "needs a real port"),
        (["--listen", ":80", "--upstream", "127.0.0.1:1"], "expected HOST:PORT"),
        (["--listen", "127.0.0.1:\u00b2", "--upstream", "127.0.0.1:1"], "expected HOST:PORT"),
        (
            ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--plan", "lag(ms=1)"],
            "--plan: unknown toxic 'lag'",
        ),
        (
            ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--plan", "{bad json"],
            "--plan: fault plan is not valid JSON",
        ),
    ],
)
def test_cli_refuses_bad_arguments(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="rup faultproxy")
    faultproxy_command.configure(parser)

    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(arguments)

    assert exit_info.value.code == 2
    error_lines = [
        line for line in capsys.readouterr().err.splitlines() if "rup faultproxy: error:" in line
    ]
    assert len(error_lines) == 1
    assert message in error_lines[0]


async def test_cli_relays_until_interrupted(echo_address: Address) -> None:
    upstream = f"{echo_address[0]}:{echo_address[1]}"
    command = [sys.executable, "-m", "proxy.cli", "faultproxy", "--listen", "127.0.0.1:0"]
    command += ["--upstream", upstream, "--control", "127.0.0.1:0", "--plan", "seed=4"]
    run = partial(trio.run_process, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    async with trio.open_nursery() as nursery:
        process = await nursery.start(partial(run, check=False))
        assert process.stdout is not None
        assert process.stderr is not None
        with trio.fail_after(60):  # a deadline against a hang, not a timing assertion
            listening, control_line, plan_line = await read_lines(process.stdout, 3)
            host, port = listening.split()[2].rstrip(",").split(":")
            assert control_line.startswith("control API on http://127.0.0.1:")
            assert plan_line == "plan: seed=4"

            async with await trio.open_tcp_stream(host, int(port)) as stream:
                await stream.send_all(b"through the command line")
                await stream.send_eof()
                assert await receive_all(stream) == b"through the command line"

            process.send_signal(signal.SIGINT)
            errors = await receive_all(process.stderr)
            await process.wait()

    final_stats = json.loads(errors.decode().splitlines()[0])
    assert final_stats["bytes"] == {"upstream": 24, "downstream": 24}
    assert final_stats["connections_accepted"] == 1
    assert process.returncode == 130


async def test_control_api_says_continue_to_a_client_that_asks(proxy: ChaosProxy) -> None:
    assert proxy.control_address is not None
    body = json.dumps({"type": "latency", "name": "x" * 2000}).encode()
    head = b"POST /toxics HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    async with await trio.open_tcp_stream(*proxy.control_address) as stream:
        await stream.send_all(head)
        with trio.fail_after(30):  # a deadline against a hang, not a timing assertion
            assert await stream.receive_some() == b"HTTP/1.1 100 \r\n\r\n"
        await stream.send_all(body)
        await stream.send_eof()
        answer = await receive_all(stream)
    assert answer.startswith(b"HTTP/1.1 201 ")
    assert [t.name for t in proxy.toxics()] == ["x" * 2000]


async def test_control_api_hangs_up_on_connections_past_its_limit(proxy: ChaosProxy) -> None:
    assert proxy.control_address is not None
    idle = [await trio.open_tcp_stream(*proxy.control_address) for _ in range(MAX_CONNECTIONS)]
    try:
        for stream in idle:  # one answered request each: the server holds them all now
            await stream.send_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            with trio.fail_after(30):  # a deadline against a hang, not a timing assertion
                while not answer.endswith(b"}\n"):
                    answer += await stream.receive_some()
        async with await trio.open_tcp_stream(*proxy.control_address) as extra:
            with trio.fail_after(30), suppress(trio.BrokenResourceError):
                assert await extra.receive_some() == b""
    finally:
        for stream in idle:
            await stream.aclose()
    with trio.fail_after(30):  # served again once they have left (the server sees it soon)
        while True:
            with suppress(ConnectionError, http.client.HTTPException):
                assert (await control(proxy, "GET", "/toxics"))[0] == 200
                break
            await trio.sleep(0.05)
