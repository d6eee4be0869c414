"""One-request uploads straight from trio (:class:`~reliablewriter.http_posts.PostPool`).

The same rules as through ``requests`` (tests/reliablewriter/test_one_request.py): one POST
per object, faults retried, a lost answer settled by reading the object back and never by
sending again. Faults are real: faultnet's trio streams under the pool's connections
(resets, cut answers, stalls) and endpoints that answer badly on purpose. POSTs are counted
on the wire, by a stream that only counts, so "sent once" is measured.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import google.auth.credentials
import google_crc32c
import pytest
import requests
import trio
import trustme
from google.oauth2.credentials import Credentials

from faultnet.counters import FaultCounters
from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client, authorized_client
from faultnet.plan import FaultPlan
from faultnet.stream import open_tcp_stream
from faultnet.transport import FaultyHTTPAdapter
from reliablewriter import NonRetryableHTTPError, RetriesExhaustedError
from reliablewriter.checksum import crc32c_to_b64
from reliablewriter.http_posts import PostPool, post_pool_for
from reliablewriter.one_request import ObjectRequest, upload_in_one_request
from reliablewriter.transport import NoAnswer, Stored
from tests.reliablewriter.test_one_request import ONE_POST_ANSWERS, POLICY, _answer_once

from .conftest import KiB, Target, payload

TIMEOUTS = (2.0, 2.0)


class CountingStream(trio.abc.Stream):
    """Passes everything through, counting the POST request lines sent."""

    def __init__(self, inner: trio.abc.Stream, counts: list[int]) -> None:
        self.transport_stream = inner
        self._counts = counts

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._counts[0] += bytes(data).count(b"POST /upload/")
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.transport_stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


class Wire:
    """A pool's connector: faultnet streams, ``plan`` on the first ``faulty`` connections
    (all if None), every POST counted."""

    def __init__(self, plan: str = "", faulty: int | None = None) -> None:
        self.plan = FaultPlan.parse(plan)
        self.faulty = faulty
        self.counters = FaultCounters()
        self.connections = 0
        self._posts = [0]
        self._index = itertools.count()

    @property
    def posts(self) -> int:
        return self._posts[0]

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        index = next(self._index)
        self.connections += 1
        plan = self.plan if self.faulty is None or index < self.faulty else FaultPlan.parse("")
        stream = await open_tcp_stream(host, port, plan=plan, index=index, counters=self.counters)
        return CountingStream(stream, self._posts)


@pytest.fixture
def pools() -> Iterator[Callable[..., PostPool]]:
    made: list[PostPool] = []

    def make(url: str, **options: Any) -> PostPool:
        pool = PostPool(url, **options)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


async def store(
    target: Target, pool: PostPool, data: bytes, *, name: str = "small.bin", **options: Any
) -> Any:
    return await upload_in_one_request(
        target.bucket, ObjectRequest(name, data, **options), policy=POLICY, poster=pool,
        connect_timeout=TIMEOUTS[0], read_timeout=TIMEOUTS[1],
    )  # fmt: skip


async def test_objects_are_stored_with_one_post_each_on_one_kept_alive_connection(
    target: Target, pools: Callable[..., PostPool]
) -> None:
    wire = Wire()
    pool = pools(target.url, connect=wire.connect)
    for index in range(3):
        data = payload(4 * KiB)
        info = await store(target, pool, data, name=f"o{index}", content_type="text/plain",
                           metadata={"k": "v"}, if_generation_match=0)  # fmt: skip
        assert (info.size, info.crc32c) == (len(data), crc32c_to_b64(google_crc32c.value(data)))
        assert (info.content_type, info.metadata) == ("text/plain", {"k": "v"})
        assert target.read(f"o{index}") == data
    assert (wire.posts, wire.connections) == (3, 1)


async def test_a_reset_before_the_request_arrives_is_sent_again(
    target: Target, pools: Callable[..., PostPool]
) -> None:
    wire = Wire("reset_peer:up(after=100)", faulty=2)  # two connections cut while sending
    data = payload(8 * KiB)
    info = await store(target, pools(target.url, connect=wire.connect), data)
    assert wire.counters.faults_applied("reset_peer") == 2
    assert wire.posts == 3
    assert info.size == len(data)
    assert target.read("small.bin") == data


@pytest.mark.parametrize(
    "plan",
    [
        "reset_peer:down(after=100)",  # the answer reset after its head began
        "limit_data:down(bytes=150)",  # the answer cut cleanly in its body
        "stall:down(after=0, seconds=0)",  # no answer at all: the read timeout ends it
    ],
)
@pytest.mark.parametrize("precondition", [None, 0])
async def test_a_lost_answer_is_settled_by_reading_back_never_by_sending_again(
    target: Target, pools: Callable[..., PostPool], plan: str, precondition: int | None
) -> None:
    wire = Wire(plan, faulty=1)
    data = payload(8 * KiB)
    pool = pools(target.url, connect=wire.connect)
    with trio.fail_after(10):
        info = await upload_in_one_request(
            target.bucket, ObjectRequest("small.bin", data, if_generation_match=precondition),
            policy=POLICY, poster=pool, connect_timeout=1.0, read_timeout=0.5,
        )  # fmt: skip
    assert wire.counters.faults_applied(plan.split(":")[0]) == 1
    assert wire.posts == 1  # stored once: the read back found it ours
    assert info.size == len(data)
    assert info.generation == target.bucket.get_blob("small.bin").generation
    assert target.read("small.bin") == data


async def test_a_large_body_on_a_slow_link_is_sent_while_it_moves_and_sent_again_if_it_stalls(
    target: Target, pools: Callable[..., PostPool]
) -> None:
    # 2 MiB at 4 MiB/s takes about 0.5 s, longer than the read timeout: each slice is due
    # within it, not the whole body. Then a send that stops after 1 MiB times out; nothing
    # was stored (the read back finds nothing), so it is sent again, on a new connection.
    for plan, posts in (("bandwidth:up(rate=4m)", 1), ("stall:up(after=1m, seconds=0)", 2)):
        data = payload(2 * 1024 * KiB)
        wire = Wire(plan, faulty=1)
        with trio.fail_after(10):
            info = await upload_in_one_request(
                target.bucket, ObjectRequest("large.bin", data), policy=POLICY,
                poster=pools(target.url, connect=wire.connect), read_timeout=0.3,
            )  # fmt: skip
        assert wire.posts == posts
        assert wire.counters.faults_applied(plan.split(":")[0]) >= 1
        assert info.size == len(data)
        assert target.read("large.bin") == data


async def test_a_cancelled_upload_waits_for_the_request_it_sent(
    target: Target, pools: Callable[..., PostPool]
) -> None:
    wire = Wire("latency:down(ms=500)")
    data = payload(4 * KiB)
    pool = pools(target.url, connect=wire.connect)
    started = trio.current_time()
    with trio.move_on_after(0.1) as scope:
        info = await store(target, pool, data)
    assert scope.cancel_called
    assert trio.current_time() - started >= 0.5
    assert info.generation == target.bucket.get_blob("small.bin").generation
    assert target.read("small.bin") == data


async def test_retries_end_under_the_policy(target: Target, pools: Callable[..., PostPool]) -> None:
    wire = Wire("reset_peer:up(after=0)")  # no request ever arrives whole
    with pytest.raises(RetriesExhaustedError) as exhausted:
        await store(target, pools(target.url, connect=wire.connect), payload(KiB))
    assert exhausted.value.attempts == POLICY.max_attempts
    assert target.object_names() == []


async def test_a_precondition_that_does_not_hold_is_refused_once(
    target: Target, pools: Callable[..., PostPool]
) -> None:
    wire = Wire()
    pool = pools(target.url, connect=wire.connect)
    await store(target, pool, b"first")
    with pytest.raises(NonRetryableHTTPError) as refused:
        await store(target, pool, b"second", if_generation_match=0)
    assert refused.value.status == 412
    assert wire.posts == 2
    assert target.read("small.bin") == b"first"


async def test_a_connection_the_endpoint_closed_while_idle_is_not_used_again(
    gcs_bucket: str, pools: Callable[..., PostPool]
) -> None:
    with GcsServer(idle_timeout=0.2) as server:
        server.store.create_bucket(gcs_bucket)
        target = Target(server.url, gcs_bucket, anonymous_client(server.url)._http, server)
        wire = Wire()
        pool = pools(server.url, connect=wire.connect)
        await store(target, pool, b"one", name="one")
        await trio.sleep(0.6)  # the endpoint closes the idle connection meanwhile
        await store(target, pool, b"two", name="two")
        assert (wire.posts, wire.connections) == (2, 2)
        assert target.read("two") == b"two"


async def test_the_bearer_of_the_session_is_sent_and_a_refused_one_is_final(
    gcs_bucket: str, pools: Callable[..., PostPool]
) -> None:
    with GcsServer(access_token="right-token") as server:
        server.store.create_bucket(gcs_bucket)
        client = authorized_client(server.url, "right-token")
        client._http.trust_env = False
        pool = post_pool_for(client._http, server.url)
        assert pool is not None
        bucket = client.bucket(gcs_bucket)
        info = await upload_in_one_request(
            bucket, ObjectRequest("o", b"data"), policy=POLICY, poster=pool
        )
        assert info.size == 4
        wrong = PostPool(server.url, credentials=Credentials(token="wrong-token"))  # type: ignore[no-untyped-call]
        with pytest.raises(NonRetryableHTTPError) as refused:
            await upload_in_one_request(
                bucket, ObjectRequest("p", b"data"), policy=POLICY, poster=wrong
            )
        assert refused.value.status == 401
        await pool.aclose()
        await wrong.aclose()


class Rotating(google.auth.credentials.Credentials):
    """Credentials that hold no token until refreshed, then each of ``tokens`` in turn."""

    def __init__(self, *tokens: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._tokens = iter(tokens)
        self.refreshes = 0

    def refresh(self, request: Any) -> None:
        self.token = next(self._tokens)
        self.refreshes += 1


async def test_a_token_not_in_hand_is_fetched_and_a_refused_one_refreshed_once(
    gcs_bucket: str,
) -> None:
    with GcsServer(access_token="right-token") as server:
        server.store.create_bucket(gcs_bucket)
        bucket = authorized_client(server.url, "right-token").bucket(gcs_bucket)
        credentials = Rotating("revoked-token", "right-token")
        pool = PostPool(server.url, credentials=credentials)
        info = await upload_in_one_request(
            bucket, ObjectRequest("o", b"data"), policy=POLICY, poster=pool
        )
        assert info.size == 4
        assert credentials.refreshes == 2  # before the first POST, and after its 401
        await pool.aclose()


def _settled_session(url: str) -> requests.Session:
    """A client's session that has read its environment once, as rup serve's has."""
    session: requests.Session = anonymous_client(url)._http
    session.trust_env = False
    return session


@pytest.mark.parametrize(
    "change",
    [
        lambda session: session.mount("http://", FaultyHTTPAdapter(FaultPlan.parse(""))),
        lambda session: setattr(session, "trust_env", True),  # reads proxies per request
        lambda session: session.proxies.update(http="http://proxy.invalid:3128"),
        lambda session: session.headers.update({"x-retry-test-id": "t"}),
        lambda session: session.hooks["response"].append(print),
        lambda session: setattr(session, "auth", ("user", "password")),
        lambda session: setattr(session, "verify", False),
    ],
)
def test_a_session_doing_what_the_pool_cannot_gets_no_pool(
    gcs_server: GcsServer, change: Callable[[requests.Session], object]
) -> None:
    session = _settled_session(gcs_server.url)
    pool = post_pool_for(session, gcs_server.url)
    assert pool is not None
    pool.close()
    change(session)
    assert post_pool_for(session, gcs_server.url) is None


async def test_a_token_that_cannot_be_a_header_is_never_sent_nor_told(
    target: Target, pools: Callable[..., PostPool]
) -> None:
    secret = "abc\r\nx-injected: yes"
    wire = Wire()
    credentials = Credentials(token=secret)  # type: ignore[no-untyped-call]
    pool = pools(target.url, connect=wire.connect, credentials=credentials)
    with pytest.raises(RetriesExhaustedError) as exhausted:
        await store(target, pool, b"data")
    assert wire.posts == 0
    assert "abc" not in str(exhausted.value)
    assert exhausted.value.__cause__ is None


def test_connections_of_an_earlier_run_are_dropped(
    strict_target: Target, pools: Callable[..., PostPool]
) -> None:
    wire = Wire()
    pool = pools(strict_target.url, connect=wire.connect)
    for name in ("first", "second"):
        trio.run(functools.partial(store, strict_target, pool, name.encode(), name=name))
    assert (wire.posts, wire.connections) == (2, 2)


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture
async def tls_endpoint(gcs_server: GcsServer, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """``https://localhost:PORT`` in front of the strict endpoint (a TLS-terminating relay);
    yields its URL and the CA file that vouches for it."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    host, port = gcs_server.address

    async def relay(client: trio.SSLStream[trio.SocketStream]) -> None:
        async with client, await trio.open_tcp_stream(host, port) as upstream:

            async def pump(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
                try:
                    while data := await source.receive_some(65536):
                        await sink.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # either side went away: the relay's connection ends

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_ssl_over_tcp, relay, 0, context, host="127.0.0.1")
        )
        bound = listeners[0].transport_listener.socket.getsockname()
        yield f"https://localhost:{bound[1]}", ca_file
        nursery.cancel_scope.cancel()


