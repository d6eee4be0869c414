"""How fast the strict GCS endpoint ingests resumable chunks (memory mode).

Two measurements:

* one upload: ``--size`` bytes in ``--chunk`` byte PUTs over one keep-alive connection,
  from a raw-socket client in a separate process (so client and server do not share a
  GIL), finalized at the end; the rate counts the chunk PUTs only, then the finalize
  (which computes the object's MD5) is reported on its own;
* concurrent uploads: ``--uploads`` clients at once, each its own upload, same chunking.

Baseline: the 1 GB/s target (issue 3, "Speed and load"); the ratio printed is measured /
target. ``python -m bench.bench_gcs_ingest --size 256M`` is the quick run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from faultnet.gcs import UPLOAD_QUANTUM, GcsServer
from faultnet.gcs.clients import start_resumable_upload

__all__ = ["TARGET_BYTES_PER_SECOND", "run"]

TARGET_BYTES_PER_SECOND = 1e9
RESULTS = Path(__file__).parent / "results" / "gcs_ingest.json"
_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in _SUFFIXES:
        return int(float(text[:-1]) * _SUFFIXES[text[-1]])
    return int(text)


def _read_response(sock: socket.socket, pending: bytearray) -> int:
    """Read one response with a Content-Length body; returns its status."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        pending += chunk
    head_end = pending.index(b"\r\n\r\n") + 4
    head = bytes(pending[:head_end]).decode("latin-1")
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value)
    while len(pending) < head_end + length:
        pending += sock.recv(65536)
    del pending[: head_end + length]
    return int(head.split(" ")[1])


