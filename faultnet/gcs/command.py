"""``rup gcs-server``: run the strict GCS endpoint until SIGINT or SIGTERM.

The access token (see :class:`~faultnet.gcs.GcsServer`) comes from a file
(``--access-token-file``) or the environment (``RUP_GCS_ACCESS_TOKEN``), never from a
command-line argument, which any local user could read in the process list.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from types import FrameType

from faultnet.cli_support import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    exit_codes_epilog,
    listen_failure,
    os_reason,
    port_number,
)
from faultnet.gcs.resumable import UPLOAD_QUANTUM
from faultnet.gcs.server import GcsServer
from faultnet.gcs.store import DEFAULT_SESSION_TTL

__all__ = ["ACCESS_TOKEN_ENV", "EXIT_CODES", "HELP", "configure", "read_access_token", "run"]

ACCESS_TOKEN_ENV = "RUP_GCS_ACCESS_TOKEN"

HELP = "run a strict GCS JSON API endpoint with scripted faults (storage-testbench's API)"

EXIT_CODES = {
    EXIT_OK: "stopped cleanly (SIGTERM or Ctrl-C)",
    EXIT_FAILED: "could not listen (address in use, permission) or failed while running",
    EXIT_USAGE: "bad arguments, or a file they name missing or unusable (data dir, token file)",
    EXIT_INTERRUPTED: "interrupted",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "The URL is printed on the first line of stdout.\n\n" + exit_codes_epilog(
        EXIT_CODES
    )
    parser.add_argument("--host", default="127.0.0.1", metavar="HOST", help="address to listen on")
    parser.add_argument(
        "--port", type=port_number, default=0, metavar="PORT",
        help="port to listen on (0: any free one)",
    )  # fmt: skip
    parser.add_argument(
        "--data-dir",
        default=None,
        metavar="DATA_DIR",
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
    parser.add_argument(
        "--session-ttl",
        type=_positive_seconds,
        default=DEFAULT_SESSION_TTL,
        metavar="SECONDS",
        help="forget a resumable session and delete its files this long after it started "
        "(default: 7 days, as GCS)",
    )
    parser.add_argument(
        "--access-token-file",
        default=None,
        metavar="PATH",
        help=(
            "require every request to carry 'Authorization: Bearer <token>', the token being "
            f"this file's content (default: ${ACCESS_TOKEN_ENV} if set, else no token)"
        ),
    )


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return seconds


def read_access_token(path: str | None) -> str | None:
    """The token from ``path`` (whitespace around it stripped), else from the environment.

    Raises ValueError, without the token in the message, if it is empty or malformed.
    """
    if path is not None:
        with open(path, encoding="ascii", errors="replace") as file:
            token = file.read().strip()
        if not token:
            raise ValueError(f"the access token file {path} is empty")
        return token
    return os.environ.get(ACCESS_TOKEN_ENV) or None


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"rup gcs-server: {message}", file=sys.stderr)
    return code


def _start_failure(args: argparse.Namespace, exc: OSError) -> str:
    if exc.filename is None:
        return listen_failure((args.host, args.port), exc)
    return os_reason(exc)


def run(args: argparse.Namespace) -> int:
    try:
        server = GcsServer(
            args.host,
            args.port,
            args.data_dir,
            args.persist_granularity,
            compute_md5=args.compute_md5,
            access_token=read_access_token(args.access_token_file),
            session_ttl=args.session_ttl,
        )
    except OSError as exc:
        return _fail(os_reason(exc), EXIT_USAGE)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    done = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with server:
            print(server.url, flush=True)
            print(f"rup gcs-server: serving {server.url}", file=sys.stderr, flush=True)
            done.wait()
    except OSError as exc:
        return _fail(_start_failure(args, exc))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK
