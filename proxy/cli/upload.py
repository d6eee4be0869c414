"""``rup upload``: upload a file, or stdin, through a rup proxy.

Exit codes:

====  ==============================================================
0     the object was stored and its size and CRC32C verified
1     the upload failed for another reason (the message says why)
2     usage error: bad arguments, unreadable file
3     the proxy refused the credentials or the bucket/object
4     a precondition failed (``--if-generation-match``)
5     the proxy could not be reached, or kept failing, for --retry-deadline seconds
6     the stored object does not match what was sent (size or CRC32C)
130   interrupted (Ctrl-C): the upload stays resumable
====  ==============================================================

Errors are a single line on stderr. A progress bar shows on stderr when it is a terminal;
``--json`` prints one summary line on stdout instead, for success and for failure.

A file upload keeps a resume record (:mod:`proxy.cli.upload_state`) until it completes, so
rerunning the same command after Ctrl-C, a kill or exit 5 resumes it: only the bytes the
proxy lacks are sent. A changed file, or ``--no-resume``, starts over.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import logging
import os
import ssl
import sys
from collections.abc import AsyncIterator
from typing import Any, Final

import trio

from protocol import MIN_FRAME_SIZE, ErrorCode
from proxy.cli.progress import UploadBar
from proxy.cli.upload_state import FileIdentity, ResumeRecord, ResumeStore
from proxy.client import (
    ChecksumMismatchError,
    ClientSettings,
    ProxyUnreachableError,
    RetryPolicy,
    Upload,
    UploadError,
    UploadOptions,
    UploadProgress,
    UploadResult,
    connect_upload,
    parse_gs_url,
    proxy_addresses,
    upload_stream,
)

__all__ = ["EXIT_CODES", "HELP", "configure", "exit_code_for", "run"]

HELP: Final = "upload a file or stdin to gs://BUCKET/OBJECT through a rup proxy"

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_DENIED: Final = 3
EXIT_PRECONDITION: Final = 4
EXIT_UNREACHABLE: Final = 5
EXIT_MISMATCH: Final = 6
EXIT_INTERRUPTED: Final = 130

EXIT_CODES: Final = {
    EXIT_OK: "the object was stored and verified",
    EXIT_FAILED: "the upload failed",
    EXIT_USAGE: "usage error",
    EXIT_DENIED: "authentication or permission refused",
    EXIT_PRECONDITION: "precondition failed (--if-generation-match)",
    EXIT_UNREACHABLE: "proxy unreachable or kept failing for --retry-deadline (rerun resumes)",
    EXIT_MISMATCH: "stored object differs from what was sent",
    EXIT_INTERRUPTED: "interrupted (a file upload stays resumable: rerun the command)",
}

_DENIED_CODES: Final = frozenset(
    {ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN, ErrorCode.BAD_TOKEN}
)
_STDIN_READ_SIZE: Final = 1024 * 1024
#: seconds between rewrites of a file upload's resume record
_RECORD_INTERVAL: Final = 0.5


def exit_code_for(error: UploadError) -> int:
    """The documented exit code for an upload failure."""
    if isinstance(error, ProxyUnreachableError):
        return EXIT_UNREACHABLE
    if isinstance(error, ChecksumMismatchError) or error.code == ErrorCode.CHECKSUM_MISMATCH:
        return EXIT_MISMATCH
    if error.code in _DENIED_CODES:
        return EXIT_DENIED
    if error.code == ErrorCode.PRECONDITION_FAILED:
        return EXIT_PRECONDITION
    return EXIT_FAILED


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "exit codes:\n" + "\n".join(
        f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items()
    )
    parser.add_argument("source", metavar="FILE|-", help="file to upload, or - for stdin")
    parser.add_argument("url", metavar="gs://BUCKET/OBJECT", help="where to store it")
    parser.add_argument(
        "--proxy",
        metavar="HOST:PORT[,HOST:PORT...]",
        default=os.environ.get("RUP_PROXY"),
        help="the rup proxy, or several to fail over between (default: $RUP_PROXY)",
    )
    parser.add_argument(
        "--connections", type=int, default=4, metavar="N", help="TCP connections (default 4)"
    )
    parser.add_argument(
        "--auth-token",
        default=os.environ.get("RUP_AUTH_TOKEN", ""),
        help="bearer token the proxy expects (default: $RUP_AUTH_TOKEN)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")
    parser.add_argument("--tls-ca", metavar="FILE", help="use TLS, trusting this CA bundle")
    parser.add_argument("--content-type", default="application/octet-stream")
    parser.add_argument(
        "--if-generation-match",
        type=int,
        metavar="GEN",
        help="only store if the object's generation is GEN (0: only if it does not exist)",
    )
    parser.add_argument(
        "--frame-size",
        type=int,
        default=ClientSettings.frame_size,
        metavar="BYTES",
        help="payload bytes per frame (default 1 MiB)",
    )
    parser.add_argument(
        "--retry-deadline",
        type=float,
        default=RetryPolicy.deadline,
        metavar="SECONDS",
        help="give up after this long without progress while the proxy is unreachable or"
        " failing (default %(default)g)",
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh even if an earlier run of this upload was interrupted (this run"
        " is still recorded, so a rerun resumes it)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON summary line")


def _usage(args: argparse.Namespace) -> str | None:
    if not args.proxy:
        return "--proxy HOST:PORT is required (or set RUP_PROXY)"
    try:
        proxy_addresses(args.proxy)
        parse_gs_url(args.url)
    except ValueError as exc:
        return str(exc)
    if args.connections < 1:
        return f"--connections must be at least 1, got {args.connections}"
    if args.frame_size < MIN_FRAME_SIZE:
        return f"--frame-size must be at least {MIN_FRAME_SIZE}, got {args.frame_size}"
    if not args.retry_deadline >= 0:
        return f"--retry-deadline must not be negative, got {args.retry_deadline}"
    if args.source != "-" and not os.path.isfile(args.source):
        return f"cannot read {args.source!r}: not a file"
    return None


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls_ca:
        return ssl.create_default_context(cafile=args.tls_ca)
    if args.tls:
        return ssl.create_default_context()
    return None


async def _stdin_chunks() -> AsyncIterator[bytes]:
    # A duplicate, so trio's non-blocking mode and closing do not touch the real fd 0.
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while chunk := await stdin.receive_some(_STDIN_READ_SIZE):
            yield bytes(chunk)


async def _upload(args: argparse.Namespace, bar: UploadBar | None) -> UploadResult:
    def progress(snapshot: UploadProgress) -> None:
        if bar is not None:
            bar.update(snapshot)

    options = UploadOptions(
        proxy=args.proxy,
        auth=args.auth_token,
        tls=_tls_context(args),
        settings=ClientSettings(
            connections=args.connections,
            frame_size=args.frame_size,
            retry=RetryPolicy(deadline=args.retry_deadline),
        ),
        content_type=args.content_type,
        if_generation_match=args.if_generation_match,
        progress=progress,
    )
    if args.source == "-":
        return await upload_stream(_stdin_chunks(), args.url, options)
    store = ResumeStore.default()
    if args.no_resume:
        store.remove(args.source, args.url)  # forget the earlier run; this one is recorded
    return await _upload_file_resumably(args.source, args.url, options, store)


async def _upload_file_resumably(
    source: str, url: str, options: UploadOptions, store: ResumeStore
) -> UploadResult:
    """Upload ``source``, resuming the upload an earlier run left behind, and keeping a
    record of this one until it completes, so that a rerun after Ctrl-C or a kill resumes.

    The record goes once the upload completes or fails for good; it stays when the upload may
    still succeed (interrupted, killed, or the proxy unreachable).
    """
    identity = FileIdentity.of(source)
    record = store.load(source, url)
    token = None
    if record is not None and record.identity != identity:
        _notice(f"{source} changed since the interrupted upload: starting over")
        store.remove(source, url)
    elif record is not None:
        token = record.token
        _notice(
            f"resuming the interrupted upload of {source}"
            f" ({record.confirmed_bytes} of {identity.size} bytes were confirmed)"
        )
    options = dataclasses.replace(options, token=token, expected_size=identity.size)
    try:
        async with connect_upload(url, options) as upload:
            await upload.send_file(source)
            result = await _complete_while_recording(upload, store, identity, url)
    except UploadError as exc:
        if not exc.retryable:
            store.remove(source, url)
        raise
    store.remove(source, url)
    return result


async def _complete_while_recording(
    upload: Upload, store: ResumeStore, identity: FileIdentity, url: str
) -> UploadResult:
    failure: UploadError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_keep_record, store, identity, url, upload)
        try:
            result = await upload.complete()
        except UploadError as exc:  # raised below, outside the nursery, so not in a group
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result


async def _keep_record(
    store: ResumeStore, identity: FileIdentity, url: str, upload: Upload
) -> None:
    """Write the resume record now, then every :data:`_RECORD_INTERVAL` while it changes."""
    written: ResumeRecord | None = None
    while True:
        token = upload.token
        if token is not None:
            record = ResumeRecord(
                identity=identity, url=url, token=token, confirmed=tuple(upload.confirmed_ranges())
            )
            if record != written:
                store.save(record)
                written = record
        await trio.sleep(_RECORD_INTERVAL)


def _notice(message: str) -> None:
    print(f"rup upload: {message}", file=sys.stderr)


def _run(args: argparse.Namespace, bar: UploadBar | None) -> UploadResult:
    try:
        return trio.run(_upload, args, bar)
    except BaseExceptionGroup as group:
        # Ctrl-C inside a trio nursery arrives grouped; anything else in the group is real.
        interrupts, others = group.split(KeyboardInterrupt)
        if interrupts is not None and others is None:
            raise KeyboardInterrupt from None
        raise


def _summary(result: UploadResult) -> dict[str, Any]:
    return {
        "ok": True,
        "url": f"gs://{result.bucket}/{result.name}",
        "size": result.size,
        "generation": result.generation,
        "crc32c": base64.b64encode(result.crc32c.to_bytes(4, "big")).decode(),
        "md5": base64.b64encode(result.md5).decode() if result.md5 else None,
        "elapsed_s": round(result.elapsed, 3),
        "throughput_mib_s": round(result.throughput / 2**20, 2),
        "connections": result.connections,
        "bytes_sent": result.bytes_sent,
        "reconnects": result.reconnects,
        "resent_bytes": dict(result.resent_bytes_by_cause),
        "restarts": result.restarts,
        "errors": dict(result.errors_by_code),
    }


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"rup upload: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"ok": False, "error": message, "exit_code": code}))
    return code


class _NoticeHandler(logging.Handler):
    """The client library's notices (``rup.client`` warnings) as ``rup upload: ...`` lines.

    It looks ``sys.stderr`` up at each line, so a progress bar that redirects stderr keeps
    the line above the bar.
    """

    def emit(self, record: logging.LogRecord) -> None:
        print(f"rup upload: {record.getMessage()}", file=sys.stderr)


def _show_client_notices() -> None:
    logger = logging.getLogger("rup.client")
    if not any(isinstance(handler, _NoticeHandler) for handler in logger.handlers):
        logger.addHandler(_NoticeHandler(logging.WARNING))
        logger.propagate = False


def run(args: argparse.Namespace) -> int:
    _show_client_notices()
    problem = _usage(args)
    if problem is not None:
        return _fail(args, problem, EXIT_USAGE)
    try:
        if args.json or not sys.stderr.isatty():
            result = _run(args, None)
        else:
            with UploadBar(args.url) as bar:
                result = _run(args, bar)
    except KeyboardInterrupt:
        resumable = "" if args.source == "-" else "; rerun the same command to resume"
        return _fail(args, f"interrupted{resumable}", EXIT_INTERRUPTED)
    except UploadError as exc:
        return _fail(args, exc.message, exit_code_for(exc))
    except (OSError, ssl.SSLError) as exc:
        return _fail(args, f"{type(exc).__name__}: {exc}", EXIT_FAILED)
    if args.json:
        print(json.dumps(_summary(result)))
    else:
        mib_s = result.throughput / 2**20
        print(
            f"stored gs://{result.bucket}/{result.name}: {result.size} bytes, generation"
            f" {result.generation}, crc32c verified, {mib_s:.1f} MiB/s,"
            f" {result.reconnects} reconnects",
            file=sys.stderr,
        )
    return EXIT_OK
