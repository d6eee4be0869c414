"""``rup demo``: the whole system on one machine, with faults on both network legs.

It starts faultnet's strict GCS endpoint (in memory) and a rup proxy in this process,
uploads a generated object through the proxy over several connections while

* the client -> proxy connections suffer the ``--client-faults`` plan (faultnet.stream), and
* the proxy -> GCS HTTP connections suffer the ``--gcs-faults`` plan (faultnet.transport),

then checks the stored object: its size and CRC32C as GCS reports them, and a download
compared byte for byte with what was sent. It prints the throughput, the retries by cause on
each leg and the faults injected by type, and exits 0 only when the object was verified
(1 when it was not, 2 on bad arguments).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import itertools
import json
import random
import re
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final
from urllib.parse import quote

import google_crc32c
import requests
import trio
from prometheus_client import Counter

from faultnet.counters import FaultCounters
from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from faultnet.plan import FaultPlan, PlanSyntaxError
from faultnet.stream import open_tcp_stream
from faultnet.transport import faulty_session
from proxy.cli.progress import UploadBar
from proxy.client import (
    ClientSettings,
    Connector,
    UploadError,
    UploadOptions,
    UploadResult,
    upload_stream,
)
from proxy.server import serve_in_background
from proxy.server.backend import Backend, TargetKind
from proxy.server.settings import ServerSettings

__all__ = [
    "DEFAULT_CLIENT_FAULTS",
    "DEFAULT_GCS_FAULTS",
    "HELP",
    "DemoReport",
    "configure",
    "parse_size",
    "run",
    "run_demo",
]

HELP: Final = "upload a generated object through an in-process proxy under faults, and verify it"

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
_BLOCK: Final = 8 * 1024 * 1024
#: what the generator yields at a time: the client's default frame size
_PIECE: Final = 1024 * 1024
_DOWNLOAD_PIECE: Final = 1024 * 1024
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``256M``, ``1.5GiB``, ``4096``... as a byte count (powers of 1024)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"expected a size such as 256M or 1G, got {text!r}")
    scale = 1024 ** "_kmgt".index(match.group(2).lower() or "_")
    return int(float(match.group(1)) * scale)


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

    @property
    def throughput(self) -> float:
        return self.size / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "throughput_mib_s": round(self.throughput / 2**20, 2)}

    def as_text(self) -> str:
        mib = 2**20

        def listing(counts: dict[str, int] | dict[str, float], unit: str = "") -> str:
            items = [f"{name} {value}{unit}" for name, value in counts.items() if value]
            return ", ".join(items) or "none"

        resent = {cause: round(count / mib, 1) for cause, count in self.client_resent_bytes.items()}
        verdict = (
            "VERIFIED: size and crc32c match GCS, and the downloaded copy matches byte for byte"
            if self.verified
            else f"NOT VERIFIED: {self.problem}"
        )
        return "\n".join(
            [
                f"rup demo: {self.size / mib:.0f} MiB over {self.connections} connections",
                f"  client -> proxy faults: {self.client_plan}",
                f"  proxy -> GCS faults:    {self.gcs_plan}",
                f"uploaded in {self.elapsed:.1f} s: {self.throughput / mib:.1f} MiB/s",
                f"client: {self.client_reconnects} reconnects; resent MiB by cause:"
                f" {listing(resent)}; proxy errors: {listing(self.client_errors)}",
                f"proxy -> GCS retries by cause: {listing(self.proxy_gcs_retries)}",
                f"faults injected, client leg: {listing(self.client_faults['faults'])}"
                f" over {self.client_faults['connections']} connections",
                f"faults injected, GCS leg:    {listing(self.gcs_faults['faults'])}"
                f" over {self.gcs_faults['connections']} connections",
                verdict,
            ]
        )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "exit codes:\n  0    the object was verified\n  1    the upload failed or the object"
        " did not verify\n  2    usage error"
    )
    parser.add_argument("--size", default="256M", help="object size, e.g. 64M or 1G (default 256M)")
    parser.add_argument(
        "--connections", type=int, default=4, metavar="N", help="client connections (default 4)"
    )
    parser.add_argument(
        "--client-faults",
        default=DEFAULT_CLIENT_FAULTS,
        metavar="PLAN",
        help=f"fault plan for client -> proxy (default: {DEFAULT_CLIENT_FAULTS!r})",
    )
    parser.add_argument(
        "--gcs-faults",
        default=DEFAULT_GCS_FAULTS,
        metavar="PLAN",
        help=f"fault plan for proxy -> GCS (default: {DEFAULT_GCS_FAULTS!r})",
    )
    parser.add_argument("--no-faults", action="store_true", help="run with both plans empty")
    parser.add_argument("--seed", type=int, default=1, help="seed for the data and both plans")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")


class _DemoObject:
    """Deterministic, non-repeating bytes, made piece by piece: nothing touches the disk.

    One random block, rotated by a different amount for each block, so a piece written at
    the wrong offset never matches by accident. Every piece is one slice of the block laid
    twice end to end: one copy per byte, and pieces of the client's frame size, which its
    stream buffer keeps as they are.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        base = random.Random(seed).randbytes(min(size, _BLOCK) or 1)
        self._block_size = len(base)
        self._doubled = base + base

    def pieces(self) -> Iterator[bytes]:
        block_size, doubled = self._block_size, self._doubled
        for index, offset in enumerate(range(0, self.size, block_size)):
            shift = (index * 4099) % block_size
            block_end = min(block_size, self.size - offset)
            for begin in range(0, block_end, _PIECE):
                yield doubled[shift + begin : shift + min(begin + _PIECE, block_end)]

    async def chunks(self) -> AsyncIterator[bytes]:
        for piece in self.pieces():
            await trio.lowlevel.checkpoint()
            yield piece

    def crc32c(self) -> int:
        crc = 0
        for piece in self.pieces():
            crc = google_crc32c.extend(crc, piece)
        return crc


