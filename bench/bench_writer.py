"""ReliableWriter against google-resumable-media's ``ResumableUpload``, and its memory use.

Three measurements, all against the strict GCS endpoint running in a separate process
(``rup gcs-server``, memory mode), so client and server do not share a GIL:

* **throughput**: ``--size`` bytes (default 1 GiB) uploaded with ReliableWriter, then the
  same bytes with ``google.resumable_media.requests.ResumableUpload`` (the anchor), both in
  ``--chunk`` byte chunks with CRC32C on, ``--rounds`` times each, alternating; medians.
  The ratio printed is ReliableWriter / anchor; the target is 1.2 or better.
* **allocations**: a ``--alloc-size`` upload (default 512 MiB) under tracemalloc. The
  caller's input is one buffer allocated before tracing starts, so it counts as zero.
  Reported per payload byte: the peak of traced memory, and the sum over chunks of each
  chunk's peak above the level it started at (a chunk that is joined or copied shows up
  there as about one byte per byte). Target: at most 1.1 (ideally far below).
* **peak RSS**: a ``--size`` upload in a fresh process whose caller hands in freshly
  allocated buffers, as a proxy reading sockets does; the growth of peak RSS is compared
  with buffer limit + 64 MiB.

``python -m bench.bench_writer --quick`` runs 128 MiB / 64 MiB instead.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import requests
import trio
from google.cloud import storage  # type: ignore[import-untyped]
from google.resumable_media.requests import ResumableUpload

from bench._rup_process import rup_process
from faultnet.gcs.clients import anonymous_client
from reliablewriter import WriterSettings, WriterStats, open_writer

__all__ = ["TARGET_ALLOC_PER_BYTE", "TARGET_RATIO", "run"]

TARGET_RATIO = 1.2
TARGET_ALLOC_PER_BYTE = 1.1
RSS_HEADROOM = 64 * 1024 * 1024
RESULTS = Path(__file__).parent / "results" / "writer.json"
MiB = 1024 * 1024
#: the caller's data: this pattern, repeated (random, so nothing compresses or dedupes)
PATTERN = os.urandom(16 * MiB)
#: how much the caller hands over per write_at, like one protocol frame
WRITE_SIZE = 1 * MiB


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


@contextmanager
def gcs_endpoint() -> Iterator[str]:
    """``rup gcs-server`` in its own process, with a ``bench`` bucket; yields its URL."""
    with rup_process("gcs-server", "--no-md5") as (_, url):
        anonymous_client(url).create_bucket("bench")
        yield url


def _settings(chunk: int, buffer_limit: int) -> WriterSettings:
    return WriterSettings(min_chunk_size=chunk, max_chunk_size=chunk, buffer_limit=buffer_limit)


def _pattern_views(size: int) -> Iterator[tuple[int, memoryview]]:
    """The object as (offset, view of PATTERN) writes: no caller allocation at all."""
    pattern = memoryview(PATTERN)
    for offset in range(0, size, WRITE_SIZE):
        start = offset % len(PATTERN)
        length = min(WRITE_SIZE, size - offset, len(PATTERN) - start)
        yield offset, pattern[start : start + length]


async def _writer_upload(
    bucket: storage.Bucket,
    name: str,
    size: int,
    settings: WriterSettings,
    *,
    fresh_buffers: bool = False,
    on_progress: Callable[[WriterStats], None] | None = None,
) -> WriterStats:
    async with open_writer(bucket, name, settings, progress=on_progress) as writer:
        for offset, view in _pattern_views(size):
            await writer.write_at(offset, bytes(view) if fresh_buffers else view)
        await writer.complete(size)
        return writer.stats


def writer_throughput(url: str, size: int, chunk: int, buffer_limit: int) -> float:
    bucket = anonymous_client(url).bucket("bench")
    started = time.perf_counter()
    trio.run(_writer_upload, bucket, "writer", size, _settings(chunk, buffer_limit))
    elapsed = time.perf_counter() - started
    bucket.blob("writer").delete()
    return size / elapsed


class _PatternStream(io.RawIOBase):
    """The same bytes as :func:`_pattern_views`, as the stream ResumableUpload reads."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = base + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(target) and self._position < self._size:
            start = self._position % len(PATTERN)
            length = min(len(target) - filled, self._size - self._position, len(PATTERN) - start)
            target[filled : filled + length] = PATTERN[start : start + length]
            filled += length
            self._position += length
        return filled


def anchor_throughput(url: str, size: int, chunk: int) -> float:
    upload_url = f"{url}/upload/storage/v1/b/bench/o?uploadType=resumable"
    with requests.Session() as transport:
        started = time.perf_counter()
        upload = ResumableUpload(upload_url, chunk, checksum="crc32c")  # type: ignore[no-untyped-call]
        stream = io.BufferedReader(_PatternStream(size), buffer_size=chunk)
        upload.initiate(  # type: ignore[no-untyped-call]
            transport, stream, {"name": "anchor"}, "application/octet-stream", total_bytes=size
        )
        while not upload.finished:
            upload.transmit_next_chunk(transport)  # type: ignore[no-untyped-call]
        elapsed = time.perf_counter() - started
    anonymous_client(url).bucket("bench").blob("anchor").delete()
    return size / elapsed


