"""``rup serve``: run the proxy until SIGTERM or Ctrl-C.

Secrets can come from the environment instead of the command line, where other users of
the machine could read them: ``RUP_AUTH_TOKEN`` (comma-separated bearer tokens) and
``RUP_TOKEN_KEY`` (the upload-token key; give every instance that should resume another's
uploads the same one). Without a token key, each process draws a random one.

Exit codes: 0 after a clean shutdown, 2 for bad arguments, 1 if the server failed.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import ssl
import sys
from pathlib import Path

import trio

from proxy.server import ProxyServer, serve
from proxy.server.backend import GcsTarget, open_backend
from proxy.server.logging import configure_logging, get_logger, log_event
from proxy.server.settings import MiB, ServerSettings, SettingsError
from proxy.server.tokens import key_from_text

__all__ = ["HELP", "configure", "run"]

HELP = "run the proxy: accept uploads and stream them into GCS"

logger = get_logger(__name__)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _mebibytes(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in MiB, got {text!r}") from None
    return int(value * MiB)


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = ServerSettings(token_key=bytes(32))
    parser.epilog = (
        "Secrets may come from the environment: RUP_AUTH_TOKEN (comma-separated bearer "
        "tokens) and RUP_TOKEN_KEY. With neither --gcs-endpoint nor credentials, the "
        "embedded strict GCS endpoint is started (in memory, or under --data-dir). "
        "Exit codes: 0 clean shutdown, 1 server failure, 2 bad arguments."
    )
    parser.add_argument(
        "--listen", type=_host_port, default=("127.0.0.1", 7400), metavar="HOST:PORT"
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--gcs-endpoint", metavar="URL", help="a GCS JSON API endpoint")
    target.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="embedded endpoint, stored under DIR"
    )
    target.add_argument(
        "--embedded", action="store_true", help="embedded endpoint in memory, even with credentials"
    )
    parser.add_argument("--project", help="GCS project (real GCS only)")
    parser.add_argument(
        "--auth-token", action="append", default=[], metavar="TOKEN",
        help="accept this bearer token (repeatable; default: $RUP_AUTH_TOKEN, else no auth)",
    )  # fmt: skip
    parser.add_argument(
        "--token-key", metavar="KEY", help="upload-token key (default: $RUP_TOKEN_KEY, else random)"
    )
    parser.add_argument("--tls-cert", type=Path, metavar="PEM")
    parser.add_argument("--tls-key", type=Path, metavar="PEM")
    parser.add_argument("--metrics", type=_host_port, metavar="HOST:PORT", help="serve /metrics")
    parser.add_argument(
        "--max-frame-mib", type=_mebibytes, default=defaults.max_frame_size, metavar="MIB"
    )
    parser.add_argument(
        "--upload-buffer-mib", type=_mebibytes, default=defaults.upload_buffer_limit, metavar="MIB"
    )
    parser.add_argument(
        "--total-buffer-mib", type=_mebibytes, default=defaults.total_buffer_limit, metavar="MIB"
    )
    parser.add_argument(
        "--max-uploads-per-client", type=int, default=defaults.max_uploads_per_client
    )
    parser.add_argument(
        "--max-connections-per-client", type=int, default=defaults.max_connections_per_client
    )
    parser.add_argument("--idle-timeout", type=float, default=defaults.idle_timeout)
    parser.add_argument("--upload-idle-timeout", type=float, default=defaults.upload_idle_timeout)
    parser.add_argument("--handshake-timeout", type=float, default=defaults.handshake_timeout)
    parser.add_argument(
        "--budget-wait", type=float, default=defaults.budget_wait, metavar="SECONDS",
        help="how long a new upload waits for buffer budget before TOO_BUSY",
    )  # fmt: skip
    parser.add_argument(
        "--allow-bucket", action="append", default=[], metavar="BUCKET",
        help="only these buckets may be written (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--allow-prefix", action="append", default=[], metavar="PREFIX",
        help="object names must start with one of these (repeatable)",
    )  # fmt: skip
    parser.add_argument("--json-logs", action="store_true", help="log JSON lines")
    parser.add_argument("--verbose", "-v", action="store_true")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """The server settings ``args`` describe; :class:`SettingsError` if they cannot work."""
    auth_tokens = list(args.auth_token)
    if not auth_tokens and os.environ.get("RUP_AUTH_TOKEN"):
        auth_tokens = [t for t in os.environ["RUP_AUTH_TOKEN"].split(",") if t]
    key_text = args.token_key or os.environ.get("RUP_TOKEN_KEY")
    tls: ssl.SSLContext | None = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SettingsError("--tls-cert and --tls-key go together")
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    host, port = args.listen
    changes: dict[str, object] = {}
    if key_text:
        changes["token_key"] = key_from_text(key_text)
    return ServerSettings(
        host=host,
        port=port,
        auth_tokens=tuple(auth_tokens),
        tls=tls,
        max_frame_size=args.max_frame_mib,
        upload_buffer_limit=args.upload_buffer_mib,
        total_buffer_limit=args.total_buffer_mib,
        max_uploads_per_client=args.max_uploads_per_client,
        max_connections_per_client=args.max_connections_per_client,
        idle_timeout=args.idle_timeout,
        upload_idle_timeout=args.upload_idle_timeout,
        handshake_timeout=args.handshake_timeout,
        budget_wait=args.budget_wait,
        allowed_buckets=tuple(args.allow_bucket),
        allowed_prefixes=tuple(args.allow_prefix),
        **changes,  # type: ignore[arg-type]
    )


async def _serve_until_signalled(
    settings: ServerSettings, target: GcsTarget, metrics_listen: tuple[str, int] | None
) -> None:
    with open_backend(target) as backend:
        async with trio.open_nursery() as nursery:
            server: ProxyServer = await nursery.start(
                functools.partial(serve, settings, backend, metrics_listen=metrics_listen)
            )
            host, port = server.address
            # Scripts (and the tests) read this line to learn the port when --listen used 0.
            print(f"rup serve: listening on {host}:{port} (gcs: {backend.url})", flush=True)
            if server.metrics_address is not None:
                mhost, mport = server.metrics_address
                print(f"rup serve: metrics on http://{mhost}:{mport}/metrics", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log_event(logger, logging.INFO, "signal", signal=signal.Signals(signum).name)
                    server.shutdown()
                    break


def run(args: argparse.Namespace) -> int:
    configure_logging(
        level=logging.DEBUG if args.verbose else logging.INFO, json_lines=args.json_logs
    )
    try:
        settings = settings_from_args(args)
    except (SettingsError, OSError, ssl.SSLError) as exc:
        print(f"rup serve: {exc}", file=sys.stderr)
        return 2
    target = GcsTarget(
        endpoint=args.gcs_endpoint,
        data_dir=args.data_dir,
        project=args.project,
        force_embedded=args.embedded,
    )
    try:
        trio.run(_serve_until_signalled, settings, target, args.metrics)
    except OSError as exc:
        print(f"rup serve: {exc}", file=sys.stderr)
        return 1
    return 0
