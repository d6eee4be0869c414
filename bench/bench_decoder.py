"""The protocol decoder's throughput on WriteAt traffic, and its allocations.

A server `protocol.Connection` is fed ``--size`` bytes (default 1 GiB) of 1 MiB WriteAt frames,
delivered in 64 KiB ``bytes`` pieces as trio's ``receive_some`` would hand them over, and pulled
through ``next_event()`` by a consumer that only counts the payload it is given.

Two limits are measured over the very same pieces, in alternation with the decoder:

* **slicing limit** (the baseline the target is stated against): a plain loop that takes a
  ``memoryview`` slice of every piece. It touches no payload byte, so it is the ceiling for
  any decoder in Python.
* **checksummed limit**: the same loop plus CRC32C (google-crc32c) over every piece. The
  protocol verifies every payload byte, so this is the floor of what verifying costs; the
  gap between it and the decoder is the decoder's own framing overhead.

Allocations are measured with tracemalloc while one segment is decoded: the peak above the
level before decoding, which must not grow with the payload (the pieces themselves are
allocated beforehand, as a socket would).

``python -m bench.bench_decoder --quick`` decodes 128 MiB instead of 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Final

import google_crc32c

from protocol import (
    NEED_DATA,
    Connection,
    Hello,
    OpenUpload,
    Role,
    UploadOpened,
    WriteAt,
    WriteAtData,
)

__all__ = ["TARGET_RATIO", "run"]

TARGET_RATIO: Final = 0.5
RESULTS: Final = Path(__file__).parent / "results" / "decoder.json"
MiB: Final = 1024 * 1024
FRAME_DATA: Final = 1 * MiB
PIECE: Final = 64 * 1024
#: frames per segment; a segment is decoded by a fresh connection, as often as --size needs
SEGMENT_FRAMES: Final = 128


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


class Segment:
    """The bytes of one connection: a handshake, then `frames` WriteAt frames, in pieces."""

    def __init__(self, frames: int) -> None:
        client = Connection(Role.CLIENT, max_frame_size=FRAME_DATA)
        server = Connection(Role.SERVER, max_frame_size=FRAME_DATA)
        # Hello and OpenUpload each wait for their reply before anything else may be sent.
        self.hello = client.send_bytes(client.hello())
        client.receive_data(self._answer(server, self.hello))
        client.next_event()
        self.open = client.send_bytes(OpenUpload("bench", "decoder"))
        client.receive_data(self._answer(server, self.open))
        client.next_event()
        payload = os.urandom(FRAME_DATA)
        stream = bytearray()
        for index in range(frames):
            for buffer in client.send(WriteAt(index * FRAME_DATA, payload)):
                stream += buffer
        # Separate bytes objects, like the ones a socket returns.
        self.pieces = [bytes(stream[i : i + PIECE]) for i in range(0, len(stream), PIECE)]
        self.payload_bytes = frames * FRAME_DATA
        self.wire_bytes = len(stream)

    @staticmethod
    def _answer(server: Connection, request: bytes) -> bytes:
        server.receive_data(request)
        event = server.next_event()
        if isinstance(event, Hello):
            return server.send_bytes(server.welcome(event))
        assert isinstance(event, OpenUpload), event
        return server.send_bytes(UploadOpened(event.seq, b"token", 0, False))

    def ready_server(self) -> Connection:
        """A server connection that has taken the handshake and waits for the WriteAts."""
        server = Connection(Role.SERVER, max_frame_size=FRAME_DATA)
        self._answer(server, self.hello)
        self._answer(server, self.open)
        return server


def _decode_next(servers: list[Connection], pieces: list[bytes]) -> int:
    return decode(servers.pop(), pieces)


def decode(server: Connection, pieces: list[bytes]) -> int:
    """Feed every piece and pull every event; returns the payload bytes seen."""
    receive_data = server.receive_data
    next_event = server.next_event
    seen = 0
    for piece in pieces:
        receive_data(piece)
        while (event := next_event()) is not NEED_DATA:
            if type(event) is WriteAtData:
                seen += len(event.data)
    return seen


def slicing_limit(pieces: list[bytes]) -> int:
    seen = 0
    for piece in pieces:
        view = memoryview(piece)[: len(piece)]
        seen += len(view)
    return seen


def checksummed_limit(pieces: list[bytes]) -> int:
    extend = google_crc32c.extend
    crc = 0
    seen = 0
    for piece in pieces:
        view = memoryview(piece)[: len(piece)]
        crc = extend(crc, piece)
        seen += len(view)
    return seen


def _timed(function: Callable[[], int], passes: int, expected: int) -> float:
    """CPU seconds for `passes` runs of `function`, each of which must see `expected` bytes.

    CPU time, not wall time: all three loops are single-threaded and CPU-bound, and on a shared
    machine wall time mostly measures the neighbours.
    """
    elapsed = 0.0
    for _ in range(passes):
        started = time.process_time()
        seen = function()
        elapsed += time.process_time() - started
        assert seen >= expected, (seen, expected)
    return elapsed


def measure_allocations(segment: Segment) -> dict[str, Any]:
    server = segment.ready_server()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        decode(server, segment.pieces)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = peak - before
    return {
        "alloc_peak_bytes": growth,
        "alloc_peak_per_payload_byte": round(growth / segment.payload_bytes, 6),
    }


def run(quick: bool, size: int | None = None, rounds: int = 5) -> dict[str, Any]:
    """Measure; returns (and writes to bench/results/decoder.json) the results."""
    size = size or (128 * MiB if quick else 1024 * MiB)
    segment_frames = min(SEGMENT_FRAMES, max(1, size // FRAME_DATA))
    segment = Segment(segment_frames)
    passes = max(1, size // segment.payload_bytes)
    payload = passes * segment.payload_bytes
    wire = passes * segment.wire_bytes
    pieces = segment.pieces

    decoder_s, slicing_s, checksummed_s = [], [], []
    for _ in range(rounds):
        servers = [segment.ready_server() for _ in range(passes)]
        decoder_s.append(
            _timed(partial(_decode_next, servers, pieces), passes, segment.payload_bytes)
        )
        slicing_s.append(_timed(lambda: slicing_limit(pieces), passes, segment.wire_bytes))
        checksummed_s.append(_timed(lambda: checksummed_limit(pieces), passes, segment.wire_bytes))

    # Best of the rounds: on a shared machine the minimum is the run least disturbed by others,
    # and all three loops were measured in alternation, so they had the same chances.
    decoder_rate = wire / min(decoder_s)
    slicing_rate = wire / min(slicing_s)
    checksummed_rate = wire / min(checksummed_s)
    result: dict[str, Any] = {
        "benchmark": "decoder",
        "quick": quick,
        "payload_bytes": payload,
        "wire_bytes": wire,
        "frame_data_bytes": FRAME_DATA,
        "piece_bytes": PIECE,
        "rounds": rounds,
        "crc32c_implementation": google_crc32c.implementation,
        "decoder_gb_per_s": round(decoder_rate / 1e9, 3),
        "slicing_limit_gb_per_s": round(slicing_rate / 1e9, 3),
        "checksummed_limit_gb_per_s": round(checksummed_rate / 1e9, 3),
        "ratio_to_slicing_limit": round(decoder_rate / slicing_rate, 3),
        "ratio_to_checksummed_limit": round(decoder_rate / checksummed_rate, 3),
        "target_ratio": TARGET_RATIO,
        "decoder_gb_per_s_median": round(wire / statistics.median(decoder_s) / 1e9, 3),
        "decoder_overhead_us_per_piece": round(
            (min(decoder_s) - min(checksummed_s)) / (passes * len(pieces)) * 1e6, 3
        ),
        **measure_allocations(segment),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="decode 128 MiB instead of 1 GiB")
    parser.add_argument("--size", type=_parse_size, help="payload to decode, e.g. 256M")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (best)")
    args = parser.parse_args()
    result = run(args.quick, args.size, args.rounds)
    mib = result["payload_bytes"] / MiB
    print(
        f"decoded {mib:.0f} MiB of {FRAME_DATA // MiB} MiB WriteAt frames in {PIECE // 1024}"
        f" KiB pieces (CRC32C: {result['crc32c_implementation']})"
    )
    print(f"  decoder            {result['decoder_gb_per_s']:8.3f} GB/s")
    print(
        f"  slicing limit      {result['slicing_limit_gb_per_s']:8.3f} GB/s"
        f"   decoder/limit = {result['ratio_to_slicing_limit']:.3f}"
        f" (target >= {TARGET_RATIO})"
    )
    print(
        f"  checksummed limit  {result['checksummed_limit_gb_per_s']:8.3f} GB/s"
        f"   decoder/limit = {result['ratio_to_checksummed_limit']:.3f}"
    )
    print(f"  framing overhead   {result['decoder_overhead_us_per_piece']:8.3f} us per piece")
    print(
        f"  allocation peak    {result['alloc_peak_bytes']:8d} bytes"
        f" ({result['alloc_peak_per_payload_byte']:.6f} per payload byte)"
    )
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
