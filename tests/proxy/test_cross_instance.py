"""One composite upload spread over three proxy instances, with real processes (issue 15, item 5).

Three ``rup serve`` processes share a token key and one external ``rup gcs-server``; GCS is
all they share. In front of them sits :class:`RoundRobinBalancer`, a TCP load balancer of
the plainest kind (each accepted connection goes to the next instance that accepts it), so
the eight connections of one upload land on all three. The client is the library
(:func:`proxy.client.upload_file`), told only the balancer's address.

What an instance did is read from its own JSON log lines: each segment it stored is an
``upload-completed`` of ``.rup/tmp/<upload>/<index>``. The object is then read back from
the endpoint: byte for byte, composed (``componentCount`` > 1, no MD5), and nothing left
under the temporary prefix.

The second test SIGKILLs an instance while it is writing a segment, once some segments
are already in GCS, and checks that the upload completes through the two others.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import pytest
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.gcs.clients import anonymous_client
from proxy.client import ClientSettings, UploadOptions, UploadProgress, UploadResult, upload_file
from proxy.server.keys import generate_key_text
from tests.proxy.server.processes import RupProcess, free_port, running

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
INSTANCES = 3
CONNECTIONS = 8
SEGMENT_MIB = 1
#: 32 segments: four rounds of eight, enough for every instance to get several
OBJECT_SIZE = 32 * SEGMENT_MIB * MiB
TEMP_PREFIX = ".rup/tmp/"
BUCKET = "cross-instance"

Address = tuple[str, int]


class RoundRobinBalancer:
    """A TCP load balancer: each accepted connection is relayed to the next upstream that
    accepts one (an upstream refusing, or slower than ``connect_timeout``, is skipped for
    that connection), both ways, until either side closes; then both are closed.

    Bounded: at most ``max_connections`` relayed at once (more wait to be accepted), each
    upstream tried once per connection. ``connections[i]`` counts the connections relayed
    to upstream ``i``; ``refused[i]`` the times it could not be reached.
    """

    def __init__(
        self,
        upstreams: list[Address],
        *,
        max_connections: int = 64,
        connect_timeout: float = 2.0,
    ) -> None:
        self.upstreams = upstreams
        self.connections: Counter[int] = Counter()
        self.refused: Counter[int] = Counter()
        self._turns = itertools.cycle(range(len(upstreams)))
        self._limit = trio.CapacityLimiter(max_connections)
        self._connect_timeout = connect_timeout

    async def serve(self, *, task_status: trio.TaskStatus[Address]) -> None:
        """Listen on a free loopback port (reported at start) until cancelled; cancelling
        closes every relayed connection."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._relay, listeners)
            task_status.started((host, port))

    async def _relay(self, downstream: trio.SocketStream) -> None:
        async with self._limit, downstream:
            upstream = await self._connect()
            if upstream is None:
                return  # every instance down: the client sees the connection close
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(_pump, downstream, upstream, nursery.cancel_scope)
                nursery.start_soon(_pump, upstream, downstream, nursery.cancel_scope)

    async def _connect(self) -> trio.SocketStream | None:
        for _ in self.upstreams:
            index = next(self._turns)
            with trio.move_on_after(self._connect_timeout):
                try:
                    stream = await trio.open_tcp_stream(*self.upstreams[index])
                except OSError:
                    pass
                else:
                    self.connections[index] += 1
                    return stream
            self.refused[index] += 1
        return None


async def _pump(
    source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, both: trio.CancelScope
) -> None:
    """Copy ``source`` to ``sink`` until either ends, then end the pair: a proxy that dies
    closes its client's connection too, as a real balancer's would."""
    try:
        while data := await source.receive_some(64 * 1024):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        both.cancel()


@dataclass
class Cluster:
    """The endpoint, the instances (index ``i`` is the balancer's upstream ``i``) and
    the balancer in front of them."""

    endpoint_url: str
    instances: list[RupProcess]
    balancer: RoundRobinBalancer
    address: Address

    def reader(self) -> storage.Client:
        return anonymous_client(self.endpoint_url)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    gcs_port = free_port()
    endpoint_url = f"http://127.0.0.1:{gcs_port}"
    endpoint = RupProcess("gcs", ["gcs-server", "--port", str(gcs_port)], tmp_path)
    key = {"RUP_TOKEN_KEY": generate_key_text()}
    instances = [
        RupProcess(
            f"proxy-{index}",
            ["serve", "--listen", "127.0.0.1:0", "--gcs-endpoint", endpoint_url,
             "--no-create-buckets", "--composite", "always",
             "--segment-size-mib", str(SEGMENT_MIB), "--parallel-segments", str(CONNECTIONS),
             "--json-logs"],
            tmp_path,
            env=key,
        )  # fmt: skip
        for index in range(INSTANCES)
    ]
    with running(endpoint, *instances):
        # All at once: their start-ups (imports, mostly) overlap.
        for process in (endpoint, *instances):
            process.start()
        await in_thread(lambda: endpoint.wait_for(r"http://127\.0\.0\.1:\d+"))
        await in_thread(lambda: anonymous_client(endpoint_url).create_bucket(BUCKET))
        upstreams = [await in_thread(instance.listening_on) for instance in instances]
        balancer = RoundRobinBalancer(upstreams)
        async with trio.open_nursery() as nursery:
            address = await nursery.start(balancer.serve)
            yield Cluster(endpoint_url, instances, balancer, address)
            nursery.cancel_scope.cancel()


