"""The writer's CPU per GiB with and without the caller's CRC32Cs (issue 13 #5).

The proxy verifies each frame's CRC32C as it arrives; given to the writer
(``write_at(..., crc32c=)``, ``PendingWrite.commit(crc32c=)``), it spares the writer a
second pass over every byte. This uploads ``--size`` bytes to the strict endpoint (in its
own process, memory mode, so its CPU is not counted) in 1 MiB frames, each staged as the
proxy stages a frame: fed as views of 256 KiB receive buffers (each also holding a frame
header, so no view is a whole ``bytes``), then committed. Rounds
alternate between committing without a CRC32C ("before": the writer reads every byte) and
with the frame's ("after": combined). Reported: this process's CPU seconds (all threads)
per GiB, medians, and the bytes the writer read to checksum.

``python -m bench.bench_writer_crc --size 1G --rounds 3``
"""

from __future__ import annotations

import argparse
import statistics
import time

import google_crc32c
import trio

from bench._rup_process import rup_process
from bench.bench_writer import PATTERN, MiB, _parse_size
from faultnet.gcs.clients import anonymous_client
from reliablewriter import WriterSettings, open_writer

FRAME = 1 * MiB
RECEIVE = 256 * 1024
GiB = 1024 * MiB
_HEADER = bytes(24)


def _frames() -> list[tuple[list[memoryview], int]]:
    """The frames of PATTERN: each as the receive-buffer views it arrives in, and its CRC."""
    frames = []
    for start in range(0, len(PATTERN), FRAME):
        frame = PATTERN[start : start + FRAME]
        # Receive buffers that also hold a frame header, so each view is part of a larger
        # object, as the proxy's are (and so the checksum cannot take a whole ``bytes``).
        buffers = [
            _HEADER + frame[cut : cut + RECEIVE - len(_HEADER)]
            for cut in range(0, FRAME, RECEIVE - len(_HEADER))
        ]
        views = [memoryview(buffer)[len(_HEADER) :] for buffer in buffers]
        frames.append((views, google_crc32c.value(frame)))
    return frames


async def _upload(url: str, size: int, with_crc: bool) -> tuple[float, int]:
    frames = _frames()
    settings = WriterSettings(min_chunk_size=8 * MiB, max_chunk_size=8 * MiB, buffer_limit=64 * MiB)
    bucket = anonymous_client(url).bucket("bench")
    started = time.process_time()
    async with open_writer(bucket, f"crc-{with_crc}", settings) as writer:
        for index, offset in enumerate(range(0, size, FRAME)):
            await writer.wait_for_window(offset + FRAME)
            views, crc = frames[index % len(frames)]
            with writer.begin_write(offset, FRAME) as staged:
                for view in views:
                    staged.feed(view)
                staged.commit(crc32c=crc if with_crc else None)
        await writer.complete()
    return time.process_time() - started, writer.stats.bytes_checksummed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=_parse_size, default=512 * MiB)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    size = arguments.size - arguments.size % FRAME
    results: dict[bool, list[float]] = {False: [], True: []}
    read: dict[bool, int] = {}
    with rup_process("gcs-server", "--no-md5") as (_, url):
        anonymous_client(url).create_bucket("bench")
        for _ in range(arguments.rounds):
            for with_crc in (False, True):
                cpu, read[with_crc] = trio.run(_upload, url, size, with_crc)
                results[with_crc].append(cpu * GiB / size)
    for with_crc, label in ((False, "before (every byte read)"), (True, "after (known CRC32Cs)")):
        runs = ", ".join(f"{value:.3f}" for value in results[with_crc])
        print(
            f"{label}: {statistics.median(results[with_crc]):.3f} CPU s/GiB ({runs}); "
            f"bytes read to checksum: {read[with_crc]}"
        )


if __name__ == "__main__":
    main()
