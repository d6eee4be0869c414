"""``reliablewriter.open_blob`` against google-cloud-storage's ``blob.open("wb")`` (BlobWriter).

Both write the same stream to the same endpoint (``rup gcs-server`` in a process of its
own, memory mode) with the same chunk size, in the same run, for each piece size
(default 64 KiB and 1 MiB): the caller reads the stream as ``bytes`` pieces (a fresh
``bytes`` per write, as ``f.read(n)`` gives) and writes each one. Every measurement runs
in a fresh process, alternating between the two, so peak RSS is per upload.

* **throughput**: payload bytes per second, median of ``--rounds``.
* **peak RSS**: growth of the process's peak RSS over the upload.
* **allocations**: a ``--alloc-size`` upload under tracemalloc (every thread traced).
  For each ``write`` the peak of traced memory above its level when the write began is
  added up (the caller's piece is allocated before the write, so it is not counted);
  reported per payload byte. A copy of each byte shows up as about 1.0. BlobWriter copies
  into its buffer, out of it into a chunk, and into the request; open_blob holds ``bytes``
  as they are (a mutable buffer would be copied once, see ``stable_view``).

Ratios are open_blob / BlobWriter. Targets (issue 16): throughput >= 1.3, allocations
<= 0.1. ``python -m bench.bench_open_blob --quick`` uploads 128 MiB instead of 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Any, BinaryIO

from bench.bench_writer import gcs_endpoint
from faultnet.gcs.clients import anonymous_client
from reliablewriter import open_blob

__all__ = ["TARGET_ALLOC_RATIO", "TARGET_THROUGHPUT_RATIO", "run"]

TARGET_THROUGHPUT_RATIO = 1.3
TARGET_ALLOC_RATIO = 0.1
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
#: the caller's stream: this pattern, repeated (random, so nothing compresses)
PATTERN = os.urandom(4 * MiB)
WRITERS = ("open_blob", "blobwriter")


def _open(writer: str, url: str, name: str, chunk: int) -> BinaryIO:
    blob = anonymous_client(url).bucket("bench").blob(name)
    if writer == "open_blob":
        return open_blob(blob, "wb", chunk_size=chunk)  # type: ignore[return-value]
    stream: BinaryIO = blob.open("wb", chunk_size=chunk)
    return stream


def _pieces(size: int, piece: int) -> Any:
    """``size`` bytes as fresh ``bytes`` of ``piece`` bytes each (a file's ``read``)."""
    offset = 0
    while offset < size:
        start = offset % len(PATTERN)
        length = min(piece, size - offset, len(PATTERN) - start)
        yield PATTERN[start : start + length]
        offset += length


def _child(writer: str, url: str, size: int, piece: int, chunk: int, trace: bool) -> None:
    """One upload in this (fresh) process; prints its figures as JSON."""
    name = f"{writer}-{piece}-{os.getpid()}"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    allocated = 0
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    with _open(writer, url, name, chunk) as stream:
        for data in _pieces(size, piece):
            if trace:
                level = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
                stream.write(data)
                allocated += max(0, tracemalloc.get_traced_memory()[1] - level)
            else:
                stream.write(data)
    elapsed = time.perf_counter() - started
    if trace:
        tracemalloc.stop()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    blob = anonymous_client(url).bucket("bench").get_blob(name)
    if blob is None or blob.size != size:
        raise SystemExit(f"{writer} stored {None if blob is None else blob.size}, not {size}")
    blob.delete()
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "rss_growth": rss_peak - rss_before,
                "allocated_per_byte": allocated / size,
            }
        )
    )


def _measure(
    writer: str, url: str, size: int, piece: int, chunk: int, *, trace: bool
) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.bench_open_blob", "--child", writer, url]
    command += ["--size", str(size), "--piece", str(piece), "--chunk", str(chunk)]
    if trace:
        command.append("--trace")
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    figures: dict[str, float] = json.loads(output)
    return figures


def run(
    quick: bool,
    *,
    size: int | None = None,
    alloc_size: int | None = None,
    chunk: int = 8 * MiB,
    pieces: tuple[int, ...] = (64 * KiB, MiB),
    rounds: int = 3,
) -> dict[str, Any]:
    size = size or (128 * MiB if quick else GiB)
    alloc_size = alloc_size or (32 * MiB if quick else 128 * MiB)
    results: dict[str, Any] = {
        "benchmark": "open_blob",
        "bytes": size,
        "alloc_bytes": alloc_size,
        "chunk_size": chunk,
        "targets": {"throughput": TARGET_THROUGHPUT_RATIO, "allocations": TARGET_ALLOC_RATIO},
        "by_piece": {},
    }
    with gcs_endpoint() as url:
        for piece in pieces:
            seconds: dict[str, list[float]] = {writer: [] for writer in WRITERS}
            rss: dict[str, list[float]] = {writer: [] for writer in WRITERS}
            for _ in range(rounds):
                for writer in WRITERS:  # alternating, so machine noise hits both alike
                    figures = _measure(writer, url, size, piece, chunk, trace=False)
                    seconds[writer].append(figures["seconds"])
                    rss[writer].append(figures["rss_growth"])
            allocated = {
                writer: _measure(writer, url, alloc_size, piece, chunk, trace=True)[
                    "allocated_per_byte"
                ]
                for writer in WRITERS
            }
            mib_per_s = {w: size / statistics.median(seconds[w]) / MiB for w in WRITERS}
            peak_rss = {w: max(rss[w]) / MiB for w in WRITERS}
            results["by_piece"][str(piece)] = {
                "MiB_per_s": {w: round(v, 1) for w, v in mib_per_s.items()},
                "peak_rss_growth_MiB": {w: round(v, 1) for w, v in peak_rss.items()},
                "allocated_per_byte": {w: round(v, 3) for w, v in allocated.items()},
                "ratios": {
                    "throughput": round(mib_per_s["open_blob"] / mib_per_s["blobwriter"], 2),
                    "peak_rss": round(peak_rss["open_blob"] / max(peak_rss["blobwriter"], 1), 2),
                    "allocations": round(
                        allocated["open_blob"] / max(allocated["blobwriter"], 1e-9), 3
                    ),
                },
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB instead of 1 GiB")
    parser.add_argument("--size", type=int, help="bytes per timed upload")
    parser.add_argument("--alloc-size", type=int, help="bytes per traced upload")
    parser.add_argument("--chunk", type=int, default=8 * MiB)
    parser.add_argument("--piece", type=int, action="append", help="write size (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("WRITER", "URL"), help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        writer, url = args.child
        _child(writer, url, args.size, args.piece[0], args.chunk, args.trace)
        return
    pieces = tuple(args.piece) if args.piece else (64 * KiB, MiB)
    results = run(
        args.quick,
        size=args.size,
        alloc_size=args.alloc_size,
        chunk=args.chunk,
        pieces=pieces,
        rounds=args.rounds,
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
