"""The faultproxy's control API speaks Toxiproxy's: driven by the ``toxiproxy-python``
client from PyPI, unchanged, and by raw requests in Toxiproxy's documented shapes."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import toxiproxy
import trio
import trio.testing

from faultnet.plan import (
    Bandwidth,
    Direction,
    Latency,
    LimitData,
    LimitTime,
    Slicer,
    Stall,
    Timeout,
)
from faultnet.tcpproxy import (
    MAX_PROXIES,
    MAX_TOXICS,
    Address,
    ProxyCollection,
    ProxySpec,
    open_proxy_collection,
    parse_address,
)
from tests.faultnet.command_output import read_lines

T = TypeVar("T")


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        with suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
            await stream.send_eof()


@pytest.fixture
async def echo_address(nursery: trio.Nursery) -> Address:
    listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    host, port = listeners[0].socket.getsockname()[:2]
    return host, port


@pytest.fixture
async def collection() -> AsyncIterator[ProxyCollection]:
    async with open_proxy_collection(control=("127.0.0.1", 0)) as running:
        yield running


def _control_of(collection: ProxyCollection) -> Address:
    address = collection.control_address
    assert address is not None
    return address


@pytest.fixture
def client(collection: ProxyCollection) -> toxiproxy.Toxiproxy:
    server = toxiproxy.Toxiproxy()
    server.update_api_consumer(*_control_of(collection))
    return server


async def blocking(call: Callable[[], T]) -> T:
    """Run a blocking client call in a thread, as a test suite using the client would."""
    return await trio.to_thread.run_sync(call)


async def round_trip(address: Address, payload: bytes) -> bytes:
    """Send, half-close, and read until EOF or a reset; what came back."""
    received = bytearray()
    with trio.fail_after(30), suppress(trio.BrokenResourceError):  # a deadline against a hang
        async with await trio.open_tcp_stream(*address) as stream:
            await stream.send_all(payload)
            await stream.send_eof()
            while data := await stream.receive_some(65536):
                received += data
    return bytes(received)


async def refused(address: Address) -> bool:
    try:
        stream = await trio.open_tcp_stream(*address)
    except OSError:
        return True
    await stream.aclose()
    return False


def request(address: Address, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        payload = None if body is None else json.dumps(body)
        connection.request(method, path, body=payload)
        response = connection.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        connection.close()


async def call(
    collection: ProxyCollection, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    return await blocking(partial(request, _control_of(collection), method, path, body))


# -- the toxiproxy-python client, unchanged ------------------------------------------------


async def test_the_python_client_creates_lists_and_destroys_proxies(
    client: toxiproxy.Toxiproxy, collection: ProxyCollection, echo_address: Address
) -> None:
    upstream = f"{echo_address[0]}:{echo_address[1]}"

    created = await blocking(lambda: client.create(upstream=upstream, name="echo"))

    host, port = parse_address(created.listen)
    assert (host, created.upstream, created.enabled) == ("127.0.0.1", upstream, True)
    assert port != 0  # the real port, as Toxiproxy reports it
    assert await round_trip((host, port), b"hello") == b"hello"
    assert list(await blocking(client.proxies)) == ["echo"]
    assert (await blocking(lambda: client.get_proxy("echo"))).listen == created.listen
    assert b"rup" in await blocking(client.version)

    with pytest.raises(toxiproxy.api.ProxyExists):
        await blocking(lambda: client.create(upstream=upstream, name="echo"))

    assert await blocking(lambda: client.destroy(created))
    assert await blocking(client.proxies) == {}
    assert await refused((host, port))


async def test_the_python_client_adds_a_toxic_that_cuts_after_exact_bytes(
    client: toxiproxy.Toxiproxy, collection: ProxyCollection, echo_address: Address
) -> None:
    upstream = f"{echo_address[0]}:{echo_address[1]}"
    proxy = await blocking(lambda: client.create(upstream=upstream, name="echo"))

    await blocking(
        lambda: proxy.add_toxic(type="limit_data", stream="upstream", attributes={"bytes": 1000})
    )

    toxics = await blocking(proxy.toxics)
    assert list(toxics) == ["limit_data_upstream"]
    assert toxics["limit_data_upstream"].attributes == {"bytes": 1000}
    echoed = await round_trip(parse_address(proxy.listen), os.urandom(5000))
    assert len(echoed) <= 1000  # the echo server only ever got 1000 bytes to echo
    assert collection.get("echo").stats().bytes_upstream == 1000

    await blocking(lambda: proxy.destroy_toxic("limit_data_upstream"))
    payload = os.urandom(5000)
    assert await round_trip(parse_address(proxy.listen), payload) == payload


async def test_the_python_client_takes_a_proxy_down_and_up(
    client: toxiproxy.Toxiproxy, echo_address: Address
) -> None:
    upstream = f"{echo_address[0]}:{echo_address[1]}"
    proxy = await blocking(lambda: client.create(upstream=upstream, name="echo"))
    address = parse_address(proxy.listen)

    def go_down() -> Any:
        context = proxy.down()
        context.__enter__()
        return context

    context = await blocking(go_down)
    assert await refused(address)
    assert (await blocking(lambda: client.get_proxy("echo"))).enabled is False
    await blocking(lambda: context.__exit__(None, None, None))
    assert await round_trip(address, b"back") == b"back"  # the same address again


async def test_the_python_client_populates_and_resets(
    client: toxiproxy.Toxiproxy, collection: ProxyCollection, echo_address: Address
) -> None:
    upstream = f"{echo_address[0]}:{echo_address[1]}"
    wanted = [
        {"name": "first", "upstream": upstream, "listen": "127.0.0.1:0"},
        {"name": "second", "upstream": upstream, "listen": "127.0.0.1:0"},
    ]
    created = await blocking(lambda: client.populate(wanted))
    assert sorted(p.name for p in created) == ["first", "second"]
    first = collection.get("first")
    first.add_toxic(Stall(direction=Direction.DOWNSTREAM))
    await collection.update("second", enabled=False)

    assert await blocking(client.reset)

    assert first.toxics() == ()
    assert collection.get("second").enabled
    for proxy in collection.proxies():
        assert await round_trip(proxy.address, b"after reset") == b"after reset"


# -- Toxiproxy's documented requests and answers -------------------------------------------


async def test_toxics_are_read_in_toxiproxys_names_and_units(
    collection: ProxyCollection, echo_address: Address
) -> None:
    upstream = f"{echo_address[0]}:{echo_address[1]}"
    assert (await call(collection, "POST", "/proxies", {"name": "p", "upstream": upstream}))[
        0
    ] == 201

    status, toxic = await call(
        collection,
        "POST",
        "/proxies/p/toxics",
        {"type": "bandwidth", "attributes": {"rate": 20_000}, "toxicity": 0.5},
    )
    assert status == 200
    assert toxic == {
        "name": "bandwidth_downstream",  # Toxiproxy's defaults: downstream, TYPE_STREAM
        "type": "bandwidth",
        "stream": "downstream",
        "toxicity": 0.5,
        "attributes": {"rate": 20_000},
    }
    await call(
        collection,
        "POST",
        "/proxies/p/toxics",
        {
            "type": "slicer",
            "stream": "upstream",
            "attributes": {"average_size": 64, "size_variation": 8, "delay": 1500},
        },
    )
    assert collection.get("p").plan.toxics == (
        Bandwidth(direction=Direction.DOWNSTREAM, toxicity=0.5, rate=20_000_000),  # KB/s
        Slicer(size=64, variation=8, delay_ms=1.5),  # microseconds
    )

    # an update changes only what it names, as Toxiproxy's does
    status, updated = await call(
        collection, "POST", "/proxies/p/toxics/bandwidth_downstream", {"attributes": {"rate": 5}}
    )
    assert (status, updated["attributes"], updated["toxicity"]) == (200, {"rate": 5}, 0.5)
    status, shown = await call(collection, "GET", "/proxies/p/toxics/slicer_upstream")
    assert shown["attributes"] == {"average_size": 64, "size_variation": 8, "delay": 1500}
    assert await call(collection, "DELETE", "/proxies/p/toxics/slicer_upstream") == (204, None)
    status, listing = await call(collection, "GET", "/proxies/p/toxics")
    assert [t["name"] for t in listing] == ["bandwidth_downstream"]


async def test_a_proxy_created_with_toxics_never_relays_without_them(
    collection: ProxyCollection, echo_address: Address
) -> None:
    upstream = f"{echo_address[0]}:{echo_address[1]}"
    status, proxy = await call(
        collection,
        "POST",
        "/proxies",
        {
            "name": "cut",
            "upstream": upstream,
            "toxics": [{"type": "limit_data", "stream": "upstream", "attributes": {"bytes": 7}}],
        },
    )
    assert status == 201
    assert [t["name"] for t in proxy["toxics"]] == ["limit_data_upstream"]
    echoed = await round_trip(parse_address(proxy["listen"]), b"0123456789")
    assert echoed == b"0123456"[: len(echoed)]
    assert collection.get("cut").stats().bytes_upstream == 7


async def test_populate_keeps_a_matching_proxy_and_replaces_a_moved_one(
    collection: ProxyCollection, echo_address: Address
) -> None:
    upstream = f"{echo_address[0]}:{echo_address[1]}"
    kept = await collection.create(ProxySpec("kept", ("127.0.0.1", 0), echo_address))
    kept.add_toxic(LimitData(bytes=1))
    await collection.create(ProxySpec("moved", ("127.0.0.1", 0), ("127.0.0.1", 9)))
    listen = f"127.0.0.1:{kept.address[1]}"

    status, answer = await call(
        collection,
        "POST",
        "/populate",
        [
            {"name": "kept", "listen": listen, "upstream": upstream},
            {"name": "moved", "listen": "127.0.0.1:0", "upstream": upstream},
        ],
    )

    assert status == 201
    assert [p["name"] for p in answer["proxies"]] == ["kept", "moved"]
    assert collection.get("kept") is kept
    assert kept.toxics() != ()  # left alone, toxics and all
    assert collection.get("moved").upstream == echo_address


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("GET", "/proxies/ghost", None, 404, "no proxy named 'ghost'"),
        ("GET", "/proxies/p/toxics/ghost", None, 404, "no toxic named 'ghost'"),
        ("POST", "/proxies", {"upstream": "127.0.0.1:1"}, 400, "missing required field: name"),
        ("POST", "/proxies", {"name": "q"}, 400, "missing required field: upstream"),
        ("POST", "/proxies", {"name": "q", "upstream": "nowhere"}, 400, "expected HOST:PORT"),
        ("POST", "/proxies", {"name": "p", "upstream": "127.0.0.1:1"}, 409, "already exists"),
        ("POST", "/proxies/p/toxics", {"type": "teleport"}, 400, "unknown toxic 'teleport'"),
        ("POST", "/proxies/p/toxics", {"type": "latency", "stream": "x"}, 400, "stream must"),
        (
            "POST",
            "/proxies/p/toxics",
            {"type": "latency", "attributes": {"ms": 5}},
            400,
            "latency: unknown attribute 'ms'; it takes latency, jitter",
        ),
        ("POST", "/proxies/p", {"enabled": "yes"}, 400, "'enabled' must be true or false"),
        ("PUT", "/proxies/p", {}, 405, "use GET, POST, PATCH, DELETE"),
    ],
)
async def test_bad_requests_get_toxiproxys_error_shape(
    collection: ProxyCollection,
    method: str,
    path: str,
    body: Any,
    status: int,
    message: str,
) -> None:
    await collection.create(ProxySpec("p", ("127.0.0.1", 0), ("127.0.0.1", 1)))

    got_status, answer = await call(collection, method, path, body)

    assert (got_status, message in answer["error"]) == (status, True), answer
    if status != 405:
        assert answer["status"] == status


async def test_a_proxy_moves_to_a_new_upstream(
    collection: ProxyCollection, echo_address: Address
) -> None:
    await collection.create(ProxySpec("p", ("127.0.0.1", 0), ("127.0.0.1", 9)))
    upstream = f"{echo_address[0]}:{echo_address[1]}"

    status, proxy = await call(collection, "PATCH", "/proxies/p", {"upstream": upstream})

    assert (status, proxy["upstream"], proxy["enabled"]) == (200, upstream, True)
    assert await round_trip(parse_address(proxy["listen"]), b"moved") == b"moved"


async def test_the_command_serves_toxiproxys_api_alone_with_a_config_file(
    echo_address: Address, tmp_path: Path
) -> None:
    upstream = f"{echo_address[0]}:{echo_address[1]}"
    config = tmp_path / "toxiproxy.json"
    config.write_text(
        json.dumps([{"name": "from_config", "listen": "127.0.0.1:0", "upstream": upstream}])
    )
    command = [sys.executable, "-m", "proxy.cli", "faultproxy", "--control", "127.0.0.1:0"]
    command += ["--config", str(config)]
    run = partial(trio.run_process, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    async with trio.open_nursery() as nursery:
        process = await nursery.start(partial(run, check=False))
        assert process.stdout is not None
        with trio.fail_after(60):  # a deadline against a hang, not a timing assertion
            proxy_line, control_line = await read_lines(process.stdout, 2)
            assert proxy_line.startswith("from_config: listening on 127.0.0.1:")
            control = parse_address(control_line.removeprefix("control API on http://"))

            client = toxiproxy.Toxiproxy()
            client.update_api_consumer(*control)
            created = await blocking(lambda: client.create(upstream=upstream, name="made"))
            assert sorted(await blocking(client.proxies)) == ["from_config", "made"]
            payload = os.urandom(10_000)
            assert await round_trip(parse_address(created.listen), payload) == payload

            process.send_signal(signal.SIGINT)
            await process.wait()
    assert process.returncode == 130


# -- toxic changes reach open connections, as Toxiproxy's do -------------------------------


async def test_the_python_client_changes_a_connection_already_open(
    client: toxiproxy.Toxiproxy, echo_address: Address
) -> None:
    upstream = f"{echo_address[0]}:{echo_address[1]}"
    proxy = await blocking(lambda: client.create(upstream=upstream, name="echo"))
    async with await trio.open_tcp_stream(*parse_address(proxy.listen)) as stream:
        await stream.send_all(b"hello")
        assert await stream.receive_some() == b"hello"

        await blocking(
            lambda: proxy.add_toxic(type="limit_data", stream="downstream", attributes={"bytes": 3})
        )
        await stream.send_all(b"world!")
        received = b""
        with trio.fail_after(30), suppress(trio.BrokenResourceError):
            while data := await stream.receive_some():
                received += data

    assert received == b"wor"  # counted from when the toxic came, not from the start


class Recorder:
    """An upstream that records what arrives and when (in trio time)."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, bytes]] = []
        self.finished = trio.Event()

    async def __call__(self, stream: trio.SocketStream) -> None:
        async with stream:
            with suppress(trio.BrokenResourceError):
                while data := await stream.receive_some():
                    self.arrivals.append((trio.current_time(), data))
            self.finished.set()


