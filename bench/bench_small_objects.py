"""Small objects per second: 1,000 x 4 KiB through the proxy against direct uploads.

The strict GCS endpoint (``rup gcs-server``) and the proxy (``rup serve``) each run in a
process of their own; the clients run here. The same files are uploaded four ways:

* direct: google-cloud-storage ``Blob.upload_from_filename`` (one multipart request each),
  one at a time, then from 16 threads at once;
* proxy: :func:`proxy.client.upload_many`, one at a time, then 16 at once: each object is
  one ``PUT_OBJECT`` on a pooled connection (protocol version 2), which the proxy stores
  with one multipart request.

The ratios (proxy / direct, at each concurrency) are the claims; targets (issue 13): at
least 1.0x at 16 at a time and 0.5x at 1. The objects go in rounds, each way in turn
within a round (the first way alternating), so that noise from a shared machine hits both
alike; a ratio is the median of the rounds' ratios, printed with their range. Both ways
reach GCS through a relay here that counts HTTP requests, so the run also reports GCS
requests per object (target: 1), and the proxy's CPU per object (its process, all threads).

Run ``python -m bench.bench_small_objects --count 200`` for a quick run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import trio

from bench._rup_process import process_cpu_seconds, rup_process, serve_address
from faultnet.gcs.clients import anonymous_client
from proxy.client import UploadOptions, UploadResult, upload_many
from proxy.server.backend import pooled_session

__all__ = ["RequestCountingRelay", "counted_proxy", "main", "run"]

KiB: Final = 1024
OBJECT_SIZE: Final = 4 * KiB
FULL_COUNT: Final = 1000
QUICK_COUNT: Final = 200
CONCURRENCY: Final = 16
#: rounds each scenario's objects are split into, the two ways taking turns
ROUNDS: Final = 4
BUCKET: Final = "bench-small"
RESULTS: Final = Path(__file__).resolve().parent / "results" / "small_objects.json"


def _payload(index: int) -> bytes:
    return index.to_bytes(4, "big") * (OBJECT_SIZE // 4)


class RequestCountingRelay:
    """A TCP relay in front of the GCS endpoint that counts the HTTP requests sent through it
    (request lines ending `` HTTP/1.1``; the bench's payloads never contain that text)."""

    _MARK: Final = b" HTTP/1.1\r\n"

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self._upstream)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        tail = b""
        try:
            while data := source.recv(256 * KiB):
                if count:
                    seen = tail + data
                    with self._lock:
                        self.requests += seen.count(self._MARK)
                    tail = seen[-(len(self._MARK) - 1) :]
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


@contextlib.contextmanager
def counted_proxy(bucket: str) -> Iterator[tuple[str, RequestCountingRelay, tuple[str, int]]]:
    """A GCS endpoint (``rup gcs-server``) holding ``bucket``, a :class:`RequestCountingRelay`
    in front of it, and ``rup serve`` storing through the relay: yields the endpoint's URL,
    the relay and the proxy's address."""
    with _counted_proxy_process(bucket) as (gcs_url, relay, address, _):
        yield gcs_url, relay, address


@contextlib.contextmanager
def _counted_proxy_process(
    bucket: str,
) -> Iterator[tuple[str, RequestCountingRelay, tuple[str, int], int]]:
    """:func:`counted_proxy`, and the process id of ``rup serve``."""
    with rup_process("gcs-server", "--port", "0") as (_, gcs_url):
        anonymous_client(gcs_url).bucket(bucket).create()
        host, _, port = gcs_url.removeprefix("http://").rstrip("/").rpartition(":")
        relay = RequestCountingRelay((host, int(port)))
        try:
            serve = ["serve", "--listen", "127.0.0.1:0", "--gcs-endpoint", relay.url]
            with rup_process(*serve) as (process, line):
                yield gcs_url, relay, serve_address(line), process.pid
        finally:
            relay.close()


def _write_files(directory: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = directory / f"{index}.bin"
        path.write_bytes(_payload(index))
        paths.append(path)
    return paths


def _direct(gcs_url: str, files: list[tuple[int, Path]], concurrency: int, prefix: str) -> float:
    """Seconds to upload every ``(index, file)`` straight to GCS as ``prefix/index``,
    ``concurrency`` at a time."""
    bucket = anonymous_client(gcs_url, http=pooled_session(concurrency)).bucket(BUCKET)

    def upload(file: tuple[int, Path]) -> None:
        index, path = file
        bucket.blob(f"{prefix}/{index}").upload_from_filename(path)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(upload, files))
    return time.perf_counter() - started