async def in_thread(work: Callable[[], Any]) -> Any:
    """A blocking call (a process's output, GCS) without stopping the balancer."""
    return await trio.to_thread.run_sync(work)


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(OBJECT_SIZE)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


def options(cluster: Cluster, progress: Callable[[UploadProgress], None] | None = None) -> Any:
    return UploadOptions(
        proxy=cluster.address,
        settings=ClientSettings(connections=CONNECTIONS),
        progress=progress,
    )


def events(instance: RupProcess, name: str) -> list[dict[str, str]]:
    """The instance's log events called ``name`` (every run of it)."""
    found = []
    for line in instance.stderr(all_runs=True).splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


def segments(instance: RupProcess, name: str) -> set[str]:
    """The temporary objects (segments) named in the instance's ``name`` events."""
    return {
        event["object"]
        for event in events(instance, name)
        if event.get("object", "").startswith(TEMP_PREFIX)
    }


def temporaries(cluster: Cluster) -> list[str]:
    reader = cluster.reader()
    return [blob.name for blob in reader.list_blobs(BUCKET, prefix=TEMP_PREFIX)]


def check_object(cluster: Cluster, name: str, data: bytes, result: UploadResult) -> None:
    """The object is the source byte for byte, composed, and nothing temporary is left."""
    assert result.composite
    assert result.segments == OBJECT_SIZE // (SEGMENT_MIB * MiB)
    assert (result.size, result.crc32c, result.md5) == (len(data), google_crc32c.value(data), None)
    blob = cluster.reader().bucket(BUCKET).get_blob(name)
    assert blob is not None
    assert blob.component_count is not None and blob.component_count > 1
    assert blob.md5_hash is None
    assert blob.download_as_bytes() == data
    assert temporaries(cluster) == []


async def test_one_upload_is_stored_by_three_instances_behind_a_balancer(
    cluster: Cluster, source: tuple[Path, bytes]
) -> None:
    path, data = source
    with trio.fail_after(25):
        result = await upload_file(path, f"gs://{BUCKET}/spread.bin", options(cluster))
    await in_thread(lambda: check_object(cluster, "spread.bin", data, result))
    assert result.reconnects == 0
    stored_by = [segments(instance, "upload-completed") for instance in cluster.instances]
    # Every instance stored some of the segments, and each segment was stored once.
    assert all(stored_by), [len(stored) for stored in stored_by]
    assert sum(len(stored) for stored in stored_by) == result.segments
    assert len(set().union(*stored_by)) == result.segments
    # One of them composed the object from what the others stored.
    composed = [len(events(instance, "composite-completed")) for instance in cluster.instances]
    assert sorted(composed) == [0, 0, 1]
    assert all(cluster.balancer.connections[i] for i in range(INSTANCES))
    assert not cluster.balancer.refused


async def test_an_instance_killed_mid_segment_leaves_the_upload_to_the_others(
    cluster: Cluster, source: tuple[Path, bytes]
) -> None:
    path, data = source
    finished = trio.Event()
    outcome: list[UploadResult] = []

    async def upload() -> None:
        outcome.append(await upload_file(path, f"gs://{BUCKET}/survivor.bin", options(cluster)))
        finished.set()

    async def kill_one_mid_segment() -> tuple[int, set[str], list[str]]:
        """Once GCS holds a segment, SIGKILL an instance writing one that is not stored yet:
        (which, the segments it was writing, what GCS held then)."""
        while True:
            stored = await in_thread(lambda: temporaries(cluster))
            for index, instance in enumerate(cluster.instances):
                writing = segments(instance, "upload-opened") - segments(
                    instance, "upload-completed"
                )
                if stored and writing and not finished.is_set():
                    instance.send_signal(signal.SIGKILL)
                    await in_thread(lambda: instance.wait(timeout=10))
                    return index, writing, stored
            await trio.sleep(0.02)

    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            victim, writing, stored_then = await kill_one_mid_segment()
            # the kill came mid-upload: some segments stored, not all, nothing composed
            assert not finished.is_set()
            assert 0 < len(stored_then) < OBJECT_SIZE // (SEGMENT_MIB * MiB)
    (result,) = outcome
    await in_thread(lambda: check_object(cluster, "survivor.bin", data, result))
    # The client lost the dead instance's connections and carried on through the others.
    assert result.reconnects >= 1
    assert cluster.balancer.refused[victim] >= 1
    survivors = [instance for index, instance in enumerate(cluster.instances) if index != victim]
    stored_after = set().union(*(segments(instance, "upload-completed") for instance in survivors))
    # The segments the dead instance was writing were stored by the others.
    assert writing <= stored_after
    assert sum(len(events(instance, "composite-completed")) for instance in survivors) == 1
