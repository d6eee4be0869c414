"""pytest fixtures for testing GCS clients under faults: rup's chaos harness for any test suite.

Installing rup registers this plugin (entry point ``pytest11``), so a test suite only asks
for the fixtures by name, as with pytest-httpserver::

    def test_survives_a_reset(gcs_bucket, faulty_gcs_client):
        client = faulty_gcs_client("reset_peer:up(after=300k)")
        ...

``gcs_endpoint``
    The strict GCS endpoint (:class:`faultnet.gcs.GcsServer`): ``.url``, ``.address`` and
    ``.store``. In memory; ``@pytest.mark.parametrize("gcs_endpoint", ["disk"],
    indirect=True)`` keeps it on disk (``["memory", "disk"]``: both).
``gcs_bucket``
    The name of a new, empty bucket on ``gcs_endpoint``.
``gcs_client``
    An anonymous google-cloud-storage client for ``gcs_endpoint``.
``faulty_gcs_client``
    ``faulty_gcs_client(plan)``: a client for ``gcs_endpoint`` whose every HTTP connection
    goes through :class:`faultnet.FaultyHTTPAdapter` under ``plan`` (a
    :class:`faultnet.FaultPlan` or its text form).
``chaos_proxy``
    ``chaos_proxy(upstream, plan="", control=False)``: a TCP chaos proxy in front of
    ``(host, port)``, with toxics changed through its methods or, with ``control``, through
    the Toxiproxy HTTP API at ``.control_url`` (see :mod:`faultnet.threaded_proxy`).
``gcs_retry_test``
    ``gcs_retry_test({"storage.objects.insert": ["return-503"]})``: a storage-testbench
    retry test on ``gcs_endpoint``: its ``.id``, the ``.headers`` that select it, a
    ``.client`` that sends them, and ``.completed()``.

Each fixture stops what it started when its test ends: servers and proxies are stopped
and their threads joined, HTTP sessions closed.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from faultnet.gcs import GcsServer
from faultnet.plan import FaultPlan
from faultnet.tcpproxy import Address
from faultnet.threaded_proxy import ThreadedChaosProxy, chaos_proxy_in_thread

if TYPE_CHECKING:
    from google.cloud import storage  # type: ignore[import-untyped]

    from faultnet.counters import FaultCounters

__all__ = [
    "ChaosProxyFactory",
    "FaultyClientFactory",
    "RetryTest",
    "RetryTestFactory",
    "chaos_proxy",
    "faulty_gcs_client",
    "gcs_bucket",
    "gcs_client",
    "gcs_endpoint",
    "gcs_retry_test",
]

#: the header that makes the endpoint apply a retry test's instructions to a request
RETRY_TEST_HEADER = "x-retry-test-id"
_STORES = ("memory", "disk")


@pytest.fixture
def gcs_endpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GcsServer]:
    """A fresh strict GCS endpoint on a free loopback port; in memory unless parametrized
    (indirectly) with ``"disk"``."""
    store = getattr(request, "param", "memory")
    if store not in _STORES:
        raise ValueError(f"gcs_endpoint takes {' or '.join(_STORES)}, not {store!r}")
    data_dir = tmp_path_factory.mktemp("gcs-data") if store == "disk" else None
    with GcsServer(data_dir=data_dir) as endpoint:
        yield endpoint


@pytest.fixture
def gcs_bucket(gcs_endpoint: GcsServer) -> str:
    """The name of a new, empty bucket on :func:`gcs_endpoint`."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    gcs_endpoint.store.create_bucket(name)
    return name


@pytest.fixture
def gcs_client(gcs_endpoint: GcsServer) -> storage.Client:
    """An anonymous google-cloud-storage client for :func:`gcs_endpoint`."""
    from faultnet.gcs.clients import anonymous_client  # google-cloud-storage loads slowly

    return anonymous_client(gcs_endpoint.url)


#: ``make(plan, counters=None)``: a client whose HTTP connections suffer ``plan``
FaultyClientFactory = Callable[..., "storage.Client"]


@pytest.fixture
def faulty_gcs_client(gcs_endpoint: GcsServer) -> Iterator[FaultyClientFactory]:
    """Make google-cloud-storage clients for :func:`gcs_endpoint` whose connections suffer a
    fault plan; ``counters`` (a :class:`faultnet.FaultCounters`) tallies what it did."""
    from faultnet.gcs.clients import anonymous_client
    from faultnet.transport import faulty_session

    with contextlib.ExitStack() as sessions:

        def make(plan: FaultPlan | str, counters: FaultCounters | None = None) -> storage.Client:
            if isinstance(plan, str):
                plan = FaultPlan.parse(plan)
            http = sessions.enter_context(faulty_session(plan, counters))
            return anonymous_client(gcs_endpoint.url, http=http)

        yield make


#: ``make(upstream, plan="", control=False)``: a chaos proxy in front of ``upstream``
ChaosProxyFactory = Callable[..., ThreadedChaosProxy]


@pytest.fixture
def chaos_proxy() -> Iterator[ChaosProxyFactory]:
    """Start TCP chaos proxies in front of ``(host, port)`` addresses; each is stopped (its
    connections closed, its thread joined) when the test ends."""
    with contextlib.ExitStack() as proxies:

        def make(
            upstream: Address, plan: FaultPlan | str = FaultPlan.NONE, *, control: bool = False
        ) -> ThreadedChaosProxy:
            control_address = ("127.0.0.1", 0) if control else None
            return proxies.enter_context(
                chaos_proxy_in_thread(upstream, plan, control=control_address)
            )

        yield make


@dataclass(frozen=True)
class RetryTest:
    """A retry test registered on the endpoint: requests that carry :attr:`headers` get its
    instructions, each applied once and in order."""

    id: str
    endpoint: GcsServer
    #: a google-cloud-storage client for the endpoint that sends :attr:`headers` on every request
    client: storage.Client

    @property
    def headers(self) -> dict[str, str]:
        return {RETRY_TEST_HEADER: self.id}

    def completed(self) -> bool:
        """Whether every instruction has applied."""
        done: bool = self.endpoint.retry_tests.get(self.id)["completed"]
        return done


#: ``make(instructions, transport="HTTP")``: a registered :class:`RetryTest`
RetryTestFactory = Callable[..., RetryTest]


@pytest.fixture
def gcs_retry_test(gcs_endpoint: GcsServer) -> Iterator[RetryTestFactory]:
    """Register storage-testbench retry tests on :func:`gcs_endpoint`: instructions by JSON
    API method, e.g. ``{"storage.objects.insert": ["return-503-after-256K"]}``."""
    import requests

    from faultnet.gcs.clients import anonymous_client

    with contextlib.ExitStack() as sessions:

        def make(instructions: Mapping[str, Sequence[str]], transport: str = "HTTP") -> RetryTest:
            test_id = gcs_endpoint.create_retry_test(instructions, transport)
            http = sessions.enter_context(requests.Session())
            http.trust_env = False  # a proxy from the environment must not see these requests
            http.headers[RETRY_TEST_HEADER] = test_id
            return RetryTest(test_id, gcs_endpoint, anonymous_client(gcs_endpoint.url, http=http))

        yield make