def _through_proxy(
    address: tuple[str, int], files: list[tuple[int, Path]], concurrency: int, prefix: str
) -> float:
    """Seconds to upload every ``(index, file)`` through the proxy with upload_many as
    ``prefix/index``, ``concurrency`` at a time (the pool's connections are opened within
    the timed part)."""
    pairs = [(path, f"gs://{BUCKET}/{prefix}/{index}") for index, path in files]
    started = time.perf_counter()
    outcomes = trio.run(
        functools.partial(upload_many, pairs, UploadOptions(proxy=address), concurrency=concurrency)
    )
    elapsed = time.perf_counter() - started
    for index, outcome in enumerate(outcomes):
        if not isinstance(outcome, UploadResult) or outcome.size != OBJECT_SIZE:
            raise RuntimeError(f"object {index} was not stored: {outcome!r}")
    return elapsed


def run(quick: bool, count: int | None = None) -> dict[str, Any]:
    """Upload ``count`` small objects each way; also writes :data:`RESULTS`."""
    count = count or (QUICK_COUNT if quick else FULL_COUNT)
    rounds = min(ROUNDS, count)
    seconds: dict[str, float] = {}
    requests: dict[str, int] = {}
    proxy_cpu: dict[str, float] = {}
    round_ratios: dict[str, list[float]] = {}
    with (
        tempfile.TemporaryDirectory() as directory,
        _counted_proxy_process(BUCKET) as (_, relay, address, serve_pid),
    ):
        files = list(enumerate(_write_files(Path(directory), count)))
        batches = [files[begin::rounds] for begin in range(rounds)]
        # first uses (imports, the endpoint's first connections) are not what is measured
        _direct(relay.url, files[:1], 1, "warm-up")
        _through_proxy(address, files[:1], 1, "warm-up")
        for concurrency in (1, CONCURRENCY):
            scenario = f"x{concurrency}"
            round_ratios[scenario] = []
            for round_index, batch in enumerate(batches):
                ways = ("direct", "proxy") if round_index % 2 == 0 else ("proxy", "direct")
                elapsed: dict[str, float] = {}
                for way in ways:
                    name = f"{way}_{scenario}"
                    requests_before = relay.requests
                    cpu_before = process_cpu_seconds(serve_pid)
                    if way == "direct":
                        elapsed[way] = _direct(relay.url, batch, concurrency, name)
                    else:
                        elapsed[way] = _through_proxy(address, batch, concurrency, name)
                    seconds[name] = seconds.get(name, 0.0) + elapsed[way]
                    requests[name] = requests.get(name, 0) + relay.requests - requests_before
                    proxy_cpu[name] = proxy_cpu.get(name, 0.0) + (
                        process_cpu_seconds(serve_pid) - cpu_before
                    )
                round_ratios[scenario].append(elapsed["direct"] / elapsed["proxy"])
    per_second = {name: count / value for name, value in seconds.items()}
    result: dict[str, Any] = {
        "benchmark": "small_objects",
        "objects": count,
        "object_bytes": OBJECT_SIZE,
        "rounds": rounds,
        "uploads_per_second": {name: round(value, 1) for name, value in per_second.items()},
        "gcs_requests_per_object": {
            name: round(value / count, 3) for name, value in requests.items()
        },
        "ratio_to_direct": {
            scenario: round(statistics.median(ratios), 3)
            for scenario, ratios in round_ratios.items()
        },
        "ratio_range": {
            scenario: [round(min(ratios), 3), round(max(ratios), 3)]
            for scenario, ratios in round_ratios.items()
        },
        "proxy_cpu_ms_per_object": {
            scenario: round(1000 * proxy_cpu[f"proxy_{scenario}"] / count, 2)
            for scenario in round_ratios
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_small_objects", description=__doc__
    )
    parser.add_argument(
        "--count",
        type=int,
        help=f"objects per scenario (default {FULL_COUNT}; {QUICK_COUNT} quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args(argv)
    result = run(args.quick, args.count)
    print(f"{result['objects']} x {OBJECT_SIZE // KiB} KiB objects, uploads per second:")
    for concurrency in (1, CONCURRENCY):
        scenario = f"x{concurrency}"
        direct = result["uploads_per_second"][f"direct_{scenario}"]
        proxied = result["uploads_per_second"][f"proxy_{scenario}"]
        ratio = result["ratio_to_direct"][scenario]
        low, high = result["ratio_range"][scenario]
        per_object = result["gcs_requests_per_object"]
        print(
            f"  {concurrency:>2} at a time: direct {direct:8.1f}/s   proxy {proxied:8.1f}/s"
            f"   {ratio:.3f}x direct ({low:.2f}-{high:.2f} over {result['rounds']} rounds)"
            f"   proxy CPU {result['proxy_cpu_ms_per_object'][scenario]:.2f} ms/object"
            f"   GCS requests per object: direct {per_object[f'direct_{scenario}']:.2f},"
            f" proxy {per_object[f'proxy_{scenario}']:.2f}"
        )
    print(f"  written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
