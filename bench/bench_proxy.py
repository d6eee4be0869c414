"""Uploads through the proxy against the same bytes uploaded straight to GCS.

Everything runs against the strict GCS endpoint (``rup gcs-server``) in a process of its
own. The proxy runs as ``rup serve`` in another process, so its peak RSS (``VmHWM``) is its
own; a fresh proxy is started for each scenario. The client runs here.

* direct: google-resumable-media's ``ResumableUpload`` from the file, 16 MiB chunks;
* proxy, 1 and 4 connections: ``proxy.client_file``;
* 64 concurrent uploads (16 MiB each; 2 MiB with ``--quick``), one connection each;
* the floor of the proxy's CPU per GiB: a relay process that does per byte only what any
  proxy must (one receive, one CRC32C pass, one send), over as many loopback connections;
* a bare trio relay of the proxy's shape: the same, with the connections received at once
  by trio tasks and 16 MiB batches sent by a worker thread (:data:`_TRIO_RELAY`), which is
  what the proxy's architecture costs before any of its work.

The proxy's CPU per GiB is measured for each fresh proxy's first upload, and for 4
connections also for a second upload through the same, now warm, proxy (``_warm``): a fresh
process pays once for faulting in its buffers' memory and for its first session, which
weighs on a short (``--quick``) run.

Targets (issue 5): 4 connections at least 1.0x direct; the proxy's RSS under its total
buffer limit plus 64 MiB; all 64 concurrent uploads complete within that bound. Issue 13:
the proxy's CPU per GiB over 4 connections at most 0.7 s, reported beside the floor.

Run ``python -m bench.bench_proxy --quick`` (or ``--size MIB``) for a short run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import trio
from google.resumable_media.requests import ResumableUpload

from bench._rup_process import process_cpu_seconds, process_rss, rup_process
from faultnet.gcs.clients import anonymous_client
from proxy.client import ClientSettings, UploadOptions, upload_file

__all__ = ["main", "run"]

MiB = 1024 * 1024
GiB = 1024 * MiB
FULL_SIZE = 1024 * MiB
QUICK_SIZE = 128 * MiB
CONCURRENT_UPLOADS = 64
CONCURRENT_SIZE = 16 * MiB
QUICK_CONCURRENT_SIZE = 2 * MiB
DIRECT_CHUNK = 16 * MiB
#: each throughput is the best of this many interleaved rounds
ROUNDS = 3
QUICK_ROUNDS = 2
#: the proxy's buffer settings for every scenario (its memory bound is the total + 64 MiB)
UPLOAD_BUFFER_MIB = 64
TOTAL_BUFFER_MIB = 256
RSS_ALLOWANCE = 64 * MiB
BUCKET = "bench"
#: issue 13's target for the proxy's CPU seconds per GiB, 4 connections
CPU_TARGET = 0.7
FLOOR_CONNECTIONS = 4
#: The floor's relay, run as a process of its own: it accepts N connections and, one after
#: the other, receives each (1 MiB at a time, into fresh ``bytes`` as the proxy's receives
#: are, since google-crc32c takes only those), extends a CRC32C and sends every byte on to
#: the sink; it prints its port, then its CPU seconds at the end. One thread, so no GIL
#: hand-offs; glibc told to keep freed buffers (:data:`_KEEP_FREED_MEMORY`), so a receive
#: reuses memory instead of faulting in fresh zeroed pages: only the work itself is counted.
_FLOOR_RELAY = """
import socket, sys, time
import google_crc32c
listener = socket.create_server(("127.0.0.1", 0))
sink = ("127.0.0.1", int(sys.argv[1]))
print(listener.getsockname()[1], flush=True)
started = time.process_time()
for _ in range(int(sys.argv[2])):
    connection = listener.accept()[0]
    crc = 0
    with connection, socket.create_connection(sink) as out:
        while data := connection.recv(1 << 20):
            crc = google_crc32c.extend(crc, data)
            out.sendall(data)