async def test_an_https_endpoint_is_reached_over_verified_tls(
    tls_endpoint: tuple[str, Path], gcs_bucket: str, gcs_server: GcsServer
) -> None:
    url, ca_file = tls_endpoint
    bucket = anonymous_client(url).bucket(gcs_bucket)
    pool = PostPool(url, ca_bundle=str(ca_file))
    info = await upload_in_one_request(bucket, ObjectRequest("tls", b"secret"), policy=POLICY,
                                       poster=pool)  # fmt: skip
    assert info.size == 6
    assert anonymous_client(gcs_server.url).bucket(gcs_bucket).get_blob("tls").size == 6
    # Without the CA, the endpoint is not trusted: nothing is sent, however often tried.
    untrusting = PostPool(url)
    outcome = await untrusting.post(
        f"{url}/upload/storage/v1/b/{gcs_bucket}/o?uploadType=multipart", b"x", "text/plain",
        TIMEOUTS,
    )  # fmt: skip
    assert outcome == NoAnswer("connection")
    await pool.aclose()
    await untrusting.aclose()


# -- what one POST came to, from answers written on a raw socket --------------------------

_GZIPPED = gzip.compress(b'{"size": "3"}')


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        *ONE_POST_ANSWERS,
        (  # shorter than its length
            b'HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{"size": "3"}',
            NoAnswer("truncated-response"),
        ),
        (  # cut inside its head
            b"HTTP/1.1 200 OK\r\nContent-Len",
            NoAnswer("malformed-response"),
        ),
        (b"", NoAnswer("connection")),  # closed without a word
        (  # compressed though not asked to be
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: "
            + str(len(_GZIPPED)).encode()
            + b"\r\n\r\n"
            + _GZIPPED,
            Stored({"size": "3"}),
        ),
        (b"garbage\r\n\r\n", NoAnswer("malformed-response")),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'e\r\n{"size": "3"}\n\r\n0\r\n\r\n',
            Stored({"size": "3"}),
        ),
    ],
)
async def test_what_one_post_came_to(answer: bytes, outcome: object) -> None:
    url, server = _answer_once(answer)
    pool = PostPool(url.removesuffix("/upload"))
    got = await pool.post(url, b"body", "multipart/related", TIMEOUTS)
    await trio.to_thread.run_sync(server.join, 10)
    await pool.aclose()
    assert got == outcome