def writer_allocations(url: str, size: int, chunk: int, buffer_limit: int) -> dict[str, float]:
    bucket = anonymous_client(url).bucket("bench")
    chunk_peaks: list[int] = []
    level = 0

    def on_progress(stats: WriterStats) -> None:
        nonlocal level
        current, peak = tracemalloc.get_traced_memory()
        chunk_peaks.append(peak - level)
        tracemalloc.reset_peak()
        level = current

    tracemalloc.start()
    try:
        level = tracemalloc.get_traced_memory()[0]
        base = level
        trio.run(
            partial(_writer_upload, on_progress=on_progress),
            bucket,
            "alloc",
            size,
            _settings(chunk, buffer_limit),
        )
        overall_peak = max(chunk_peaks, default=0) + base
    finally:
        tracemalloc.stop()
    bucket.blob("alloc").delete()
    return {
        "peak_traced_per_byte": (overall_peak - base) / size,
        "per_chunk_peaks_per_byte": sum(chunk_peaks) / size,
    }


def writer_peak_rss(url: str, size: int, chunk: int, buffer_limit: int) -> dict[str, int]:
    """In a fresh process (peak RSS is per process), with fresh caller buffers."""
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_writer",
            "--rss-child",
            url,
            "--size",
            str(size),
            "--chunk",
            str(chunk),
            "--buffer-limit",
            str(buffer_limit),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    measured: dict[str, int] = json.loads(output)
    return measured


def _rss_child(url: str, size: int, chunk: int, buffer_limit: int) -> None:
    bucket = anonymous_client(url).bucket("bench")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    upload = partial(_writer_upload, fresh_buffers=True)
    trio.run(upload, bucket, "rss", size, _settings(chunk, buffer_limit))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    bucket.blob("rss").delete()
    print(json.dumps({"rss_before_bytes": before, "rss_peak_bytes": peak}))


def run(
    quick: bool,
    *,
    size: int | None = None,
    alloc_size: int | None = None,
    chunk: int = 8 * MiB,
    buffer_limit: int = 64 * MiB,
    rounds: int = 3,
) -> dict[str, Any]:
    """Run all three measurements; returns (and writes) the results.

    Throughputs are the median of ``rounds`` alternating runs.
    """
    size = size or (128 * MiB if quick else 1024 * MiB)
    alloc_size = alloc_size or (64 * MiB if quick else 512 * MiB)
    writer_rates: list[float] = []
    anchor_rates: list[float] = []
    with gcs_endpoint() as url:
        # Alternate, so that a burst of load on the shared machine hits both alike.
        for _ in range(rounds):
            writer_rates.append(writer_throughput(url, size, chunk, buffer_limit))
            anchor_rates.append(anchor_throughput(url, size, chunk))
        writer_rate = statistics.median(writer_rates)
        anchor_rate = statistics.median(anchor_rates)
        allocations = writer_allocations(url, alloc_size, chunk, buffer_limit)
        rss = writer_peak_rss(url, size, chunk, buffer_limit)
    rss_growth = rss["rss_peak_bytes"] - rss["rss_before_bytes"]
    results: dict[str, Any] = {
        "benchmark": "writer",
        "quick": quick,
        "size_bytes": size,
        "alloc_size_bytes": alloc_size,
        "chunk_bytes": chunk,
        "rounds": rounds,
        "writer_mb_per_s_runs": [round(rate / 1e6, 1) for rate in writer_rates],
        "anchor_mb_per_s_runs": [round(rate / 1e6, 1) for rate in anchor_rates],
        "buffer_limit_bytes": buffer_limit,
        "writer_mb_per_s": round(writer_rate / 1e6, 1),
        "anchor_mb_per_s": round(anchor_rate / 1e6, 1),
        "ratio_to_anchor": round(writer_rate / anchor_rate, 3),
        "target_ratio": TARGET_RATIO,
        "meets_ratio_target": writer_rate / anchor_rate >= TARGET_RATIO,
        "peak_traced_per_byte": round(allocations["peak_traced_per_byte"], 4),
        "per_chunk_peaks_per_byte": round(allocations["per_chunk_peaks_per_byte"], 4),
        "target_alloc_per_byte": TARGET_ALLOC_PER_BYTE,
        "meets_alloc_target": allocations["per_chunk_peaks_per_byte"] <= TARGET_ALLOC_PER_BYTE,
        **rss,
        "rss_growth_bytes": rss_growth,
        "rss_limit_bytes": buffer_limit + RSS_HEADROOM,
        "meets_rss_target": rss_growth <= buffer_limit + RSS_HEADROOM,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB / 64 MiB runs")
    parser.add_argument("--size", type=_parse_size, help="throughput and RSS run size")
    parser.add_argument("--alloc-size", type=_parse_size, help="tracemalloc run size")
    parser.add_argument("--chunk", type=_parse_size, default=8 * MiB)
    parser.add_argument("--buffer-limit", type=_parse_size, default=64 * MiB)
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs of each")
    parser.add_argument("--rss-child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child, args.size, args.chunk, args.buffer_limit)
        return
    results = run(
        args.quick,
        size=args.size,
        alloc_size=args.alloc_size,
        chunk=args.chunk,
        buffer_limit=args.buffer_limit,
        rounds=args.rounds,
    )
    print(
        f"ReliableWriter {results['writer_mb_per_s']} MB/s, ResumableUpload "
        f"{results['anchor_mb_per_s']} MB/s: ratio {results['ratio_to_anchor']} "
        f"(target >= {TARGET_RATIO})"
    )
    print(
        f"allocations per payload byte: {results['per_chunk_peaks_per_byte']} summed over "
        f"chunks, {results['peak_traced_per_byte']} at peak (target <= {TARGET_ALLOC_PER_BYTE})"
    )
    print(
        f"peak RSS growth {results['rss_growth_bytes'] / MiB:.1f} MiB "
        f"(limit: buffer {args.buffer_limit / MiB:.0f} MiB + 64 MiB)"
    )
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
