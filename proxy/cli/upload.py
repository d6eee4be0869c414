"""``rup upload``: upload files, directories (``-r``) or stdin through a rup proxy.

``rup upload FILE gs://BUCKET/OBJECT`` stores one object; ``rup upload SOURCE...
gs://BUCKET/PREFIX/`` stores each file under its relative path (:mod:`proxy.cli.upload_plan`),
``--jobs`` at a time: small files as one request each on shared connections, large ones over
their own ``--connections`` (a file shorter than :data:`_BYTES_PER_CONNECTION` per connection
gets fewer: the other files keep connections busy, and each connection costs a handshake and
an attach at both ends).

Exit codes:

====  ==============================================================
0     every object was stored and its size and CRC32C verified
1     the upload failed for another reason (the message says why)
2     usage error: bad arguments, unreadable file
3     the proxy refused the credentials or the bucket/object
4     a precondition failed (``--if-generation-match``, ``--no-clobber``)
5     the proxy could not be reached, or kept failing, for --retry-deadline seconds
6     the stored object does not match what was sent (size or CRC32C)
7     several objects: some were stored, some failed (one line on stderr for each)
130   interrupted (Ctrl-C): the upload stays resumable
====  ==============================================================

With several objects, an exit code of 1 to 6 means every one of them failed, and it is the
code of the first failure. Errors are single lines on stderr. A progress bar shows on stderr
when it is a terminal (one overall line for several files: files done, bytes, rate);
``--json`` prints one line per object on stdout instead, and with several objects a summary
line after them.

A file upload keeps a resume record (:mod:`proxy.cli.upload_state`) from half a second in
until it completes, so rerunning the same command after Ctrl-C, a kill or exit 5 resumes it:
only the bytes the proxy lacks are sent. A changed file, or ``--no-resume``, starts over.
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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from protocol import MIN_FRAME_SIZE, ErrorCode
from proxy.cli.upload_plan import DEFAULT_CONTENT_TYPE, content_type_for, plan_uploads
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
    proxy_addresses,
    upload_many,
    upload_stream,
)
from proxy.client.many import Outcome, Source

if TYPE_CHECKING:
    # imported where a bar is shown: rich is a tenth of a second of start-up, and scripts
    # and --json never show a bar
    from proxy.cli.progress import FilesBar, UploadBar

__all__ = ["EXIT_CODES", "HELP", "configure", "exit_code_for", "run"]

HELP: Final = (
    "upload files, directories (-r) or stdin to gs://BUCKET/OBJECT or gs://BUCKET/PREFIX/"
    " through a rup proxy"
)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_DENIED: Final = 3
EXIT_PRECONDITION: Final = 4
EXIT_UNREACHABLE: Final = 5
EXIT_MISMATCH: Final = 6
EXIT_PARTIAL: Final = 7
EXIT_INTERRUPTED: Final = 130

EXIT_CODES: Final = {
    EXIT_OK: "every object was stored and verified",
    EXIT_FAILED: "the upload failed",
    EXIT_USAGE: "usage error",
    EXIT_DENIED: "authentication or permission refused",
    EXIT_PRECONDITION: "precondition failed (--if-generation-match, --no-clobber)",
    EXIT_UNREACHABLE: "proxy unreachable or kept failing for --retry-deadline (rerun resumes)",
    EXIT_MISMATCH: "stored object differs from what was sent",
    EXIT_PARTIAL: "some objects were stored, others failed (one line each on stderr)",
    EXIT_INTERRUPTED: "interrupted (a file upload stays resumable: rerun the command)",
}

_T = TypeVar("_T")

_DENIED_CODES: Final = frozenset(
    {ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN, ErrorCode.BAD_TOKEN}
)
_STDIN_READ_SIZE: Final = 1024 * 1024
#: seconds between rewrites of a file upload's resume record
_RECORD_INTERVAL: Final = 0.5
#: with several files, a file gets one of its ``--connections`` per this many bytes: below
#: that a connection's handshake and attach cost more than its share of the file gains
_BYTES_PER_CONNECTION: Final = 8 * 1024 * 1024


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
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="SOURCE... DEST",
        help="files, directories (with -r) or - for stdin, then gs://BUCKET/OBJECT for one"
        " object or gs://BUCKET/PREFIX/ (ending in /) to store each under its relative path",
    )
    parser.add_argument(
        "-r", "--recursive", action="store_true", help="upload the files under directories"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=8,
        metavar="N",
        help="files uploaded at once (default 8); a large file still gets --connections",
    )
    parser.add_argument(
        "--proxy",
        metavar="HOST:PORT[,HOST:PORT...]",
        default=os.environ.get("RUP_PROXY"),
        help="the rup proxy, or several to fail over between (default: $RUP_PROXY)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=4,
        metavar="N",
        help="TCP connections for a file (default 4); with several files, at most one per"
        f" {_BYTES_PER_CONNECTION // 2**20} MiB of the file",
    )
    parser.add_argument(
        "--auth-token",
        metavar="AUTH_TOKEN",
        default=os.environ.get("RUP_AUTH_TOKEN", ""),
        help="bearer token the proxy expects (default: $RUP_AUTH_TOKEN)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")
    parser.add_argument("--tls-ca", metavar="FILE", help="use TLS, trusting this CA bundle")
    parser.add_argument(
        "--content-type",
        metavar="TYPE",
        help="the objects' content type (default: guessed from each file's name)",
    )
    parser.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="custom metadata for every object (repeatable)",
    )
    parser.add_argument(
        "--if-generation-match",
        type=int,
        metavar="GEN",
        help="only store if the object's generation is GEN (0: only if it does not exist)",
    )
    parser.add_argument(
        "--no-clobber",
        action="store_true",
        help="never replace an existing object (--if-generation-match 0)",
    )
    parser.add_argument(
        "--frame-size",
        type=int,
        default=ClientSettings.frame_size,
        metavar="BYTES",
        help=f"payload bytes per frame of a streamed file (default"
        f" {ClientSettings.frame_size >> 20} MiB; pieces shrink while connections are cut"
        " mid-frame); a file of up to 8 MiB goes whole, as one request, when the proxy allows"
        " frames that large",
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
        "--single-session",
        action="store_true",
        help="one resumable session even for a large file: the proxy does not store it as"
        " segments composed at the end, so the object gets an MD5 (slower past one GCS stream)",
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh even if an earlier run of this upload was interrupted (this run"
        " is still recorded, so a rerun resumes it)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON line per object (and a summary line for several)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also say, on stderr, why each connection attempt failed and what was resumed",
    )


def _usage(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, if anything; fills in ``args.plan``, ``args.source``
    and ``args.url`` (the single object's, else the destination) and ``args.metadata_map``."""
    if not args.proxy:
        return "--proxy HOST:PORT is required (or set RUP_PROXY)"
    if len(args.paths) < 2:
        return "give a source (a file, a directory with -r, or -) and a gs:// destination"
    try:
        proxy_addresses(args.proxy)
        args.plan = plan_uploads(args.paths[:-1], args.paths[-1], recursive=args.recursive)
    except ValueError as exc:
        return str(exc)
    args.source, args.url = args.plan.pairs[0] if args.plan.single else ("", args.paths[-1])
    if args.connections < 1:
        return f"--connections must be at least 1, got {args.connections}"
    if args.jobs < 1:
        return f"--jobs must be at least 1, got {args.jobs}"
    if args.frame_size < MIN_FRAME_SIZE:
        return f"--frame-size must be at least {MIN_FRAME_SIZE}, got {args.frame_size}"
    if not args.retry_deadline >= 0:
        return f"--retry-deadline must not be negative, got {args.retry_deadline}"
    if args.no_clobber:
        if args.if_generation_match not in (None, 0):
            return "--no-clobber is --if-generation-match 0: give one or the other"
        args.if_generation_match = 0
    args.metadata_map = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            return f"--metadata wants KEY=VALUE, got {item!r}"
        if key in args.metadata_map:
            return f"--metadata {key} is given twice"
        args.metadata_map[key] = value
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


