"""``rup gcs-server``: run the strict GCS endpoint until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from faultnet.gcs.resumable import UPLOAD_QUANTUM
from faultnet.gcs.server import GcsServer

__all__ = ["HELP", "configure", "run"]

HELP = "run a strict GCS JSON API endpoint with scripted faults (storage-testbench's API)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free)")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="keep buckets, objects and upload sessions under this directory (default: memory)",
    )
    parser.add_argument(
        "--persist-granularity",
        type=int,
        default=UPLOAD_QUANTUM,
        metavar="BYTES",
        help="of a chunk cut off partway, keep the prefix up to a multiple of this (0: none)",
    )
    parser.add_argument(
        "--no-md5",
        dest="compute_md5",
        action="store_false",
        help="do not compute objects' MD5 (saves CPU; objects then have no md5Hash)",
    )


def run(args: argparse.Namespace) -> int:
    done = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = GcsServer(
            args.host,
            args.port,
            args.data_dir,
            args.persist_granularity,
            compute_md5=args.compute_md5,
        )
        with server:
            print(server.url, flush=True)
            print(f"rup gcs-server: serving {server.url}", file=sys.stderr, flush=True)
            done.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