print(time.process_time() - started, flush=True)
"""
#: The proxy's shape with nothing of its work: the relay above, but its connections received
#: at once by one trio task each (``os.read`` while bytes wait, ``wait_readable`` when none
#: do, as the proxy's receive loop), and every 16 MiB (the proxy's chunk here: a quarter of
#: its 64 MiB upload buffer) handed to a worker thread that sends it, as the proxy's writer
#: does a chunk. No protocol, no HTTP, no bookkeeping: what its architecture costs.
_TRIO_RELAY = """
import os, socket, sys, time
import google_crc32c, trio
sink = ("127.0.0.1", int(sys.argv[1]))
BATCH = 16 << 20
async def relay(connection):
    crc, batch, batched = 0, [], 0
    with socket.create_connection(sink) as out:
        while True:
            try:
                data = os.read(connection.fileno(), 1 << 20)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(connection)
                continue
            if data:
                crc = google_crc32c.extend(crc, data)
                batch.append(data)
                batched += len(data)
            if batched >= BATCH or (batch and not data):
                await trio.to_thread.run_sync(lambda pieces=batch: [out.sendall(p) for p in pieces])
                batch, batched = [], 0
            if not data:
                return
async def main():
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    print(listener.getsockname()[1], flush=True)
    started = time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(int(sys.argv[2])):
            nursery.start_soon(relay, (await listener.accept())[0])
    print(time.process_time() - started, flush=True)