def _options(args: argparse.Namespace) -> UploadOptions:
    """The options every object of this command shares (content type: see _content_type)."""
    return UploadOptions(
        proxy=args.proxy,
        auth=args.auth_token,
        tls=_tls_context(args),
        settings=ClientSettings(
            connections=args.connections,
            frame_size=args.frame_size,
            retry=RetryPolicy(deadline=args.retry_deadline),
        ),
        content_type=args.content_type or DEFAULT_CONTENT_TYPE,
        metadata=args.metadata_map,
        if_generation_match=args.if_generation_match,
        single_session=args.single_session,
    )


def _content_type(args: argparse.Namespace, source: str) -> str:
    if args.content_type:
        return str(args.content_type)
    return DEFAULT_CONTENT_TYPE if source == "-" else content_type_for(source)


async def _upload(args: argparse.Namespace, bar: UploadBar | None) -> UploadResult:
    def progress(snapshot: UploadProgress) -> None:
        if bar is not None:
            bar.update(snapshot)

    options = dataclasses.replace(
        _options(args), content_type=_content_type(args, args.source), progress=progress
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
    """Write the resume record every :data:`_RECORD_INTERVAL` while it changes, the first
    time one interval in: an upload done sooner never writes one (a directory's many files
    would each cost a write and an unlink, to save less than an interval's work)."""
    written: ResumeRecord | None = None
    while True:
        await trio.sleep(_RECORD_INTERVAL)
        token = upload.token
        if token is not None:
            record = ResumeRecord(
                identity=identity, url=url, token=token, confirmed=tuple(upload.confirmed_ranges())
            )
            if record != written:
                store.save(record)
                written = record


def _notice(message: str) -> None:
    print(f"rup upload: {message}", file=sys.stderr)


class _ManyFiles:
    """What a many-file run shows as objects end: the overall bar, a line per failure on
    stderr, with ``--json`` a line per object on stdout; then the summary and exit code."""

    def __init__(self, args: argparse.Namespace, bar: FilesBar | None) -> None:
        self._args = args
        self._bar = bar
        self._pairs: tuple[tuple[str, str], ...] = args.plan.pairs
        self._started = time.monotonic()
        #: bytes the proxy holds of each unfinished object, by URL (large files report)
        self._in_progress: dict[str, int] = {}
        self._stored_bytes = 0
        self._done = 0
        self.failures: list[UploadError] = []

    def progress_for(self, url: str) -> Callable[[UploadProgress], None]:
        def progress(snapshot: UploadProgress) -> None:
            self._in_progress[url] = snapshot.bytes_received
            self._show()

        return progress

    def done(self, index: int, outcome: Outcome) -> None:
        source, url = self._pairs[index]
        self._in_progress.pop(url, None)
        self._done += 1
        if isinstance(outcome, UploadResult):
            self._stored_bytes += outcome.size
            line: dict[str, Any] = {**_summary(outcome), "source": source}
        else:
            self.failures.append(outcome)
            self._note(f"rup upload: failed {url}: {outcome.message}")
            line = {
                "ok": False,
                "url": url,
                "source": source,
                "error": outcome.message,
                "exit_code": exit_code_for(outcome),
            }
        if self._args.json:
            print(json.dumps(line), flush=True)
        self._show()

    def _note(self, line: str) -> None:
        if self._bar is not None:
            self._bar.note(line)
        else:
            print(line, file=sys.stderr)

    def _show(self) -> None:
        if self._bar is not None:
            self._bar.update(
                done=self._done,
                failed=len(self.failures),
                bytes_done=self._stored_bytes + sum(self._in_progress.values()),
            )

    def exit_code(self) -> int:
        if not self.failures:
            return EXIT_OK
        if len(self.failures) == len(self._pairs):
            return exit_code_for(self.failures[0])  # all failed: as one upload would say
        return EXIT_PARTIAL

    def finish(self) -> int:
        """Print the summary; the exit code."""
        code = self.exit_code()
        elapsed = time.monotonic() - self._started
        stored = len(self._pairs) - len(self.failures)
        rate = self._stored_bytes / elapsed / 2**20 if elapsed > 0 else 0.0
        if self._args.json:
            summary = {
                "ok": code == EXIT_OK,
                "summary": True,
                "objects": len(self._pairs),
                "stored": stored,
                "failed": len(self.failures),
                "bytes": self._stored_bytes,
                "elapsed_s": round(elapsed, 3),
                "exit_code": code,
            }
            print(json.dumps(summary))
        else:
            failed = f"; {len(self.failures)} failed" if self.failures else ""
            # what was stored, when anything was: nothing stored has no figures to give
            figures = (
                f" ({self._stored_bytes} bytes, crc32c verified, {rate:.1f} MiB/s)"
                if stored
                else ""
            )
            print(
                f"stored {stored} of {len(self._pairs)} objects{figures}{failed}", file=sys.stderr
            )
        return code


async def _upload_files(args: argparse.Namespace, report: _ManyFiles) -> None:
    """Every file of the plan, ``--jobs`` at a time; large ones keep resume records."""
    options = _options(args)
    store = ResumeStore.default()

    def options_for(source: Source, url: str) -> UploadOptions:
        own = dataclasses.replace(
            options,
            content_type=_content_type(args, os.fspath(source)),
            progress=report.progress_for(url),
        )
        size = _known_size(os.fspath(source))  # unreadable: put_file says so, as the outcome
        return own if size is None else _spread(own, size)

    async def upload_large(source: Source, url: str, options: UploadOptions) -> UploadResult:
        if args.no_resume:
            store.remove(os.fspath(source), url)
        return await _upload_file_resumably(os.fspath(source), url, options, store)

    await upload_many(
        args.plan.pairs,
        options,
        concurrency=args.jobs,
        options_for=options_for,
        on_done=report.done,
        upload_large=upload_large,
    )


def _spread(options: UploadOptions, size: int) -> UploadOptions:
    """``options`` with no more connections than ``size`` has shares of
    :data:`_BYTES_PER_CONNECTION` (and at least one)."""
    connections = max(1, min(options.settings.connections, -(-size // _BYTES_PER_CONNECTION)))
    if connections == options.settings.connections:
        return options
    settings = dataclasses.replace(options.settings, connections=connections)
    return dataclasses.replace(options, settings=settings)


def _run_many(args: argparse.Namespace) -> int:
    pairs = args.plan.pairs
    if args.json or not sys.stderr.isatty():
        report = _ManyFiles(args, None)
        _run(_upload_files, args, report)
        return report.finish()
    from proxy.cli.progress import FilesBar

    total = sum(os.path.getsize(source) for source, _ in pairs)
    with FilesBar(len(pairs), total) as bar:
        report = _ManyFiles(args, bar)
        _run(_upload_files, args, report)
    return report.finish()


def _run(function: Callable[..., Awaitable[_T]], *arguments: object) -> _T:
    try:
        return trio.run(function, *arguments)
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
        "segments": result.segments,
        "errors": dict(result.errors_by_code),
    }


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"rup upload: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"ok": False, "error": message, "exit_code": code}))
    return code


class _NoticeHandler(logging.Handler):
    """The client library's notices (``rup.client`` warnings) as ``rup upload: ...`` lines;
    with ``--verbose``, its INFO lines too, each with the seconds since the command began.

    It looks ``sys.stderr`` up at each line, so a progress bar that redirects stderr keeps
    the line above the bar.
    """

    def __init__(self, level: int, started: float) -> None:
        super().__init__(level)
        self._started = started

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.level < logging.WARNING:
            message = f"[{record.created - self._started:7.3f}] {message}"
        print(f"rup upload: {message}", file=sys.stderr)


def _show_client_notices(*, verbose: bool) -> None:
    logger = logging.getLogger("rup.client")
    level = logging.INFO if verbose else logging.WARNING
    for handler in [h for h in logger.handlers if isinstance(h, _NoticeHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(_NoticeHandler(level, time.time()))
    logger.setLevel(level)
    logger.propagate = False


def _known_size(source: str) -> int | None:
    """A file's size, for the bar to show from the start; None for stdin or the unreadable."""
    if source == "-":
        return None
    try:
        return os.stat(source).st_size
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    _show_client_notices(verbose=args.verbose)
    problem = _usage(args)
    if problem is not None:
        return _fail(args, problem, EXIT_USAGE)
    try:
        if not args.plan.single:
            return _run_many(args)
        if args.json or not sys.stderr.isatty():
            result = _run(_upload, args, None)
        else:
            from proxy.cli.progress import UploadBar

            with UploadBar(args.url, total=_known_size(args.source)) as bar:
                result = _run(_upload, args, bar)
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
