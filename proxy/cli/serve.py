"""``rup serve``: run the proxy until SIGTERM or Ctrl-C.

Secrets can come from the environment instead of the command line, where other users of
the machine could read them: ``RUP_AUTH_TOKEN`` (comma-separated bearer tokens),
``RUP_TOKEN_KEY`` (the upload-token key from ``rup keygen``, or a passphrase of 16 or more
characters; give every instance that should resume another's uploads the same one) and
``RUP_GCS_ACCESS_TOKEN`` (the bearer secret of the GCS endpoint: the one the embedded
endpoint requires, or the one sent to ``--gcs-endpoint``).

Without a token key, ``--data-dir D`` keeps one in ``D/keys/token.key`` (made once, 0600), so
a restart opens the tokens it issued; otherwise the key is random and the uploads cannot
outlive the process, which is said at startup. The embedded endpoint requires a bearer
secret (kept in ``D/keys/gcs-access-token`` with ``--data-dir``, else one per process)
unless ``--gcs-open`` asks for it to be open, e.g. to read objects back with another tool.

At start-up it tells glibc's malloc to keep freed memory for reuse (:func:`keep_freed_memory`),
so received bytes do not land on freshly zeroed pages; ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` in the environment take precedence.

Every failure is one line on stderr (``rup serve: ...``) and an exit code from
:data:`EXIT_CODES`; a TLS failure says which file, or what in it, was refused.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import enum
import errno
import functools
import ipaddress
import logging
import os
import re
import secrets
import signal
import ssl
import sys
import threading
from pathlib import Path
from typing import TypeVar

import trio

from faultnet.cli_support import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    exit_codes_epilog,
    listen_failure,
    os_reason,
    parse_address,
)
from proxy.cli.ports import METRICS_PORT, PROXY_PORT
from proxy.server import ProxyServer, serve
from proxy.server.backend import Backend, GcsTarget, TargetKind, open_backend
from proxy.server.keys import (
    KeyMaterialError,
    generate_key_text,
    key_from_text,
    load_or_create_secret,
    private_directory,
)
from proxy.server.logging import configure_logging, get_logger, log_event
from proxy.server.metrics import MetricsListenError
from proxy.server.settings import (
    CompositeMode,
    CompositePolicy,
    MiB,
    ServerSettings,
    SettingsError,
)

__all__ = [
    "EXIT_CODES",
    "HELP",
    "KEEP_FREED_MEMORY",
    "TOKEN_KEY_ENV",
    "configure",
    "keep_freed_memory",
    "run",
    "tls_context",
]

HELP = "run the proxy: accept uploads and stream them into GCS"

#: the environment variable that carries the upload-token key (a Secret in Kubernetes)
TOKEN_KEY_ENV = "RUP_TOKEN_KEY"

EXIT_CODES = {
    EXIT_OK: "shut down cleanly (SIGTERM or Ctrl-C)",
    EXIT_FAILED: "could not listen (address in use, permission), the embedded endpoint's "
    "data dir unusable, or the server failed while running",
    EXIT_USAGE: "bad arguments, or a file they name missing or unusable (TLS certificate or "
    "key, token key)",
    EXIT_INTERRUPTED: "interrupted twice, shutdown cut short",
}

logger = get_logger(__name__)

_E = TypeVar("_E", bound=BaseException)

#: under --data-dir: secrets the proxy keeps (a directory the GCS store does not own)
KEYS_DIRECTORY = "keys"
TOKEN_KEY_FILE = "token.key"
GCS_SECRET_FILE = "gcs-access-token"


class KeySource(enum.Enum):
    """Where the upload-token key came from, which decides whether uploads outlive us."""

    GIVEN = "--token-key or RUP_TOKEN_KEY"
    DATA_DIR = "the data dir"
    EPHEMERAL = "random, for this process only"


def _in_mib(size: int) -> str:
    """A byte count as the text of a ``--...-mib`` option (its default, shown in --help)."""
    return f"{size / MiB:g}"


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
        "tokens), RUP_TOKEN_KEY (from 'rup keygen') and RUP_GCS_ACCESS_TOKEN. With neither "
        "--gcs-endpoint nor credentials, the embedded strict GCS endpoint is started (in "
        "memory, or under --data-dir), requiring a bearer secret unless --gcs-open. "
        "The metrics listener also answers /healthz (alive) and /readyz (taking connections "
        "and the GCS endpoint reachable; 503 from SIGTERM on, while draining).\n\n"
        + exit_codes_epilog(EXIT_CODES)
    )
    parser.add_argument(
        "--listen", type=parse_address, default=f"127.0.0.1:{PROXY_PORT}", metavar="HOST:PORT",
        help="where clients connect (port 0: any free one, printed at startup)",
    )  # fmt: skip
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--gcs-endpoint", metavar="URL", help="a GCS JSON API endpoint")
    target.add_argument(
        "--data-dir", type=Path, metavar="DATA_DIR", help="embedded endpoint, stored under DATA_DIR"
    )
    target.add_argument(
        "--embedded", action="store_true", help="embedded endpoint in memory, even with credentials"
    )
    parser.add_argument("--project", metavar="PROJECT", help="GCS project (real GCS only)")
    parser.add_argument(
        "--auth-token", action="append", default=[], metavar="AUTH_TOKEN",
        help="accept this bearer token (repeatable; default: $RUP_AUTH_TOKEN, else no auth)",
    )  # fmt: skip
    parser.add_argument(
        "--token-key", metavar="TOKEN_KEY",
        help="upload-token key from 'rup keygen', or a passphrase of 16+ characters "
        "(default: $RUP_TOKEN_KEY, else the one kept in --data-dir, else random)",
    )  # fmt: skip
    parser.add_argument(
        "--gcs-listen", type=parse_address, metavar="HOST:PORT",
        help="where the embedded GCS endpoint listens (default: 127.0.0.1, any free port)",
    )  # fmt: skip
    parser.add_argument(
        "--gcs-open", action="store_true",
        help="serve the embedded GCS endpoint without its bearer secret (to read objects back)",
    )  # fmt: skip
    parser.add_argument(
        "--create-buckets", action=argparse.BooleanOptionalAction, default=None,
        help="create a missing bucket on first use "
        "(default: only for the embedded endpoint in memory)",
    )  # fmt: skip
    parser.add_argument(
        "--tls-cert", type=Path, metavar="CERT_PEM",
        help="serve TLS with this certificate chain (PEM); goes with --tls-key",
    )  # fmt: skip
    parser.add_argument(
        "--tls-key", type=Path, metavar="KEY_PEM",
        help="the private key of --tls-cert (PEM, unencrypted)",
    )  # fmt: skip
    parser.add_argument(
        "--metrics", type=parse_address, metavar="HOST:PORT",
        help="serve /metrics, /healthz and /readyz here "
        f"(default: not served; deploy/ uses 0.0.0.0:{METRICS_PORT})",
    )  # fmt: skip
    parser.add_argument(
        "--max-frame-mib", type=_mebibytes, default=_in_mib(defaults.max_frame_size),
        metavar="MIB",
        help="largest frame a client may send (the data of one WRITE_AT or PUT_OBJECT), in MiB",
    )  # fmt: skip
    parser.add_argument(
        "--upload-buffer-mib", type=_mebibytes, default=_in_mib(defaults.upload_buffer_limit),
        metavar="MIB", help="most bytes one upload may hold before GCS acknowledges them, in MiB",
    )  # fmt: skip
    parser.add_argument(
        "--total-buffer-mib", type=_mebibytes, default=_in_mib(defaults.total_buffer_limit),
        metavar="MIB", help="most bytes all uploads together may hold, in MiB",
    )  # fmt: skip
    parser.add_argument(
        "--max-uploads-per-client", type=int, default=defaults.max_uploads_per_client,
        metavar="N", help="uploads one client (bearer token, or address) may have open",
    )  # fmt: skip
    parser.add_argument(
        "--max-connections-per-client", type=int, default=defaults.max_connections_per_client,
        metavar="N", help="connections one client address may have open",
    )  # fmt: skip
    parser.add_argument(
        "--max-connections", type=int, default=defaults.max_connections, metavar="N",
        help="connections open at once, from anyone",
    )  # fmt: skip
    parser.add_argument(
        "--max-preauth-connections", type=int, default=defaults.max_preauth_connections,
        metavar="N",
        help="connections that have not completed their Hello yet",
    )  # fmt: skip
    parser.add_argument(
        "--preauth-read-bytes", type=int, default=defaults.preauth_read_limit, metavar="BYTES",
        help="bytes a connection may send before its Hello is accepted",
    )  # fmt: skip
    parser.add_argument(
        "--client-buffer-share", type=float, default=defaults.client_buffer_share,
        metavar="FRACTION", help="the part of --total-buffer-mib one client may hold",
    )  # fmt: skip
    parser.add_argument(
        "--min-window-mib", type=_mebibytes, default=_in_mib(defaults.min_upload_window),
        metavar="MIB",
        help="a new upload's window, which grows to --upload-buffer-mib as data arrives",
    )  # fmt: skip
    parser.add_argument(
        "--complete-timeout", type=float, default=defaults.complete_timeout, metavar="SECONDS",
        help="how long a Complete waits for missing bytes before listing them",
    )  # fmt: skip
    parser.add_argument(
        "--idle-timeout", type=float, default=defaults.idle_timeout, metavar="SECONDS",
        help="close a connection that sent nothing for this long",
    )  # fmt: skip
    parser.add_argument(
        "--upload-idle-timeout", type=float, default=defaults.upload_idle_timeout,
        metavar="SECONDS", help="release an upload nobody wrote to for this long",
    )  # fmt: skip
    parser.add_argument(
        "--handshake-timeout", type=float, default=defaults.handshake_timeout, metavar="SECONDS",
        help="close a connection whose Hello has not arrived within this long",
    )  # fmt: skip
    parser.add_argument(
        "--one-request-limit-mib", type=_mebibytes, default=_in_mib(defaults.one_request_limit),
        metavar="MIB", help="an upload declared at most this big is stored by one GCS request at"
        " its end, with no resumable session, in MiB (0: never)",
    )  # fmt: skip
    composite = defaults.composite
    parser.add_argument(
        "--composite", choices=[mode.value for mode in CompositeMode],
        default=composite.mode.value,
        help="which uploads of version-3 clients are cut into segments stored in parallel and"
        " composed at the end: always, never, or auto (from --composite-threshold-mib on)",
    )  # fmt: skip
    parser.add_argument(
        "--composite-threshold-mib", type=_mebibytes, default=_in_mib(composite.threshold),
        metavar="MIB", help="with --composite auto, the declared size from which an upload is"
        " composite, in MiB",
    )  # fmt: skip
    parser.add_argument(
        "--segment-size-mib", type=_mebibytes, default=_in_mib(composite.segment_size),
        metavar="MIB", help="a composite upload's segment size, in MiB (a multiple of 0.25)",
    )  # fmt: skip
    parser.add_argument(
        "--parallel-segments", type=int, default=composite.parallel_segments, metavar="N",
        help="segments of one composite upload a client is told to send at once",
    )  # fmt: skip
    parser.add_argument(
        "--temp-prefix", default=composite.temp_prefix, metavar="PREFIX",
        help="where segments live until they are composed (no client may write there)",
    )  # fmt: skip
    parser.add_argument(
        "--budget-wait", type=float, default=defaults.budget_wait, metavar="SECONDS",
        help="how long a new upload waits for buffer budget before TOO_BUSY",
    )  # fmt: skip
    parser.add_argument(
        "--drain-timeout", type=float, default=defaults.drain_timeout, metavar="SECONDS",
        help="on SIGTERM, how long GCS requests in flight get to finish",
    )  # fmt: skip
    parser.add_argument(
        "--resume-window", type=float, default=defaults.resume_window, metavar="SECONDS",
        help="how long an upload nobody is attached to keeps its GCS session",
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
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug lines too")


def token_key_from_args(args: argparse.Namespace) -> tuple[bytes, KeySource]:
    """The upload-token key and where it came from (see the module docstring).

    Raises :class:`KeyMaterialError` for a passphrase too short or a key file not to trust.
    """
    key_text = args.token_key or os.environ.get("RUP_TOKEN_KEY")
    if key_text:
        return key_from_text(key_text), KeySource.GIVEN
    if args.data_dir is not None:
        path = _keys_directory(args.data_dir) / TOKEN_KEY_FILE
        text, _ = load_or_create_secret(path, generate_key_text)
        return key_from_text(text), KeySource.DATA_DIR
    return secrets.token_bytes(32), KeySource.EPHEMERAL


def _keys_directory(data_dir: Path) -> Path:
    private_directory(data_dir)
    return private_directory(data_dir / KEYS_DIRECTORY)


def settings_from_args(args: argparse.Namespace, token_key: bytes | None = None) -> ServerSettings:
    """The server settings ``args`` describe; :class:`SettingsError` if they cannot work.

    ``token_key``: the key :func:`token_key_from_args` chose (default: it is asked).
    """
    auth_tokens = list(args.auth_token)
    if not auth_tokens and os.environ.get("RUP_AUTH_TOKEN"):
        auth_tokens = [t for t in os.environ["RUP_AUTH_TOKEN"].split(",") if t]
    if token_key is None:
        token_key, _ = token_key_from_args(args)
    tls: ssl.SSLContext | None = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SettingsError("--tls-cert and --tls-key go together")
        tls = tls_context(args.tls_cert, args.tls_key)
    host, port = args.listen
    return ServerSettings(
        host=host,
        port=port,
        auth_tokens=tuple(auth_tokens),
        token_key=token_key,
        tls=tls,
        max_frame_size=args.max_frame_mib,
        upload_buffer_limit=args.upload_buffer_mib,
        total_buffer_limit=args.total_buffer_mib,
        max_uploads_per_client=args.max_uploads_per_client,
        max_connections_per_client=args.max_connections_per_client,
        max_connections=args.max_connections,
        max_preauth_connections=args.max_preauth_connections,
        preauth_read_limit=args.preauth_read_bytes,
        client_buffer_share=args.client_buffer_share,
        min_upload_window=args.min_window_mib,
        complete_timeout=args.complete_timeout,
        idle_timeout=args.idle_timeout,
        upload_idle_timeout=args.upload_idle_timeout,
        handshake_timeout=args.handshake_timeout,
        budget_wait=args.budget_wait,
        drain_timeout=args.drain_timeout,
        resume_window=args.resume_window,
        allowed_buckets=tuple(args.allow_bucket),
        allowed_prefixes=tuple(args.allow_prefix),
        one_request_limit=args.one_request_limit_mib,
        composite=CompositePolicy(
            mode=CompositeMode(args.composite),
            threshold=args.composite_threshold_mib,
            segment_size=args.segment_size_mib,
            parallel_segments=args.parallel_segments,
            temp_prefix=args.temp_prefix,
        ),
    )


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context from ``cert`` and ``key``; :class:`SettingsError` saying which
    file is missing, unreadable or refused, and why."""
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not path.is_file():
            why = "no such file" if not path.exists() else "not a file"
            raise SettingsError(f"{option} {path}: {why}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except PermissionError:
        raise SettingsError(f"--tls-cert {cert} or --tls-key {key}: permission denied") from None
    except ssl.SSLError as exc:
        raise SettingsError(_tls_refusal(cert, key, exc)) from None
    return context


def _tls_refusal(cert: Path, key: Path, exc: ssl.SSLError) -> str:
    """Which of the two files OpenSSL refused, as far as can be told without it."""
    if b"-----BEGIN CERTIFICATE-----" not in cert.read_bytes():
        return f"--tls-cert {cert}: no PEM certificate in it"
    if not re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----", key.read_bytes()):
        return f"--tls-key {key}: no PEM private key in it"
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"--tls-key {key}: not the private key of the certificate in {cert}"
    return f"--tls-cert {cert} / --tls-key {key}: refused by OpenSSL ({exc.reason or exc})"


def target_from_args(args: argparse.Namespace) -> tuple[GcsTarget, str]:
    """Where to write, and how the embedded endpoint's secret was chosen (for the banner).

    Raises :class:`SettingsError` for options that do not fit the target.
    """
    target = GcsTarget(
        endpoint=args.gcs_endpoint,
        data_dir=args.data_dir,
        project=args.project,
        force_embedded=args.embedded,
        create_buckets=args.create_buckets,
    )
    kind = target.resolve()
    if kind is not TargetKind.EMBEDDED:
        if args.gcs_listen is not None or args.gcs_open:
            raise SettingsError("--gcs-listen and --gcs-open are for the embedded endpoint")
        if kind is TargetKind.REAL and args.create_buckets:
            raise SettingsError("--create-buckets is for emulators, not real GCS")
        bearer = os.environ.get("RUP_GCS_ACCESS_TOKEN") or None
        return dataclasses.replace(target, access_token=bearer), ""
    if args.gcs_listen is not None:
        target = dataclasses.replace(target, listen=args.gcs_listen)
    if args.gcs_open:
        return target, "open: anyone who can reach it may read and write every object"
    secret = os.environ.get("RUP_GCS_ACCESS_TOKEN")
    how = "the bearer token in $RUP_GCS_ACCESS_TOKEN"
    if not secret and args.data_dir is not None:
        path = _keys_directory(args.data_dir) / GCS_SECRET_FILE
        secret, _ = load_or_create_secret(path, lambda: secrets.token_urlsafe(32))
        how = f"the bearer token in {path}"
    elif not secret:
        secret = secrets.token_urlsafe(32)
        how = "a bearer token of this process only (set RUP_GCS_ACCESS_TOKEN, or --gcs-open)"
    return dataclasses.replace(target, access_token=secret), f"requires {how}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def startup_warnings(
    settings: ServerSettings,
    backend: Backend,
    key_source: KeySource,
    gcs_open: bool,
    *,
    in_memory: bool = False,
) -> list[tuple[str, str]]:
    """What a user would otherwise learn the hard way: ``(event, reason)`` pairs to log."""
    warnings: list[tuple[str, str]] = []
    if key_source is KeySource.EPHEMERAL:
        warnings.append(
            (
                "uploads-cannot-outlive-this-process",
                "the token key is random: give --token-key/RUP_TOKEN_KEY or --data-dir so "
                "that a restarted proxy can resume its uploads",
            )
        )
    elif backend.kind is TargetKind.EMBEDDED and in_memory:
        warnings.append(
            (
                "uploads-cannot-outlive-this-process",
                "the embedded endpoint keeps its sessions and objects in memory: give "
                "--data-dir so that they survive a restart",
            )
        )
    if not settings.auth_tokens and not _is_loopback(settings.host):
        warnings.append(
            (
                "no-auth-on-a-public-address",
                f"anyone who can reach {settings.host} may upload: give --auth-token or "
                "RUP_AUTH_TOKEN",
            )
        )
    if backend.kind is TargetKind.EMBEDDED and gcs_open:
        warnings.append(
            (
                "gcs-endpoint-open",
                "--gcs-open: the embedded endpoint takes requests without a secret, bypassing "
                "the proxy's auth and allow-lists",
            )
        )
    return warnings


