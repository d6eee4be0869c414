"""Small objects per second: 1,000 x 4 KiB through the proxy against direct uploads.

The strict GCS endpoint (``rup gcs-server``) and the proxy (``rup serve``) each run in a
process of their own; the clients run here. The same files are uploaded four ways:

* direct: google-cloud-storage ``Blob.upload_from_filename`` (one multipart request each),
  one at a time, then from 16 threads at once;
* proxy: :func:`proxy.client.upload_many`, one at a time, then 16 at once: each object is
  one ``PUT_OBJECT`` on a pooled connection (protocol version 2), which the proxy stores
  with one multipart request.

The ratios (proxy / direct, at each concurrency) are the claims; targets (issue 13): at
least 1.0x at 16 at a time and 0.5x at 1. Both ways reach GCS through a relay here that
counts HTTP requests, so the run also reports GCS requests per object (target: 1).

Run ``python -m bench.bench_small_objects --count 200`` for a quick run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import trio

from bench._rup_process import rup_process, serve_address
from faultnet.gcs.clients import anonymous_client
from proxy.client import UploadOptions, UploadResult, upload_many
from proxy.server.backend import pooled_session

__all__ = ["RequestCountingRelay", "counted_proxy", "main", "run"]

KiB: Final = 1024
OBJECT_SIZE: Final = 4 * KiB
FULL_COUNT: Final = 1000
QUICK_COUNT: Final = 200
CONCURRENCY: Final = 16
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
    with rup_process("gcs-server", "--port", "0") as (_, gcs_url):
        anonymous_client(gcs_url).bucket(bucket).create()
        host, _, port = gcs_url.removeprefix("http://").rstrip("/").rpartition(":")
        relay = RequestCountingRelay((host, int(port)))
        try:
            serve = ["serve", "--listen", "127.0.0.1:0", "--gcs-endpoint", relay.url]
            with rup_process(*serve) as (_, line):
                yield gcs_url, relay, serve_address(line)
        finally:
            relay.close()


def _write_files(directory: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = directory / f"{index}.bin"
        path.write_bytes(_payload(index))
        paths.append(path)
    return paths


def _direct(gcs_url: str, paths: list[Path], concurrency: int, prefix: str) -> float:
    """Seconds to upload every file straight to GCS, ``concurrency`` at a time."""
    bucket = anonymous_client(gcs_url, http=pooled_session(concurrency)).bucket(BUCKET)

    def upload(index: int) -> None:
        bucket.blob(f"{prefix}/{index}").upload_from_filename(paths[index])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(upload, range(len(paths))))
    return time.perf_counter() - started


def _through_proxy(
    address: tuple[str, int], paths: list[Path], concurrency: int, prefix: str
) -> float:
    """Seconds to upload every file through the proxy with upload_many, ``concurrency`` at
    a time (the pool's connections are opened within the timed part)."""
    pairs = [(path, f"gs://{BUCKET}/{prefix}/{index}") for index, path in enumerate(paths)]
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
    seconds: dict[str, float] = {}
    requests: dict[str, int] = {}
    with (
        tempfile.TemporaryDirectory() as directory,
        counted_proxy(BUCKET) as (_, relay, address),
    ):
        paths = _write_files(Path(directory), count)
        for concurrency in (1, CONCURRENCY):
            # interleaved, so machine noise hits both ways alike
            before = relay.requests
            name = f"direct_x{concurrency}"
            seconds[name] = _direct(relay.url, paths, concurrency, name)
            requests[name] = relay.requests - before
            before = relay.requests
            name = f"proxy_x{concurrency}"
            seconds[name] = _through_proxy(address, paths, concurrency, name)
            requests[name] = relay.requests - before
    per_second = {name: count / value for name, value in seconds.items()}
    result: dict[str, Any] = {
        "benchmark": "small_objects",
        "objects": count,
        "object_bytes": OBJECT_SIZE,
        "uploads_per_second": {name: round(value, 1) for name, value in per_second.items()},
        "gcs_requests_per_object": {
            name: round(value / count, 3) for name, value in requests.items()
        },
        "ratio_to_direct": {
            f"x{c}": round(per_second[f"proxy_x{c}"] / per_second[f"direct_x{c}"], 3)
            for c in (1, CONCURRENCY)
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
        direct = result["uploads_per_second"][f"direct_x{concurrency}"]
        proxied = result["uploads_per_second"][f"proxy_x{concurrency}"]
        ratio = result["ratio_to_direct"][f"x{concurrency}"]
        per_object = result["gcs_requests_per_object"]
        print(
            f"  {concurrency:>2} at a time: direct {direct:8.1f}/s   proxy {proxied:8.1f}/s"
            f"   {ratio:.3f}x direct   GCS requests per object: direct"
            f" {per_object[f'direct_x{concurrency}']:.2f}, proxy"
            f" {per_object[f'proxy_x{concurrency}']:.2f}"
        )
    print(f"  written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
