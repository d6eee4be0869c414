"""Small objects per second: 1,000 x 4 KiB through the proxy against direct uploads.

The strict GCS endpoint (``rup gcs-server``) and the proxy (``rup serve``) each run in a
process of their own; the clients run here. The same objects are uploaded four ways:

* direct: google-cloud-storage ``Blob.upload_from_string`` (one multipart request each),
  one at a time, then from 16 threads at once;
* proxy: ``proxy.client_stream`` over one connection per upload, one at a time,
  then 16 uploads at once.

The ratios (proxy / direct, at each concurrency) are the claims: the proxy turns every
object into a resumable session plus a final chunk, so small objects are where its
per-upload overhead shows.

Run ``python -m bench.bench_small_objects --count 200`` for a quick run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import trio

from bench._rup_process import rup_process
from faultnet.gcs.clients import anonymous_client
from proxy.client import ClientSettings, UploadOptions, upload_stream
from proxy.server.backend import pooled_session

__all__ = ["main", "run"]

KiB: Final = 1024
OBJECT_SIZE: Final = 4 * KiB
FULL_COUNT: Final = 1000
QUICK_COUNT: Final = 200
CONCURRENCY: Final = 16
BUCKET: Final = "bench-small"
RESULTS: Final = Path(__file__).resolve().parent / "results" / "small_objects.json"


def _payload(index: int) -> bytes:
    return index.to_bytes(4, "big") * (OBJECT_SIZE // 4)


def _direct(gcs_url: str, count: int, concurrency: int, prefix: str) -> float:
    """Seconds to upload ``count`` objects straight to GCS, ``concurrency`` at a time."""
    bucket = anonymous_client(gcs_url, http=pooled_session(concurrency)).bucket(BUCKET)

    def upload(index: int) -> None:
        bucket.blob(f"{prefix}/{index}").upload_from_string(_payload(index))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(upload, range(count)))
    return time.perf_counter() - started


def _through_proxy(address: tuple[str, int], count: int, concurrency: int, prefix: str) -> float:
    """Seconds to upload ``count`` objects through the proxy, ``concurrency`` at a time."""

    async def chunks(index: int) -> AsyncIterator[bytes]:
        yield _payload(index)

    async def worker(indexes: Iterator[int]) -> None:
        for index in indexes:
            options = UploadOptions(proxy=address, settings=ClientSettings(connections=1))
            result = await upload_stream(chunks(index), f"gs://{BUCKET}/{prefix}/{index}", options)
            if result.size != OBJECT_SIZE:
                raise RuntimeError(f"the proxy stored {result.size} bytes for object {index}")

    async def go() -> float:
        indexes = iter(range(count))  # shared: each worker takes the next index
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker, indexes)
        return time.perf_counter() - started

    return trio.run(go)


def _address(line: str) -> tuple[str, int]:
    # "rup serve: listening on HOST:PORT (gcs: URL)"
    host, _, port = line.split("listening on ", 1)[1].split()[0].rpartition(":")
    return host, int(port)


def run(quick: bool, count: int | None = None) -> dict[str, Any]:
    """Upload ``count`` small objects each way; also writes :data:`RESULTS`."""
    count = count or (QUICK_COUNT if quick else FULL_COUNT)
    seconds: dict[str, float] = {}
    with rup_process("gcs-server", "--port", "0") as (_, gcs_url):
        anonymous_client(gcs_url).bucket(BUCKET).create()
        with rup_process("serve", "--listen", "127.0.0.1:0", "--gcs-endpoint", gcs_url) as (
            _,
            line,
        ):
            address = _address(line)
            for concurrency in (1, CONCURRENCY):
                # interleaved, so machine noise hits both ways alike
                seconds[f"direct_x{concurrency}"] = _direct(
                    gcs_url, count, concurrency, f"direct-{concurrency}"
                )
                seconds[f"proxy_x{concurrency}"] = _through_proxy(
                    address, count, concurrency, f"proxy-{concurrency}"
                )
    per_second = {name: count / value for name, value in seconds.items()}
    result: dict[str, Any] = {
        "benchmark": "small_objects",
        "objects": count,
        "object_bytes": OBJECT_SIZE,
        "uploads_per_second": {name: round(value, 1) for name, value in per_second.items()},
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
        print(
            f"  {concurrency:>2} at a time: direct {direct:8.1f}/s   proxy {proxied:8.1f}/s"
            f"   {ratio:.3f}x direct"
        )
    print(f"  written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
