"""PUT_OBJECT stored straight from trio: the backend has a poster, as ``rup serve`` gives it.

Every test of tests/proxy/server/test_put_object.py runs here again with that backend (they
are imported below, so pytest collects them with this module's ``proxy_backend``); then
what only this path has: its POSTs timed like the session's requests, and a lost answer on
the GCS leg (faultnet on the pool's connections) settled by reading back, stored once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import google_crc32c
import pytest
import trio

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from faultnet.plan import FaultPlan
from faultnet.tcpproxy import open_chaos_proxy
from protocol import Complete, Completed, PutObject
from proxy.client import UploadOptions, UploadResult, upload_many
from proxy.server import ProxyServer, serve_in_background
from proxy.server.backend import Backend, GcsTarget, TargetKind, open_backend
from proxy.server.settings import KiB, ServerSettings
from reliablewriter import RetryPolicy
from reliablewriter.http_posts import PostPool
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_put_object import (  # noqa: F401 - collected again, here
    V2,
    test_a_crc32c_that_is_not_the_bytes_is_a_checksum_mismatch_and_stores_nothing,
    test_a_name_gcs_refuses_is_an_invalid_request,
    test_a_precondition_that_does_not_hold_is_refused_and_the_object_kept,
    test_a_whole_object_is_stored_in_one_exchange_and_the_connection_stays_idle,
    test_an_object_outside_the_allow_list_is_forbidden,
    test_pipelined_put_objects_are_each_answered_once,
)
from tests.reliablewriter.test_one_request_trio import Wire

Connect = Callable[..., Awaitable[RawClient]]


@pytest.fixture
def wire() -> Wire:
    """The GCS leg's connections: the first one's answers are cut after 100 bytes."""
    return Wire("reset_peer:down(after=100)", faulty=0)


@pytest.fixture
def proxy_backend(gcs_server: GcsServer, wire: Wire) -> Iterator[Backend]:
    pool = PostPool(gcs_server.url, connect=wire.connect)
    yield Backend(anonymous_client(gcs_server.url), TargetKind.EMBEDDED, gcs_server.url,
                  poster=pool)  # fmt: skip
    pool.close()


def _posts(server: ProxyServer, outcome: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "rup_gcs_request_duration_seconds_count", {"method": "POST", "outcome": outcome}
    )
    return value or 0.0


async def test_posts_are_timed_like_the_sessions_requests(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str, wire: Wire
) -> None:
    client = await raw_client(proxy_server, versions=V2)
    for index in range(3):
        await client.send(PutObject(gcs_bucket, f"timed/{index}", b"x" * index))
        with trio.fail_after(10):
            await client.reply(Completed)
    await client.send(PutObject(gcs_bucket, "timed/0", b"y", if_generation_match=0))
    await client.error()
    assert _posts(proxy_server, "success") == 3
    assert _posts(proxy_server, "client_error") == 1  # the 412
    assert wire.posts == 4
    assert wire.connections == 1  # one kept-alive connection for all of them


async def test_a_lost_answer_on_the_gcs_leg_is_settled_and_the_object_stored_once(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str, wire: Wire
) -> None:
    wire.faulty = 1  # the first connection's answer is cut
    client = await raw_client(proxy_server, versions=V2)
    data = os.urandom(16 * KiB)
    await client.send(PutObject(gcs_bucket, "lost.bin", data, if_generation_match=0))
    with trio.fail_after(20):
        completed = await client.reply(Completed)
    assert wire.counters.faults_applied("reset_peer") == 1
    assert wire.posts == 1  # settled by reading back: never a second write
    blob = proxy_server.backend.client.bucket(gcs_bucket).get_blob("lost.bin")
    assert (completed.size, completed.generation) == (len(data), blob.generation)
    assert _posts(proxy_server, "network_error") == 1


async def test_many_small_objects_through_a_faulty_gcs_leg_are_all_stored_intact(
    proxy_settings: ServerSettings, gcs_server: GcsServer, gcs_bucket: str, tmp_path: Path
) -> None:
    # rup serve's own backend (open_backend: a PostPool) reaches GCS through faultnet's TCP
    # chaos proxy: some connections are reset in the answer (the object stored, its JSON
    # lost), some answers never come (the read timeout ends them). Every object is stored
    # whole, and the client is told so.
    plan = FaultPlan.parse("seed=5; reset_peer:down(after=200)~0.3; stall:down(after=0)~0.1")
    writer = dataclasses.replace(
        proxy_settings.writer,
        progress_timeout=0.5,
        retry=RetryPolicy(max_attempts=20, initial_delay=0.01, max_delay=0.05, deadline=30.0),
    )
    settings = dataclasses.replace(proxy_settings, writer=writer)
    files = {}
    for index in range(40):
        path = tmp_path / f"{index}.bin"
        path.write_bytes(os.urandom(1000 + index))
        files[path] = f"gs://{gcs_bucket}/chaos/{index}"
    async with open_chaos_proxy(gcs_server.address, plan) as chaos:
        host, port = chaos.address
        target = GcsTarget(endpoint=f"http://{host}:{port}", create_buckets=False)
        with open_backend(target) as backend:
            assert backend.poster is not None
            async with serve_in_background(settings, backend) as server:
                with trio.fail_after(60):
                    outcomes = await upload_many(
                        list(files.items()), UploadOptions(proxy=server.address), concurrency=8
                    )
        faults = chaos.stats().faults
    assert faults.get("reset_peer", 0) >= 1
    assert faults.get("stall", 0) >= 1
    judge = anonymous_client(gcs_server.url).bucket(gcs_bucket)
    for (path, _), outcome in zip(files.items(), outcomes, strict=True):
        assert isinstance(outcome, UploadResult), outcome
        blob = judge.get_blob(f"chaos/{path.stem}")
        assert (outcome.size, outcome.generation) == (blob.size, blob.generation)
        assert blob.download_as_bytes() == path.read_bytes()


async def test_an_upload_stored_at_complete_goes_the_same_way(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str, wire: Wire
) -> None:
    # Sent the long way (OPEN_UPLOAD, WRITE_AT, COMPLETE) but declared small enough to be
    # stored by one request at COMPLETE: that request goes through the pool too.
    data = os.urandom(100 * KiB)
    client = await raw_client(proxy_server)
    await client.open(gcs_bucket, "the-long-way.bin", expected_size=len(data))
    await client.write(0, data)
    await client.send(Complete(len(data), google_crc32c.value(data)))
    with trio.fail_after(10):
        assert (await client.reply(Completed)).size == len(data)
    assert wire.posts == 1
    assert _posts(proxy_server, "success") == 1
    stored = anonymous_client(proxy_server.backend.url).bucket(gcs_bucket).blob("the-long-way.bin")
    assert await trio.to_thread.run_sync(stored.download_as_bytes) == data