def _faulty_connector(
    address: tuple[str, int], plan: FaultPlan, counters: FaultCounters
) -> Connector:
    host, port = address
    indexes = itertools.count()

    async def connect(_host: str, _port: int) -> trio.abc.Stream:
        return await open_tcp_stream(host, port, plan=plan, counters=counters, index=next(indexes))

    return connect


def _by_label(counter: Counter) -> dict[str, int]:
    return {
        next(iter(sample.labels.values()), ""): int(sample.value)
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


class _Comparator:
    """A write-only file that checks what is written against the demo object, in order."""

    def __init__(self, expected: _DemoObject) -> None:
        self._pieces = expected.pieces()
        self._piece = b""
        self._position = 0
        self.offset = 0
        self.first_difference: int | None = None

    def write(self, data: bytes) -> int:
        done = 0
        while done < len(data):
            if self._position == len(self._piece):
                self._piece, self._position = next(self._pieces, b""), 0
                if not self._piece:  # more bytes than the object has
                    self._differs_at(self.offset)
                    self.offset += len(data) - done
                    break
            length = min(len(data) - done, len(self._piece) - self._position)
            got = data[done : done + length]
            want = self._piece[self._position : self._position + length]
            if got != want:
                pairs = zip(got, want, strict=True)
                self._differs_at(self.offset + next(i for i, (a, b) in enumerate(pairs) if a != b))
            done += length
            self._position += length
            self.offset += length
        return len(data)

    def _differs_at(self, offset: int) -> None:
        if self.first_difference is None:
            self.first_difference = offset


def _verify(gcs_url: str, name: str, expected: _DemoObject, result: UploadResult) -> str:
    """'' when GCS holds exactly the demo object; otherwise what differs."""
    size, crc = expected.size, expected.crc32c()
    blob = anonymous_client(gcs_url).bucket(_BUCKET).get_blob(name)
    if blob is None:
        return "the object does not exist in GCS"
    stored_crc = int.from_bytes(base64.b64decode(blob.crc32c or ""), "big")
    if blob.size != size or stored_crc != crc:
        return f"GCS holds {blob.size} bytes, crc32c {stored_crc:08x}; sent {size}, {crc:08x}"
    if result.crc32c != crc or result.size != size:
        return "the proxy reported a different size or crc32c than GCS"
    comparator = _Comparator(expected)
    # Straight from the JSON API's media URL in big pieces: the storage client's download
    # reads 8 KiB at a time, which would make verifying slower than uploading.
    media = f"{gcs_url}/download/storage/v1/b/{_BUCKET}/o/{quote(name, safe='')}?alt=media"
    with requests.get(media, stream=True, timeout=60) as response:
        response.raise_for_status()
        for piece in response.iter_content(_DOWNLOAD_PIECE):
            comparator.write(piece)
    if comparator.first_difference is not None:
        return f"the downloaded copy differs from byte {comparator.first_difference}"
    if comparator.offset != size:
        return f"the download ended after {comparator.offset} of {size} bytes"
    return ""


async def _upload(
    backend: Backend,
    source: _DemoObject,
    name: str,
    *,
    connections: int,
    client_plan: FaultPlan,
    client_counters: FaultCounters,
    bar: UploadBar | None,
) -> tuple[UploadResult, dict[str, int]]:
    async with serve_in_background(ServerSettings(), backend) as server:
        result = await upload_stream(
            source.chunks(),
            f"gs://{_BUCKET}/{name}",
            UploadOptions(
                proxy=server.address,
                settings=ClientSettings(connections=connections),
                connector=_faulty_connector(server.address, client_plan, client_counters),
                progress=bar.update if bar is not None else None,
            ),
        )
        return result, _by_label(server.metrics.retries)


def run_demo(
    *,
    size: int,
    connections: int = 4,
    client_plan: FaultPlan,
    gcs_plan: FaultPlan,
    seed: int = 1,
    show_progress: bool = False,
) -> DemoReport:
    """Run the whole demo and report; raises UploadError if the upload itself failed."""
    client_counters, gcs_counters = FaultCounters(), FaultCounters()
    name = f"demo/object-{size}-{seed}.bin"
    source = _DemoObject(size, seed)
    with GcsServer() as gcs:
        session = faulty_session(gcs_plan, gcs_counters)
        backend = Backend(anonymous_client(gcs.url, http=session), TargetKind.EMBEDDED, gcs.url)
        with (
            UploadBar(f"gs://{_BUCKET}/{name}")
            if show_progress
            else contextlib.nullcontext() as bar
        ):
            result, gcs_retries = trio.run(
                lambda: _upload(
                    backend,
                    source,
                    name,
                    connections=connections,
                    client_plan=client_plan,
                    client_counters=client_counters,
                    bar=bar,
                )
            )
        problem = _verify(gcs.url, name, source, result)
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
    )


