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

import functools
import itertools
import json
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
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
SEGMENTS = OBJECT_SIZE // (SEGMENT_MIB * MiB)
#: every upload composite, in segments of 1 MiB, as many at once as the client has connections
SERVE_ARGS = [
    "--no-create-buckets", "--composite", "always", "--segment-size-mib", str(SEGMENT_MIB),
    "--parallel-segments", str(CONNECTIONS), "--json-logs",
]  # fmt: skip

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
class Instances:
    """The endpoint and the instances, started once for the module: their start-up (mostly
    imports, four processes on shared cores) costs more than an upload here."""

    endpoint_url: str
    endpoint: RupProcess
    instances: list[RupProcess]


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instances]:
    directory = tmp_path_factory.mktemp("cross-instance")
    gcs_port = free_port()
    endpoint_url = f"http://127.0.0.1:{gcs_port}"
    endpoint = RupProcess("gcs", ["gcs-server", "--port", str(gcs_port)], directory)
    key = {"RUP_TOKEN_KEY": generate_key_text()}
    proxies = [
        RupProcess(
            f"proxy-{index}",
            ["serve", "--listen", "127.0.0.1:0", "--gcs-endpoint", endpoint_url, *SERVE_ARGS],
            directory,
            env=key,
        )
        for index in range(INSTANCES)
    ]
    with running(endpoint, *proxies):
        # All at once: their start-ups overlap.
        for process in (endpoint, *proxies):
            process.start()
        endpoint.wait_for(r"http://127\.0\.0\.1:\d+")
        yield Instances(endpoint_url, endpoint, proxies)


@dataclass
class Cluster:
    """A test's view: the instances (index ``i`` is the balancer's upstream ``i``), the
    balancer in front of them, and a bucket of the test's own."""

    endpoint_url: str
    instances: list[RupProcess]
    balancer: RoundRobinBalancer
    address: Address
    bucket: str

    def reader(self) -> storage.Client:
        return anonymous_client(self.endpoint_url)


_buckets = itertools.count()


@pytest.fixture
async def cluster(instances: Instances) -> AsyncIterator[Cluster]:
    """Every instance running (one a test killed is started again, on a new port), and a
    balancer in front of them."""
    for instance in instances.instances:
        if instance.popen is None or instance.popen.poll() is not None:
            instance.start()
    bucket = f"cross-instance-{next(_buckets)}"
    reader = anonymous_client(instances.endpoint_url)
    await in_thread(lambda: reader.create_bucket(bucket))
    upstreams = [await in_thread(instance.listening_on) for instance in instances.instances]
    balancer = RoundRobinBalancer(upstreams)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(balancer.serve)
        yield Cluster(instances.endpoint_url, instances.instances, balancer, address, bucket)
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


def segments(instance: RupProcess, name: str, cluster: Cluster) -> set[str]:
    """The temporary objects (segments) of the test's bucket named in the instance's
    ``name`` events."""
    return {
        event["object"]
        for event in events(instance, name)
        if event.get("bucket") == cluster.bucket and event["object"].startswith(TEMP_PREFIX)
    }


def composed(instance: RupProcess, cluster: Cluster) -> int:
    """How many composite uploads of the test's bucket the instance composed."""
    uploads = {
        name.rsplit("/", 2)[-2]
        for each in cluster.instances
        for name in segments(each, "upload-opened", cluster)
    }
    return sum(event["upload"] in uploads for event in events(instance, "composite-completed"))


def temporaries(cluster: Cluster) -> list[str]:
    reader = cluster.reader()
    return [blob.name for blob in reader.list_blobs(cluster.bucket, prefix=TEMP_PREFIX)]


def check_object(cluster: Cluster, name: str, data: bytes, result: UploadResult) -> None:
    """The object is the source byte for byte, composed, and nothing temporary is left."""
    assert result.composite
    assert result.segments == SEGMENTS
    assert (result.size, result.crc32c, result.md5) == (len(data), google_crc32c.value(data), None)
    blob = cluster.reader().bucket(cluster.bucket).get_blob(name)
    assert blob is not None
    assert blob.component_count is not None
    assert blob.component_count > 1
    assert blob.md5_hash is None
    assert blob.download_as_bytes() == data
    assert temporaries(cluster) == []


async def test_one_upload_is_stored_by_three_instances_behind_a_balancer(
    cluster: Cluster, source: tuple[Path, bytes]
) -> None:
    path, data = source
    with trio.fail_after(25):
        result = await upload_file(path, f"gs://{cluster.bucket}/spread.bin", options(cluster))
    await in_thread(lambda: check_object(cluster, "spread.bin", data, result))
    assert result.reconnects == 0
    assert result.connections == CONNECTIONS  # eight segments at a time
    stored_by = [segments(each, "upload-completed", cluster) for each in cluster.instances]
    # Every instance stored some of the segments, and each segment was stored once.
    assert all(stored_by), [len(stored) for stored in stored_by]
    assert sum(len(stored) for stored in stored_by) == SEGMENTS
    assert len(set().union(*stored_by)) == SEGMENTS
    # One of them composed the object from what they all stored.
    assert sorted(composed(each, cluster) for each in cluster.instances) == [0, 0, 1]
    assert all(cluster.balancer.connections[i] for i in range(INSTANCES))
    assert not cluster.balancer.refused


async def test_an_instance_killed_mid_segment_leaves_the_upload_to_the_others(
    cluster: Cluster, source: tuple[Path, bytes]
) -> None:
    path, data = source
    finished = trio.Event()
    outcome: list[UploadResult] = []

    async def upload() -> None:
        url = f"gs://{cluster.bucket}/survivor.bin"
        outcome.append(await upload_file(path, url, options(cluster)))
        finished.set()

    async def kill_one_mid_segment() -> tuple[int, set[str], list[str]]:
        """Once GCS holds a segment, SIGKILL an instance writing one it has not stored (it
        logs a segment stored before the client hears of it): (which, the segments it was
        writing, what GCS held then)."""
        while True:
            assert not finished.is_set(), "the upload finished before an instance could be killed"
            stored = await in_thread(lambda: temporaries(cluster))
            for index, instance in enumerate(cluster.instances):
                writing = segments(instance, "upload-opened", cluster) - segments(
                    instance, "upload-completed", cluster
                )
                if stored and writing and not finished.is_set():
                    instance.send_signal(signal.SIGKILL)
                    await in_thread(functools.partial(instance.wait, timeout=10))
                    return index, writing, stored
            await trio.sleep(0.02)

    with trio.fail_after(25):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            victim, writing, stored_then = await kill_one_mid_segment()
            # mid-upload: some segments were stored, not all, and nothing was composed
            assert not finished.is_set()
            assert 0 < len(stored_then) < SEGMENTS
    (result,) = outcome
    await in_thread(lambda: check_object(cluster, "survivor.bin", data, result))
    # The client lost the dead instance's connections and carried on through the others;
    # the balancer found it refusing and passed over it.
    assert result.reconnects >= 1
    assert cluster.balancer.refused[victim] >= 1
    survivors = [each for index, each in enumerate(cluster.instances) if index != victim]
    stored_after = set().union(*(segments(each, "upload-completed", cluster) for each in survivors))
    # What the dead instance was writing, the others stored (resumed with the segment's
    # token, or opened again), and one of them composed the object.
    assert writing <= stored_after
    assert sum(composed(each, cluster) for each in survivors) == 1