trio.run(main)
"""
#: glibc's malloc otherwise maps each 1 MiB receive buffer afresh (a shortened receive
#: keeps its threshold below 1 MiB) and zeroes its pages: 0.74-1.0 s/GiB instead of 0.61-0.64
_KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 * MiB), "MALLOC_TRIM_THRESHOLD_": str(GiB)}
RESULTS = Path(__file__).resolve().parent / "results" / "proxy.json"


@contextlib.contextmanager
def _gcs_server() -> Iterator[str]:
    with rup_process("gcs-server", "--port", "0") as (_, url):
        anonymous_client(url).bucket(BUCKET).create()
        yield url


@contextlib.contextmanager
def _proxy(gcs_url: str) -> Iterator[tuple[tuple[str, int], int]]:
    with rup_process(
        "serve",
        "--listen", "127.0.0.1:0",
        "--gcs-endpoint", gcs_url,
        "--upload-buffer-mib", str(UPLOAD_BUFFER_MIB),
        "--total-buffer-mib", str(TOTAL_BUFFER_MIB),
    ) as (process, line):  # fmt: skip
        # "rup serve: listening on HOST:PORT (gcs: URL)"
        host, _, port = line.split("listening on ", 1)[1].split()[0].rpartition(":")
        yield (host, int(port)), process.pid


def _write_payload(path: Path, size: int) -> None:
    with path.open("wb") as file:
        remaining = size
        while remaining:
            block = os.urandom(min(remaining, 8 * MiB))
            file.write(block)
            remaining -= len(block)


def _direct(gcs_url: str, path: Path, name: str) -> float:
    """Seconds to upload ``path`` with google-resumable-media, chunk by chunk."""
    transport = requests.Session()
    upload_url = f"{gcs_url}/upload/storage/v1/b/{BUCKET}/o?uploadType=resumable"
    upload = ResumableUpload(upload_url, DIRECT_CHUNK)  # type: ignore[no-untyped-call]
    started = time.perf_counter()
    with path.open("rb") as stream:
        upload.initiate(  # type: ignore[no-untyped-call]
            transport, stream, {"name": name}, "application/octet-stream"
        )
        while not upload.finished:
            upload.transmit_next_chunk(transport)  # type: ignore[no-untyped-call]
    return time.perf_counter() - started


def _through_proxy(address: tuple[str, int], path: Path, name: str, connections: int) -> float:
    expected = path.stat().st_size

    async def go() -> float:
        started = time.perf_counter()
        # One session, as the figures were measured: a 1 GiB object would otherwise
        # be composite (past 150 MiB), a different path with segments of its own.
        options = UploadOptions(
            proxy=address, settings=ClientSettings(connections=connections), single_session=True
        )
        result = await upload_file(path, f"gs://{BUCKET}/{name}", options)
        if result.size != expected:
            raise RuntimeError(f"proxy reported {result.size} bytes for {name}")
        return time.perf_counter() - started

    return trio.run(go)


def _concurrent(address: tuple[str, int], path: Path, count: int) -> tuple[float, int]:
    """Seconds for ``count`` simultaneous one-connection uploads of ``path``; how many made it."""
    done = 0

    async def one(index: int) -> None:
        nonlocal done
        options = UploadOptions(proxy=address, settings=ClientSettings(connections=1))
        await upload_file(path, f"gs://{BUCKET}/concurrent-{index}", options)
        done += 1

    async def go() -> float:
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
        return time.perf_counter() - started

    return trio.run(go), done


def _drain(listener: socket.socket, count: int) -> None:
    """Accept ``count`` connections, one after the other, and read each to its end."""
    buffer = bytearray(MiB)
    for _ in range(count):
        connection = listener.accept()[0]
        with connection:
            while connection.recv_into(buffer):
                pass


def _relay_cpu_seconds(path: Path, relay_code: str = _FLOOR_RELAY) -> float:
    """CPU seconds a relay (the floor's, or :data:`_TRIO_RELAY`) spends moving ``path``'s
    bytes over 4 connections."""
    size = path.stat().st_size
    share = -(-size // FLOOR_CONNECTIONS)
    with socket.create_server(("127.0.0.1", 0)) as sink:
        sink_port = sink.getsockname()[1]
        drain = threading.Thread(target=_drain, args=(sink, FLOOR_CONNECTIONS))
        drain.start()
        relay = subprocess.Popen(
            [sys.executable, "-c", relay_code, str(sink_port), str(FLOOR_CONNECTIONS)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **_KEEP_FREED_MEMORY},
        )
        try:
            assert relay.stdout is not None
            port = int(relay.stdout.readline())

            def send(index: int) -> None:
                with path.open("rb") as file, socket.create_connection(("127.0.0.1", port)) as out:
                    out.sendfile(file, offset=index * share, count=min(share, size - index * share))

            senders = [threading.Thread(target=send, args=(i,)) for i in range(FLOOR_CONNECTIONS)]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
            seconds = float(relay.stdout.readline())
        finally:
            relay.kill()
            relay.wait()
            drain.join()
    return seconds


def run(quick: bool, size: int | None = None) -> dict[str, Any]:
    """Measure every scenario (throughputs: best of several rounds); writes :data:`RESULTS`."""
    size = size or (QUICK_SIZE if quick else FULL_SIZE)
    rounds = QUICK_ROUNDS if quick else ROUNDS
    concurrent_size = QUICK_CONCURRENT_SIZE if quick else CONCURRENT_SIZE
    rss_bound = TOTAL_BUFFER_MIB * MiB + RSS_ALLOWANCE
    result: dict[str, Any] = {"benchmark": "proxy", "size_bytes": size, "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp, _gcs_server() as gcs_url:
        payload = Path(tmp) / "payload.bin"
        _write_payload(payload, size)
        runs: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        peaks: dict[str, int] = {}
        floors: list[float] = []
        trio_relays: list[float] = []
        bucket = anonymous_client(gcs_url).bucket(BUCKET)
        for round_ in range(rounds):  # interleaved, so machine noise hits every scenario alike
            name = f"direct-{round_}.bin"
            runs.setdefault("direct", []).append(_direct(gcs_url, payload, name))
            bucket.blob(name).delete()  # the endpoint keeps objects in memory
            for connections in (1, 4):
                key = f"proxy_{connections}_connections"
                name = f"{key}-{round_}.bin"
                with _proxy(gcs_url) as (address, pid):
                    idle_cpu = process_cpu_seconds(pid)
                    runs.setdefault(key, []).append(
                        _through_proxy(address, payload, name, connections)
                    )
                    peaks[key] = max(peaks.get(key, 0), process_rss(pid))
                    cpu.setdefault(key, []).append(process_cpu_seconds(pid) - idle_cpu)
                    if connections == FLOOR_CONNECTIONS:
                        # The same upload again through the now warm proxy: what is left
                        # is per byte, without the first upload's one-off costs.
                        bucket.blob(name).delete()
                        warm_cpu = process_cpu_seconds(pid)
                        _through_proxy(address, payload, name, connections)
                        cpu.setdefault(f"{key}_warm", []).append(
                            process_cpu_seconds(pid) - warm_cpu
                        )
                bucket.blob(name).delete()
            floors.append(_relay_cpu_seconds(payload))
            trio_relays.append(_relay_cpu_seconds(payload, _TRIO_RELAY))
        seconds = {name: min(values) for name, values in runs.items()}
        small = Path(tmp) / "small.bin"
        _write_payload(small, concurrent_size)
        with _proxy(gcs_url) as (address, pid):
            concurrent_seconds, completed = _concurrent(address, small, CONCURRENT_UPLOADS)
            peaks["concurrent"] = process_rss(pid)

    mb_per_s = {name: size / value / 1e6 for name, value in seconds.items()}
    result.update(
        {
            "mb_per_s": {name: round(value, 1) for name, value in mb_per_s.items()},
            "ratio_to_direct": {
                name: round(value / mb_per_s["direct"], 3)
                for name, value in mb_per_s.items()
                if name != "direct"
            },
            "proxy_cpu_seconds_per_gib": {
                name: round(min(values) * GiB / size, 2) for name, values in cpu.items()
            },
            "proxy_peak_rss_bytes": peaks,
            "rss_bound_bytes": rss_bound,
            "concurrent": {
                "uploads": CONCURRENT_UPLOADS,
                "size_bytes": concurrent_size,
                "completed": completed,
                "seconds": round(concurrent_seconds, 2),
                "mb_per_s": round(
                    CONCURRENT_UPLOADS * concurrent_size / concurrent_seconds / 1e6, 1
                ),
            },
        }
    )
    cpu_per_gib = result["proxy_cpu_seconds_per_gib"]
    floor = min(floors) * GiB / size
    result["floor_cpu_seconds_per_gib"] = round(floor, 2)
    result["cpu_ratio_to_floor"] = {
        name: round(value / floor, 2) for name, value in cpu_per_gib.items()
    }
    trio_relay = min(trio_relays) * GiB / size
    result["trio_relay_cpu_seconds_per_gib"] = round(trio_relay, 2)
    result["cpu_ratio_to_trio_relay"] = {
        name: round(value / trio_relay, 2) for name, value in cpu_per_gib.items()
    }
    result["meets_targets"] = {
        "4_connections_at_least_direct": result["ratio_to_direct"]["proxy_4_connections"] >= 1.0,
        "4_connections_cpu_within_target": cpu_per_gib["proxy_4_connections"] <= CPU_TARGET,
        "rss_within_bound": all(peak <= rss_bound for peak in peaks.values()),
        "all_concurrent_completed": completed == CONCURRENT_UPLOADS,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_proxy", description=__doc__)
    parser.add_argument(
        "--size",
        type=int,
        metavar="MIB",
        help=f"MiB per upload (default {FULL_SIZE >> 20}; {QUICK_SIZE >> 20} with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args(argv)
    result = run(args.quick, args.size * MiB if args.size else None)
    print(
        f"proxy vs direct, {result['size_bytes'] >> 20} MiB to the strict GCS endpoint, "
        f"best of {result['rounds']}:"
    )
    for name, value in result["mb_per_s"].items():
        ratio = result["ratio_to_direct"].get(name, 1.0)
        print(f"  {name:<22} {value:8.1f} MB/s   {ratio:6.3f}x direct")
    for name, seconds in result["proxy_cpu_seconds_per_gib"].items():
        to_floor = result["cpu_ratio_to_floor"][name]
        to_relay = result["cpu_ratio_to_trio_relay"][name]
        print(
            f"  proxy CPU, {name:<22} {seconds:6.2f} s per GiB (all threads)"
            f"   {to_floor:5.2f}x the floor   {to_relay:5.2f}x a bare trio relay"
        )
    print(
        f"  floor: one receive, one CRC32C pass, one send per byte  "
        f"{result['floor_cpu_seconds_per_gib']:6.2f} s per GiB (target {CPU_TARGET})"
    )
    print(
        f"  a bare trio relay of the proxy's shape (trio receive loop, 16 MiB batches sent"
        f" by a worker thread)  {result['trio_relay_cpu_seconds_per_gib']:6.2f} s per GiB"
    )
    bound = result["rss_bound_bytes"] >> 20
    for name, peak in result["proxy_peak_rss_bytes"].items():
        print(f"  proxy peak RSS, {name:<22} {peak >> 20:5d} MiB (bound {bound} MiB)")
    concurrent = result["concurrent"]
    print(
        f"  {concurrent['uploads']} concurrent uploads of {concurrent['size_bytes'] >> 20} MiB: "
        f"{concurrent['completed']} completed in {concurrent['seconds']} s "
        f"({concurrent['mb_per_s']} MB/s)"
    )
    for target, met in result["meets_targets"].items():
        print(f"  target {target}: {'met' if met else 'MISSED'}")
    print(f"  written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