def _plans(args: argparse.Namespace) -> tuple[FaultPlan, FaultPlan]:
    if args.no_faults:
        return FaultPlan(seed=args.seed), FaultPlan(seed=args.seed)
    client = dataclasses.replace(FaultPlan.parse(args.client_faults), seed=args.seed)
    gcs = dataclasses.replace(FaultPlan.parse(args.gcs_faults), seed=args.seed + 1)
    return client, gcs


def run(args: argparse.Namespace) -> int:
    try:
        size = parse_size(args.size)
        client_plan, gcs_plan = _plans(args)
    except (ValueError, PlanSyntaxError) as exc:
        print(f"rup demo: {exc}", file=sys.stderr)
        return 2
    if args.connections < 1:
        print("rup demo: --connections must be at least 1", file=sys.stderr)
        return 2
    try:
        report = run_demo(
            size=size,
            connections=args.connections,
            client_plan=client_plan,
            gcs_plan=gcs_plan,
            seed=args.seed,
            show_progress=not args.json and sys.stderr.isatty(),
        )
    except UploadError as exc:
        print(f"rup demo: upload failed: {exc.message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"verified": False, "problem": exc.message}))
        return 1
    print(json.dumps(report.as_dict()) if args.json else report.as_text())
    return 0 if report.verified else 1