async def start_recorder(nursery: trio.Nursery) -> tuple[Recorder, Address]:
    recorder = Recorder()
    listeners = await nursery.start(partial(trio.serve_tcp, recorder, 0, host="127.0.0.1"))
    host, port = listeners[0].socket.getsockname()[:2]
    return recorder, (host, port)


async def test_a_timeout_taken_away_lets_an_open_connection_flow_again(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    mock_clock.autojump_threshold = 0.01
    recorder, upstream = await start_recorder(nursery)
    async with open_proxy_collection([ProxySpec("p", ("127.0.0.1", 0), upstream)]) as collection:
        proxy = collection.get("p")
        async with await trio.open_tcp_stream(*proxy.address) as stream:
            await stream.send_all(b"before ")
            await trio.sleep(1)
            proxy.add_toxic(Timeout(direction=Direction.UPSTREAM), "hold", live=True)
            await stream.send_all(b"dropped ")
            await trio.sleep(3600)  # nothing passes, and the connection stays open
            proxy.remove_toxic("hold", live=True)
            await stream.send_all(b"after")
            await stream.send_eof()
            await recorder.finished.wait()

    assert b"".join(data for _, data in recorder.arrivals) == b"before after"
    assert proxy.stats().faults == {"timeout": 1}


async def test_limit_time_added_to_an_open_connection_counts_from_then(
    mock_clock: trio.testing.MockClock, echo_address: Address
) -> None:
    mock_clock.autojump_threshold = 0.01
    async with open_proxy_collection(
        [ProxySpec("p", ("127.0.0.1", 0), echo_address)]
    ) as collection:
        proxy = collection.get("p")
        async with await trio.open_tcp_stream(*proxy.address) as stream:
            await trio.sleep(100)
            start = trio.current_time()
            proxy.add_toxic(LimitTime(ms=250), live=True)
            proxy.add_toxic(LimitData(bytes=1))  # not live: the open connection never sees it
            await stream.send_all(b"ping")
            assert await stream.receive_some() == b"ping"
            assert await stream.receive_some() == b""
            assert trio.current_time() - start == pytest.approx(0.25)


async def test_a_stall_taken_away_delivers_what_it_held_in_order(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    mock_clock.autojump_threshold = 0.01
    recorder, upstream = await start_recorder(nursery)
    spec = ProxySpec("p", ("127.0.0.1", 0), upstream, toxics=(Stall(after=4),))
    async with open_proxy_collection([spec]) as collection:
        proxy = collection.get("p")
        async with await trio.open_tcp_stream(*proxy.address) as stream:
            await stream.send_all(b"0123456789")  # one read: 4 pass, 6 are held
            await trio.sleep(3600)
            assert b"".join(data for _, data in recorder.arrivals) == b"0123"
            proxy.remove_toxic("stall_upstream", live=True)
            await trio.sleep(1)
            await stream.send_all(b"abc")
            await stream.send_eof()
            await recorder.finished.wait()

    assert b"".join(data for _, data in recorder.arrivals) == b"0123456789abc"


async def test_browsers_are_refused(collection: ProxyCollection) -> None:
    def from_a_browser() -> tuple[int, Any]:
        connection = http.client.HTTPConnection(*_control_of(collection), timeout=10)
        try:
            body = json.dumps({"name": "evil", "upstream": "127.0.0.1:22"})
            connection.request(
                "POST", "/proxies", body=body, headers={"User-Agent": "Mozilla/5.0 (X11)"}
            )
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    status, answer = await blocking(from_a_browser)

    assert (status, answer["status"]) == (403, 403)
    assert "browsers" in answer["error"]
    assert collection.proxies() == ()


async def test_proxies_and_toxics_are_limited(collection: ProxyCollection) -> None:
    for i in range(MAX_PROXIES):
        await collection.create(ProxySpec(f"p{i}", ("127.0.0.1", 0), ("127.0.0.1", 1), False))
    body = {"name": "one_more", "upstream": "127.0.0.1:1", "enabled": False}
    status, answer = await call(collection, "POST", "/proxies", body)
    assert (status, answer["error"]) == (429, f"this process already holds {MAX_PROXIES} proxies")

    proxy = collection.get("p0")
    for i in range(MAX_TOXICS):
        proxy.add_toxic(Latency(ms=i))
    status, answer = await call(collection, "POST", "/proxies/p0/toxics", {"type": "latency"})
    assert (status, answer["error"]) == (429, f"proxy 'p0' already has {MAX_TOXICS} toxics")
