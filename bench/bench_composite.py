"""Composite uploads against one resumable session, over a modelled WAN link to GCS.

Loopback measures CPU, not what users feel. Here every connection to the GCS endpoint goes
through ``rup faultproxy --profile wan --leg gcs``: 50 MB/s and 5 ms each way *per
connection*, as a per-flow bottleneck does. One resumable session is one connection
sending chunk after chunk, each waiting for its answer; a composite upload opens K
sessions (segments) at once and composes them, so it may use K links.

One object (256 MiB; 64 MiB with ``--quick``) is uploaded from this process:

* ``direct_grm_gcs_leg`` / ``direct_grm_client_leg``: google-resumable-media's
  ``ResumableUpload``, one stream, through the GCS leg's link and through the client leg's
  (20 MB/s, 10 ms: a user uploading straight from where they are);
* ``single``: one :class:`~reliablewriter.ReliableWriter` session;
* ``composite_kK``: :func:`~reliablewriter.open_composite_writer` with K = 2, 4, 8
  parallel segments (the object cut into 8 segments), fed by K tasks as K client
  connections would feed it (task j writes segments j, j+K, ...). One task writing in
  order would fill one segment's window at a time, and a segment's window (16 MiB here)
  is smaller than the segment: at most two segments would ever be busy.

Both use 8 MiB chunks (at 50 MB/s a chunk takes 168 ms against a 10 ms round trip, so
stop-and-wait costs about 6%). Reported: MB/s, the share of the aggregate link limit
(K links for composite), this process's CPU seconds per GiB, its peak RSS so far (a
high-water mark: it never goes down between runs), and the ratio of
each composite run to the single session, measured in one run. The GCS endpoint and the
fault proxy run in processes of their own; on a 2-core machine shared with other work the
fault proxy's CPU, not the modelled link, may be what caps K=8.

``python -m bench.bench_composite --quick`` for the short run.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import google_crc32c
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from bench._rup_process import behind_profile
from bench.bench_writer import PATTERN, anchor_throughput, gcs_endpoint
from faultnet.gcs.clients import anonymous_client
from faultnet.profiles import PROFILES, Leg
from reliablewriter import CompositeSettings, WriterSettings, open_composite_writer, open_writer
from reliablewriter.checksum import crc32c_combine

__all__ = ["TARGET_RATIO", "run"]

#: the issue's target: composite with K=4 against rup's own single session, same profile
TARGET_RATIO = 2.0
MiB = 1024 * 1024
CHUNK = 8 * MiB
WRITE_SIZE = 1 * MiB
SEGMENTS = 8
PARALLEL = (2, 4, 8)
RESULTS = Path(__file__).parent / "results" / "composite.json"
PROFILE = "wan"


@contextmanager
def behind_profile_url(url: str, leg: Leg) -> Iterator[str]:
    """The endpoint at ``url`` behind a fault proxy playing ``leg`` of the profile."""
    upstream = url.removeprefix("http://").rstrip("/")
    with behind_profile(upstream, PROFILE, leg.value) as address:
        yield "http://" + address


def _writes(size: int) -> Iterator[tuple[int, memoryview]]:
    """The object as 1 MiB writes of views into :data:`PATTERN`: no allocation per write."""
    pattern = memoryview(PATTERN)
    for offset in range(0, size, WRITE_SIZE):
        start = offset % len(pattern)
        length = min(WRITE_SIZE, size - offset, len(pattern) - start)
        yield offset, pattern[start : start + length]


def _expected_crc32c(size: int) -> int:
    """The object's CRC32C, combined from the pattern's (the bytes are never hashed whole)."""
    whole, rest = divmod(size, len(PATTERN))
    crc = 0
    pattern_crc = int(google_crc32c.value(PATTERN))
    for _ in range(whole):
        crc = crc32c_combine(crc, pattern_crc, len(PATTERN))
    return crc32c_combine(crc, int(google_crc32c.value(PATTERN[:rest])), rest)


def _writer_settings(buffer_limit: int) -> WriterSettings:
    return WriterSettings(min_chunk_size=CHUNK, max_chunk_size=CHUNK, buffer_limit=buffer_limit)


async def _single(bucket: storage.Bucket, name: str, size: int) -> None:
    async with open_writer(bucket, name, _writer_settings(4 * CHUNK)) as writer:
        for offset, view in _writes(size):
            await writer.write_at(offset, view)
        await writer.complete(size, _expected_crc32c(size))


async def _composite(bucket: storage.Bucket, name: str, size: int, parallel: int) -> None:
    segment = -(-size // SEGMENTS // CHUNK) * CHUNK
    settings = CompositeSettings(
        segment_size=segment, parallel_segments=parallel, writer=_writer_settings(2 * CHUNK)
    )
    writes = list(_writes(size))
    async with open_composite_writer(bucket, name, settings) as writer:
        # K feeders, as K client connections would be: feeder j writes segments j, j+K, ...
        async def feed(first: int) -> None:
            for offset, view in writes:
                if (offset // segment) % parallel == first:
                    await writer.write_at(offset, view)

        async with trio.open_nursery() as nursery:
            for first in range(parallel):
                nursery.start_soon(feed, first)
        info = await writer.complete(size, _expected_crc32c(size))
    if info.resource.get("componentCount") != -(-size // segment):
        raise RuntimeError(f"expected {-(-size // segment)} components: {info.resource}")


def _measure(bucket: storage.Bucket, name: str, size: int, parallel: int | None) -> dict[str, Any]:
    cpu_before, started = time.process_time(), time.perf_counter()
    if parallel is None:
        trio.run(_single, bucket, name, size)
    else:
        trio.run(_composite, bucket, name, size, parallel)
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    bucket.blob(name).delete()
    link = PROFILES[PROFILE].link(Leg.GCS).rate
    assert link is not None
    links = 1 if parallel is None else parallel
    rate = size / seconds
    return {
        "mb_per_s": round(rate / 1e6, 1),
        "share_of_link_limit": round(rate / (links * link), 3),
        "cpu_seconds_per_gib": round(cpu / (size / (1 << 30)), 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run(quick: bool, size: int | None = None) -> dict[str, Any]:
    """Upload once per mode, in one run; also writes :data:`RESULTS`."""
    size = size or ((64 if quick else 256) * MiB)
    runs: dict[str, dict[str, Any]] = {}
    with (
        gcs_endpoint() as url,
        behind_profile_url(url, Leg.GCS) as gcs_leg,
        behind_profile_url(url, Leg.CLIENT) as client_leg,
    ):
        # References: google-resumable-media's single stream, over each leg's link.
        for leg, through in ((Leg.GCS, gcs_leg), (Leg.CLIENT, client_leg)):
            rate = anchor_throughput(through, size, CHUNK)
            link = PROFILES[PROFILE].link(leg).rate
            assert link is not None
            runs[f"direct_grm_{leg.value}_leg"] = {
                "mb_per_s": round(rate / 1e6, 1),
                "share_of_link_limit": round(rate / link, 3),
            }
        bucket = anonymous_client(gcs_leg).bucket("bench")
        runs["single"] = _measure(bucket, "single", size, None)
        for parallel in PARALLEL:
            runs[f"composite_k{parallel}"] = _measure(bucket, f"k{parallel}", size, parallel)
        leftovers = [blob.name for blob in anonymous_client(url).list_blobs("bench")]
    single = runs["single"]["mb_per_s"]
    result: dict[str, Any] = {
        "benchmark": "composite",
        "profile": PROFILE,
        "gcs_leg": PROFILES[PROFILE].description,
        "size_bytes": size,
        "segments": SEGMENTS,
        "chunk_bytes": CHUNK,
        "runs": runs,
        "ratio_to_single": {
            name: round(values["mb_per_s"] / single, 2)
            for name, values in runs.items()
            if name.startswith("composite")
        },
        "ratio_k4_to_direct_grm_gcs_leg": round(
            runs["composite_k4"]["mb_per_s"] / runs["direct_grm_gcs_leg"]["mb_per_s"], 2
        ),
        "target_ratio_k4": TARGET_RATIO,
        "meets_target": runs["composite_k4"]["mb_per_s"] / single >= TARGET_RATIO,
        "objects_left_behind": leftovers,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB instead of 256 MiB")
    parser.add_argument("--size-mib", type=int, help="object size in MiB")
    args = parser.parse_args(argv)
    size = args.size_mib * MiB if args.size_mib else None
    print(json.dumps(run(args.quick, size), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
