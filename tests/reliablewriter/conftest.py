"""Fixtures for the writer tests: a strict GCS endpoint reached through a chosen transport."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.counters import FaultCounters
from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from faultnet.plan import FaultPlan
from faultnet.transport import faulty_session
from reliablewriter import ObjectInfo, RetryPolicy, WriterSettings, open_writer

KiB = 1024
MiB = 1024 * KiB


@dataclass
class Target:
    """A bucket on a GCS endpoint, and the HTTP session the writer will use.

    ``server`` is the strict endpoint (which can script faults), or None for
    gcp-storage-emulator.
    """

    url: str
    bucket_name: str
    http: requests.Session
    server: GcsServer | None = None
    counters: FaultCounters = field(default_factory=FaultCounters)
    retry_test_id: str | None = None

    @property
    def bucket(self) -> storage.Bucket:
        return anonymous_client(self.url, http=self.http).bucket(self.bucket_name)

    @property
    def strict(self) -> GcsServer:
        if self.server is None:
            pytest.skip("needs the strict endpoint")
        return self.server

    def script(self, *instructions: str) -> None:
        """Have the endpoint apply ``instructions`` to the next upload requests, in order."""
        self.retry_test_id = self.strict.create_retry_test(
            {"storage.objects.insert": list(instructions)}
        )
        self.http.headers["x-retry-test-id"] = self.retry_test_id

    def script_done(self) -> bool:
        """Whether every scripted instruction has fired."""
        assert self.retry_test_id is not None
        completed: bool = self.strict.retry_tests.get(self.retry_test_id)["completed"]
        return completed

    def read(self, name: str) -> bytes:
        blob = anonymous_client(self.url).bucket(self.bucket_name).blob(name)
        data: bytes = blob.download_as_bytes()
        return data

    def object_names(self) -> list[str]:
        client = anonymous_client(self.url)
        return [blob.name for blob in client.list_blobs(self.bucket_name)]


@pytest.fixture
def strict_target(gcs_server: GcsServer, gcs_bucket: str) -> Iterator[Target]:
    """The strict endpoint over a plain requests session."""
    with requests.Session() as http:
        http.trust_env = False
        yield Target(gcs_server.url, gcs_bucket, http, gcs_server)


@pytest.fixture
def target(strict_target: Target) -> Target:
    """The strict endpoint over a plain requests session."""
    return strict_target


@pytest.fixture
def faulty_target(gcs_server: GcsServer, gcs_bucket: str) -> Iterator[Callable[[str], Target]]:
    """Make a :class:`Target` whose HTTP connections suffer the given fault plan text."""
    sessions: list[requests.Session] = []

    def make(plan: str) -> Target:
        counters = FaultCounters()
        http = faulty_session(FaultPlan.parse(plan), counters)
        sessions.append(http)
        return Target(gcs_server.url, gcs_bucket, http, gcs_server, counters)

    yield make
    for http in sessions:
        http.close()


@pytest.fixture(scope="session")
def emulator_url() -> Iterator[str]:
    """gcp-storage-emulator from PyPI, in memory, once for the whole session."""
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    try:
        host, port = server._api._httpd.server_address
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def emulator_target(emulator_url: str) -> Iterator[Target]:
    """A fresh bucket on gcp-storage-emulator."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    anonymous_client(emulator_url).create_bucket(name)
    with requests.Session() as http:
        http.trust_env = False
        yield Target(emulator_url, name, http)


@pytest.fixture
def emulator_faulty_target(emulator_target: Target) -> Iterator[Callable[[str], Target]]:
    """Like :func:`faulty_target`, on gcp-storage-emulator."""
    sessions: list[requests.Session] = []

    def make(plan: str) -> Target:
        counters = FaultCounters()
        http = faulty_session(FaultPlan.parse(plan), counters)
        sessions.append(http)
        return Target(emulator_target.url, emulator_target.bucket_name, http, None, counters)

    yield make
    for http in sessions:
        http.close()


@pytest.fixture
def settings() -> WriterSettings:
    """Small chunks, fast retries and short timeouts, so failures play out in milliseconds."""
    return WriterSettings(
        min_chunk_size=256 * KiB,
        max_chunk_size=512 * KiB,
        buffer_limit=1 * MiB,
        retry=RetryPolicy(max_attempts=8, deadline=20.0, initial_delay=0.01, max_delay=0.05),
        connect_timeout=2.0,
        progress_timeout=1.0,
        send_slice=64 * KiB,
    )


def payload(size: int) -> bytes:
    """Random bytes, so that a misplaced or duplicated range cannot go unnoticed."""
    return os.urandom(size)


async def upload(
    bucket: storage.Bucket, name: str, data: bytes, settings: WriterSettings, **options: Any
) -> ObjectInfo:
    """Write ``data`` in one call and complete it."""
    async with open_writer(bucket, name, settings, **options) as writer:
        await writer.write_at(0, data)
        return await writer.complete()