@dataclasses.dataclass(frozen=True)
class _Startup:
    """What ``rup serve`` decided before serving, for the banner and the warnings."""

    key_source: KeySource
    gcs_access: str
    gcs_open: bool


async def _serve_until_signalled(
    settings: ServerSettings,
    target: GcsTarget,
    metrics_listen: tuple[str, int] | None,
    startup: _Startup,
) -> None:
    with contextlib.ExitStack() as stack:
        try:
            backend = stack.enter_context(open_backend(target))
        except OSError as exc:
            raise _StartError(_embedded_endpoint_failure(target, exc)) from None
        for event, reason in startup_warnings(
            settings,
            backend,
            startup.key_source,
            startup.gcs_open,
            in_memory=target.data_dir is None,
        ):
            log_event(logger, logging.WARNING, event, reason=reason)
        async with trio.open_nursery() as nursery:
            try:
                server: ProxyServer = await nursery.start(
                    functools.partial(serve, settings, backend, metrics_listen=metrics_listen)
                )
            except* OSError as group:
                failure = _first_exception(group)
                if isinstance(failure, MetricsListenError) and metrics_listen is not None:
                    line = "--metrics: " + listen_failure(metrics_listen, failure)
                else:
                    line = listen_failure((settings.host, settings.port), failure)
                raise _StartError(line) from None
            host, port = server.address
            # Scripts (and the tests) read this line to learn the port when --listen used 0.
            print(f"rup serve: listening on {host}:{port} (gcs: {backend.url})", flush=True)
            if backend.kind is TargetKind.EMBEDDED:
                print(
                    f"rup serve: embedded GCS endpoint {backend.url} ({startup.gcs_access})",
                    flush=True,
                )
            if server.metrics_address is not None:
                mhost, mport = server.metrics_address
                print(f"rup serve: metrics on http://{mhost}:{mport}/metrics", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log_event(logger, logging.INFO, "signal", signal=signal.Signals(signum).name)
                    server.shutdown()
                    _exit_if_still_running_after(
                        settings.shutdown_grace + settings.drain_timeout + SHUTDOWN_MARGIN
                    )
                    break


#: how long past its grace and drain times a shutdown may take before the process just exits
SHUTDOWN_MARGIN = 5.0


def _exit_if_still_running_after(seconds: float) -> None:
    """Exit the process ``seconds`` from now if the shutdown has not ended it by then.

    A graceful shutdown waits for what it cannot cut short: a chunk already on its way to
    GCS runs in a worker thread, which only the writer's progress timeout (60 s) ends when
    GCS stops answering, and the writer may not abandon it (``abort`` promises the caller
    that no view of its data is still held). Exiting is as safe as a SIGKILL, which every
    upload survives: its bytes are in GCS's session, resumable through its token on the
    next instance. So a supervisor's grace period, not GCS, bounds a restart. The timer is
    a daemon thread: a shutdown that ends in time exits without waiting for it.
    """

    def exit_now() -> None:
        log_event(
            logger,
            logging.WARNING,
            "shutdown-forced",
            reason=f"still running {seconds:g} s after the signal: GCS requests in flight"
            " are left to time out; their uploads resume from GCS on the next instance",
        )
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(EXIT_OK)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()


#: glibc's mallopt parameters (malloc.h) and what ``rup serve`` sets them to. Without them glibc
#: maps each 1 MiB socket receive afresh (its dynamic threshold stays below 1 MiB, because a
#: shortened receive frees less) and hands freed heap back at once, so every received byte
#: lands on a freshly zeroed page: about a tenth of the proxy's CPU per byte. Allocations up
#: to the threshold come from the heap instead, which keeps up to the trim threshold free
#: for the next receives; freed memory is reused, so the peak (bounded by the buffer budget)
#: does not grow.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, 32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, 64 * 1024 * 1024),
}


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed receive buffers (:data:`KEEP_FREED_MEMORY`);
    whether it was told. A setting already given in the environment is left as it is, and
    another C library is left alone."""
    if not _is_glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    told = False
    for variable, (parameter, value) in KEEP_FREED_MEMORY.items():
        if variable not in os.environ:
            told = bool(mallopt(parameter, value)) or told
    return told


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # not a name this platform knows
        return False


def run(args: argparse.Namespace) -> int:
    keep_freed_memory()
    configure_logging(
        level=logging.DEBUG if args.verbose else logging.INFO, json_lines=args.json_logs
    )
    try:
        token_key, key_source = token_key_from_args(args)
        settings = settings_from_args(args, token_key)
        target, gcs_access = target_from_args(args)
    except (SettingsError, KeyMaterialError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        return _fail(os_reason(exc), EXIT_USAGE)
    startup = _Startup(key_source, gcs_access, args.gcs_open)
    try:
        trio.run(_serve_until_signalled, settings, target, args.metrics, startup)
    except _StartError as exc:
        return _fail(str(exc))
    except BaseExceptionGroup as group:
        # trio groups what its nurseries raise; a failed start is one line, the rest is real
        started, others = group.split(_StartError)
        if started is None or others is not None:
            raise
        return _fail(str(_first_exception(started)))
    return EXIT_OK


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"rup serve: {message}", file=sys.stderr)
    return code


def _first_exception(group: BaseExceptionGroup[_E]) -> _E:
    """The first exception of a (possibly nested) group."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found  # type: ignore[return-value]


class _StartError(Exception):
    """``rup serve`` could not start; the message is the line to print."""


def _embedded_endpoint_failure(target: GcsTarget, exc: OSError) -> str:
    if exc.filename is None and exc.errno in _LISTEN_ERRNOS:
        return "embedded GCS endpoint: " + listen_failure(target.listen, exc)
    return f"embedded GCS endpoint: cannot use the data dir: {os_reason(exc)}"


_LISTEN_ERRNOS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL, errno.EPERM})
