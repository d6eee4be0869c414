"""The demo: the whole system on one machine, with faults on both network legs.

:func:`run_demo` starts faultnet's strict GCS endpoint (in memory) and a rup proxy in this process,
uploads a generated object through the proxy over several connections while

* the client -> proxy connections suffer the ``--client-faults`` plan (faultnet.stream), and
* the proxy -> GCS HTTP connections suffer the ``--gcs-faults`` plan (faultnet.transport),

then checks the stored object: its size and CRC32C as GCS reports them, and a download
compared byte for byte with what was sent. Its :class:`DemoReport` holds the throughput,
the retries by cause on each leg and the faults injected by type. It shares its faulty
connector (:mod:`proxy.chaos.connectors`), its generated data (:mod:`proxy.chaos.source`)
and its judge (:mod:`proxy.chaos.verify`) with ``rup chaos``. The command line around it is
:mod:`proxy.cli.demo`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import trio

from faultnet.counters import FaultCounters
from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from faultnet.plan import FaultPlan
from faultnet.transport import faulty_session
from proxy.chaos.connectors import faulty_connector
from proxy.chaos.metrics import counts_by_label
from proxy.chaos.source import ObjectSource
from proxy.chaos.verify import verify_object
from proxy.client import ClientSettings, UploadOptions, UploadProgress, UploadResult, upload_stream
from proxy.server import serve_in_background
from proxy.server.backend import Backend, TargetKind
from proxy.server.settings import ServerSettings
from reliablewriter import MiB

__all__ = [
    "DEFAULT_CLIENT_FAULTS",
    "DEFAULT_GCS_FAULTS",
    "DemoReport",
    "demo_object_url",
    "run_demo",
]

#: client -> proxy: some connections are reset partway, one sees a payload byte flipped.
#: With the default seed the first connection is reset and the third gets a corrupt byte.
DEFAULT_CLIENT_FAULTS: Final = (
    "reset_peer:up(after=24m)~0.5; corrupt:up(at=5m)~0.3; latency:down(ms=1)~0.25"
)
#: proxy -> GCS: every HTTP connection is reset after 40 MiB (the proxy keeps few of them
#: alive, so a chance per connection could leave this leg without a fault); some answers
#: come late
DEFAULT_GCS_FAULTS: Final = "reset_peer:up(after=40m); latency:down(ms=10)~0.3"

_BUCKET: Final = "rup-demo"
#: what the generator yields at a time: the client's default frame size
_PIECE: Final = 1 * MiB


@dataclasses.dataclass(frozen=True)
class DemoReport:
    """What happened, in a form that prints as text or as JSON."""

    size: int
    connections: int
    elapsed: float
    verified: bool
    problem: str
    client_plan: str
    gcs_plan: str
    client_reconnects: int
    client_resent_bytes: dict[str, int]
    client_errors: dict[str, int]
    proxy_gcs_retries: dict[str, int]
    client_faults: dict[str, Any]
    gcs_faults: dict[str, Any]
    #: the segments the object was composed from (0: one resumable session)
    segments: int = 0

    @property
    def throughput(self) -> float:
        return self.size / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "throughput_mib_s": round(self.throughput / MiB, 2)}


def demo_object_url(size: int, seed: int) -> str:
    """The ``gs://`` URL the demo uploads to."""
    return f"gs://{_BUCKET}/{_object_name(size, seed)}"


def _object_name(size: int, seed: int) -> str:
    return f"demo/object-{size}-{seed}.bin"


def _source(size: int, seed: int) -> ObjectSource:
    return ObjectSource(f"rup-demo:{seed}", size)


async def _chunks(source: ObjectSource) -> AsyncIterator[bytes]:
    """The object in pieces of the client's frame size, which its stream buffer keeps whole."""
    for piece in source.blocks(_PIECE):
        await trio.lowlevel.checkpoint()
        yield piece


async def _upload(
    backend: Backend,
    source: ObjectSource,
    url: str,
    *,
    connections: int,
    client_plan: FaultPlan,
    client_counters: FaultCounters,
    progress: Callable[[UploadProgress], None] | None,
) -> tuple[UploadResult, dict[str, int]]:
    async with serve_in_background(ServerSettings(), backend) as server:
        result = await upload_stream(
            _chunks(source),
            url,
            UploadOptions(
                proxy=server.address,
                settings=ClientSettings(connections=connections),
                connector=faulty_connector(server.address, client_plan, client_counters),
                progress=progress,
            ),
        )
        return result, counts_by_label(server.metrics.retries.collect())


def run_demo(
    *,
    size: int,
    connections: int = 4,
    client_plan: FaultPlan,
    gcs_plan: FaultPlan,
    seed: int = 1,
    progress: Callable[[UploadProgress], None] | None = None,
) -> DemoReport:
    """Run the whole demo and report; raises UploadError if the upload itself failed.

    Blocking: it runs its own trio loop. ``progress`` is the client's progress callback
    (see :class:`~proxy.client.UploadOptions`).
    """
    client_counters, gcs_counters = FaultCounters(), FaultCounters()
    source = _source(size, seed)
    with GcsServer() as gcs:
        session = faulty_session(gcs_plan, gcs_counters)
        backend = Backend(anonymous_client(gcs.url, http=session), TargetKind.EMBEDDED, gcs.url)
        result, gcs_retries = trio.run(
            lambda: _upload(
                backend,
                source,
                demo_object_url(size, seed),
                connections=connections,
                client_plan=client_plan,
                client_counters=client_counters,
                progress=progress,
            )
        )
        judge = anonymous_client(gcs.url).bucket(_BUCKET)
        problem = verify_object(
            judge,
            _object_name(size, seed),
            source,
            reported_crc32c=result.crc32c,
            reported_size=result.size,
        )
    return DemoReport(
        size=size,
        connections=connections,
        elapsed=result.elapsed,
        verified=not problem,
        problem=problem,
        client_plan=client_plan.to_text(),
        gcs_plan=gcs_plan.to_text(),
        client_reconnects=result.reconnects,
        client_resent_bytes=dict(result.resent_bytes_by_cause),
        client_errors=dict(result.errors_by_code),
        proxy_gcs_retries=gcs_retries,
        client_faults=dict(client_counters.as_dict()),
        gcs_faults=dict(gcs_counters.as_dict()),
        segments=result.segments,
    )