def _upload(session_uri: str, size: int, chunk_size: int) -> tuple[float, float]:
    """Upload ``size`` bytes; returns (seconds for the chunk PUTs, seconds to finalize)."""
    parts = urlsplit(session_uri)
    target = f"{parts.path}?{parts.query}"
    payload = memoryview((bytes(range(251)) * (chunk_size // 251 + 1))[:chunk_size])
    pending = bytearray()
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        offset = 0
        last_chunk_done = started
        while offset < size:
            length = min(chunk_size, size - offset)
            final = offset + length == size
            total = str(size) if final else "*"
            head = (
                f"PUT {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Content-Range: bytes {offset}-{offset + length - 1}/{total}\r\n"
                f"Content-Length: {length}\r\n\r\n"
            ).encode()
            if final:
                last_chunk_done = time.perf_counter()
            sock.sendall(head)
            sock.sendall(payload[:length])
            status = _read_response(sock, pending)
            if status != (200 if final else 308):
                raise RuntimeError(f"unexpected status {status} at offset {offset}")
            offset += length
        finished = time.perf_counter()
    return last_chunk_done - started, finished - last_chunk_done


def _upload_worker(args: tuple[str, int, int]) -> tuple[float, float]:
    return _upload(*args)


def _stream_to(address: tuple[str, int], size: int, chunk_size: int) -> None:
    payload = memoryview(bytes(chunk_size))
    with socket.create_connection(address) as sock:
        for _ in range(size // chunk_size):
            sock.sendall(payload)


def _loopback_ceiling(pool: Any, size: int, chunk_size: int) -> float:
    """Bytes/s of a bare socket read into fresh buffers: this machine's ceiling right now."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sent = pool.apply_async(_stream_to, (listener.getsockname(), size, chunk_size))
        connection, _ = listener.accept()
        with connection:
            started = time.perf_counter()
            received = 0
            while received < size // chunk_size * chunk_size:
                view = memoryview(bytearray(chunk_size))
                position = 0
                while position < chunk_size:
                    count = connection.recv_into(view[position:])
                    if not count:
                        raise ConnectionError("sender stopped early")
                    position += count
                received += chunk_size
            seconds = time.perf_counter() - started
        sent.get()
    return received / seconds


def _warm_up(_: int) -> None:
    """Nothing: runs once per worker process so its start-up is not measured."""


def _upload_all_at_once(jobs: list[tuple[str, int, int]]) -> None:
    """Run every job at the same time, one thread (and connection) each."""
    with ThreadPoolExecutor(len(jobs)) as threads:
        list(threads.map(_upload_worker, jobs))


def run(
    quick: bool,
    *,
    size: int | None = None,
    chunk: int = 8 << 20,
    uploads: int = 64,
    compute_md5: bool = True,
) -> dict[str, Any]:
    """Measure; ``quick`` uses 256 MiB instead of 1 GiB for the single upload."""
    size = size or ((256 << 20) if quick else (1 << 30))
    # Whole chunks only, plus one small final chunk, so the chunk rate is clean.
    size = max(chunk, size - size % chunk) + 1024
    # Each concurrent upload: several chunks, so uploads really overlap.
    concurrent_chunk = max(
        UPLOAD_QUANTUM, min(chunk, size // uploads // 4) // UPLOAD_QUANTUM * UPLOAD_QUANTUM
    )
    concurrent_size = 4 * concurrent_chunk + 1024
    context = multiprocessing.get_context("spawn")
    with GcsServer(compute_md5=compute_md5) as server:
        server.store.create_bucket("bench")
        uri = start_resumable_upload(server.url, "bench", "single")
        with context.Pool(1) as pool:
            pool.apply(_warm_up, (0,))
            ceiling = _loopback_ceiling(pool, size, chunk)
            cpu_before = time.process_time()
            chunk_seconds, finalize_seconds = pool.apply(_upload_worker, ((uri, size, chunk),))
            server_cpu_seconds = time.process_time() - cpu_before
        chunk_bytes = size - 1024
        single_rate = chunk_bytes / chunk_seconds
        # This process is the server only (clients run in others), so its CPU time per
        # byte is what ingest costs, whatever else the machine is doing meanwhile.
        cpu_rate = size / server_cpu_seconds
        server.store.delete_object("bench", "single")

        uris = [
            start_resumable_upload(server.url, "bench", f"concurrent-{i}") for i in range(uploads)
        ]
        jobs = [(u, concurrent_size, concurrent_chunk) for u in uris]
        processes = 2  # client threads in two processes: the client is not the bottleneck
        with context.Pool(processes) as pool:
            pool.map(_warm_up, range(processes))  # imports happen before the clock starts
            cpu_before = time.process_time()
            started = time.perf_counter()
            pool.map(_upload_all_at_once, [jobs[i::processes] for i in range(processes)])
            concurrent_seconds = time.perf_counter() - started
            concurrent_cpu_seconds = time.process_time() - cpu_before
        concurrent_rate = uploads * concurrent_size / concurrent_seconds
        ok = sum(1 for info in server.store.list_objects("bench") if info.size == concurrent_size)
    result = {
        "benchmark": "gcs_ingest",
        "quick": quick,
        "compute_md5": compute_md5,
        "chunk_bytes": chunk,
        "single_upload_bytes": size,
        "single_chunk_ingest_bytes_per_second": single_rate,
        "single_finalize_seconds": finalize_seconds,
        "single_server_cpu_seconds": server_cpu_seconds,
        "single_bytes_per_server_cpu_second": cpu_rate,
        "concurrent_uploads": uploads,
        "concurrent_upload_bytes_each": concurrent_size,
        "concurrent_chunk_bytes": concurrent_chunk,
        "concurrent_completed": ok,
        "concurrent_bytes_per_second": concurrent_rate,
        "concurrent_bytes_per_server_cpu_second": uploads
        * concurrent_size
        / concurrent_cpu_seconds,
        "loopback_ceiling_bytes_per_second": ceiling,
        "single_ratio_to_loopback_ceiling": single_rate / ceiling,
        "target_bytes_per_second": TARGET_BYTES_PER_SECOND,
        "single_ratio_to_target": single_rate / TARGET_BYTES_PER_SECOND,
        "concurrent_ratio_to_target": concurrent_rate / TARGET_BYTES_PER_SECOND,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_parse_size, default=None, help="single upload size")
    parser.add_argument("--chunk", type=_parse_size, default=8 << 20, help="chunk size")
    parser.add_argument("--uploads", type=int, default=64, help="concurrent uploads")
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    parser.add_argument("--no-md5", dest="md5", action="store_false", help="server skips MD5")
    args = parser.parse_args()
    result = run(
        args.quick, size=args.size, chunk=args.chunk, uploads=args.uploads, compute_md5=args.md5
    )
    mb = 1e6
    print(
        f"single upload: {result['single_chunk_ingest_bytes_per_second'] / mb:,.0f} MB/s chunk "
        f"ingest ({result['single_ratio_to_target']:.2f}x the 1 GB/s target); "
        f"finalize {result['single_finalize_seconds'] * 1e3:,.0f} ms"
    )
    print(
        f"bare loopback socket right now: {result['loopback_ceiling_bytes_per_second'] / mb:,.0f}"
        f" MB/s; the server reaches {result['single_ratio_to_loopback_ceiling']:.2f}x of it"
    )
    print(
        f"server CPU: {result['single_bytes_per_server_cpu_second'] / mb:,.0f} MB per CPU-second "
        f"(all threads, hashing included; "
        f"{result['single_bytes_per_server_cpu_second'] / TARGET_BYTES_PER_SECOND:.2f}x target)"
    )
    print(
        f"{result['concurrent_uploads']} concurrent uploads: "
        f"{result['concurrent_bytes_per_second'] / mb:,.0f} MB/s total "
        f"({result['concurrent_ratio_to_target']:.2f}x target), "
        f"{result['concurrent_completed']}/{result['concurrent_uploads']} completed; "
        f"{result['concurrent_bytes_per_server_cpu_second'] / mb:,.0f} MB per server CPU-second"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
