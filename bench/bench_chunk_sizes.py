"""ReliableWriter throughput against chunk size, beside google-resumable-media's.

The measurements are bench_writer's (``writer_throughput`` and ``anchor_throughput``,
against ``rup gcs-server`` in its own process); this benchmark repeats them for chunk sizes
from 256 KiB to 32 MiB, so the report can plot how each writer depends on the chunk size.
The claim is ReliableWriter's throughput as a ratio to the anchor's at every chunk size.

Run ``python -m bench.bench_chunk_sizes --quick`` for a short run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Final

from bench.bench_writer import anchor_throughput, gcs_endpoint, writer_throughput

__all__ = ["main", "run"]

MiB: Final = 1024 * 1024
CHUNK_SIZES: Final = (256 * 1024, 1 * MiB, 4 * MiB, 8 * MiB, 16 * MiB, 32 * MiB)
FULL_SIZE: Final = 256 * MiB
QUICK_SIZE: Final = 64 * MiB
#: uploads per writer and chunk size in a full run; the best counts
ROUNDS: Final = 2
#: the writer's window must hold a whole chunk; 64 MiB is its default
MIN_BUFFER_LIMIT: Final = 64 * MiB
RESULTS: Final = Path(__file__).resolve().parent / "results" / "chunk_sizes.json"


def run(quick: bool, size: int | None = None) -> dict[str, Any]:
    """Best of a few uploads per writer and chunk size, alternating; writes :data:`RESULTS`."""
    size = size or (QUICK_SIZE if quick else FULL_SIZE)
    rounds = 1 if quick else ROUNDS
    sweep = []
    with gcs_endpoint() as url:
        for chunk in CHUNK_SIZES:
            buffer_limit = max(MIN_BUFFER_LIMIT, 2 * chunk)
            writer = anchor = 0.0
            for _ in range(rounds):  # alternating, so load on the machine hits both alike
                writer = max(writer, writer_throughput(url, size, chunk, buffer_limit))
                anchor = max(anchor, anchor_throughput(url, size, chunk))
            sweep.append(
                {
                    "chunk_size": chunk,
                    "reliablewriter_mib_s": round(writer / MiB, 1),
                    "resumable_media_mib_s": round(anchor / MiB, 1),
                }
            )
    result: dict[str, Any] = {
        "benchmark": "chunk_sizes",
        "size_bytes": size,
        "rounds": rounds,
        "chunk_sweep": sweep,
        "ratio_to_anchor": {
            f"chunk_{point['chunk_size'] // 1024}k": round(
                point["reliablewriter_mib_s"] / point["resumable_media_mib_s"], 3
            )
            for point in sweep
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_chunk_sizes", description=__doc__)
    parser.add_argument(
        "--size", type=int, metavar="MIB",
        help=f"MiB per upload (default {FULL_SIZE // MiB}; {QUICK_SIZE // MiB} with --quick)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args(argv)
    result = run(args.quick, args.size * MiB if args.size else None)
    print(f"throughput against chunk size, {result['size_bytes'] // MiB} MiB per upload:")
    for point in result["chunk_sweep"]:
        ratio = point["reliablewriter_mib_s"] / point["resumable_media_mib_s"]
        print(
            f"  chunk {point['chunk_size'] // 1024:>6} KiB: ReliableWriter"
            f" {point['reliablewriter_mib_s']:7.1f} MiB/s, google-resumable-media"
            f" {point['resumable_media_mib_s']:7.1f} MiB/s, {ratio:.2f}x"
        )
    print(f"  written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
