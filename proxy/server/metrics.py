"""Prometheus metrics for the proxy, and the HTTP listener that serves them with the probes.

Names follow Prometheus's naming guide: base units (seconds, bytes) named in the name, the
unit before ``_total``, no ``_created`` series (:func:`disable_created_metrics`, which is
process-wide: nothing in a proxy process wants them), histograms for durations, and every
label value the proxy knows of exported at zero from the start, so a rate() over a failure
counter has a series to work on before the first failure.

Each server owns its own :class:`prometheus_client.CollectorRegistry`, so several servers in
one process (tests, the demo) never mix their numbers; each registry also carries the
``process_*`` and ``python_info`` collectors and ``rup_build_info``.

The listener is prometheus-client's exposition app on wsgiref's threading server, run by a
trio task in the server's nursery: ``GET /metrics``, and the probes of
:mod:`proxy.server.health` (``/healthz``, ``/readyz``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import requests
import requests.adapters
import trio
from prometheus_client import (
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from protocol import ErrorCode
from proxy.version import version
from reliablewriter import WriterError
from reliablewriter.http_posts import Body, WholeObjectPoster
from reliablewriter.transport import Refused, Stored, StoreOutcome

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from _typeshed.wsgi import WSGIApplication as WSGIApp

__all__ = [
    "GCS_METHODS",
    "GCS_OUTCOMES",
    "METRICS_PATH",
    "MetricsListenError",
    "ServerMetrics",
    "gcs_outcome",
    "observe_gcs_requests",
    "serve_metrics",
    "timed_poster",
]

disable_created_metrics()  # type: ignore[no-untyped-call]
del PLATFORM_COLLECTOR  # the default registry's; each server registers its own

_REQUEST_TIMEOUT = 10.0

METRICS_PATH = "/metrics"

#: the HTTP methods the proxy sends to GCS, and how a request may end
GCS_METHODS = ("GET", "POST", "PUT", "DELETE")
GCS_OUTCOMES = ("success", "client_error", "server_error", "network_error")

#: failure reasons known up front: a bug, the writer's errors by class name, and the error
#: codes a whole-object store ends with
_FAILURE_REASONS = (
    "crash",
    *(cls.__name__ for cls in WriterError.__subclasses__()),
    *(code.name.lower() for code in (ErrorCode.GCS_ERROR, ErrorCode.PRECONDITION_FAILED)),
)
#: the retry causes reliablewriter reports most (others appear on their first retry)
_RETRY_CAUSES = (
    "timeout",
    "connection",
    "truncated-response",
    "closed-connection",
    *(f"http-{status}" for status in (408, 410, 429, 500, 502, 503, 504)),
)

#: upload durations span a tiny object to a multi-GiB one over a slow link
_UPLOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    """The proxy's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        build_info = Gauge(
            "rup_build_info", "The running rup's version (always 1)", ["version"], registry=r
        )
        build_info.labels(version=version()).set(1)
        self.uploads_started = Counter(
            "rup_uploads_started", "Uploads opened (not counting attaches)", registry=r
        )
        self.uploads_resumed = Counter(
            "rup_uploads_resumed", "Uploads taken over from a token by this instance", registry=r
        )
        self.uploads_completed = Counter(
            "rup_uploads_completed", "Uploads finalized in GCS", registry=r
        )
        self.uploads_failed = Counter(
            "rup_uploads_failed", "Uploads that ended without an object", ["reason"], registry=r
        )
        self.bytes_received = Counter(
            "rup_received_bytes", "WriteAt payload bytes received and verified", registry=r
        )
        self.bytes_committed = Counter(
            "rup_committed_bytes", "Bytes acknowledged as durable by GCS", registry=r
        )
        self.retries = Counter(
            "rup_gcs_retries", "Retried GCS requests by cause", ["cause"], registry=r
        )
        self.errors = Counter(
            "rup_errors_sent", "Error frames sent to clients by code", ["code"], registry=r
        )
        self.buffer_bytes = Gauge(
            "rup_buffer_reserved_bytes",
            "Upload windows reserved from the shared budget",
            registry=r,
        )
        self.buffer_held = Gauge(
            "rup_buffer_held_bytes",
            "Bytes held in upload buffers, received but not yet acknowledged by GCS",
            registry=r,
        )
        self.connections = Gauge("rup_connections", "Open client connections", registry=r)
        self.active_uploads = Gauge(
            "rup_active_uploads", "Uploads with a live writer in this process", registry=r
        )
        self.upload_duration = Histogram(
            "rup_upload_duration_seconds",
            "From an upload's open (or takeover) on this instance to its object in GCS",
            buckets=_UPLOAD_BUCKETS,
            registry=r,
        )
        self.first_commit = Histogram(
            "rup_upload_first_commit_seconds",
            "From an upload's open (or takeover) to the first bytes GCS acknowledged",
            buckets=_UPLOAD_BUCKETS,
            registry=r,
        )
        self.gcs_requests = Histogram(
            "rup_gcs_request_duration_seconds",
            "GCS HTTP requests, from sending to the response headers (or the failure)",
            ["method", "outcome"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        for reason in _FAILURE_REASONS:
            self.uploads_failed.labels(reason=reason)
        for cause in _RETRY_CAUSES:
            self.retries.labels(cause=cause)
        for code in ErrorCode:
            self.errors.labels(code=code.name)
        for method in GCS_METHODS:
            for outcome in GCS_OUTCOMES:
                self.gcs_requests.labels(method=method, outcome=outcome)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def gcs_outcome(status: int | None) -> str:
    """How a GCS request ended, for the ``outcome`` label: ``None`` for no HTTP answer.

    A 308 is a resumable session's "resume incomplete", the usual answer to a chunk.
    """
    if status is None:
        return "network_error"
    if status < 400:
        return "success"
    return "client_error" if status < 500 else "server_error"


class _TimedAdapter(requests.adapters.BaseAdapter):
    """Times every request of the adapter it wraps into ``rup_gcs_request_duration_seconds``.

    Requests' response hooks see only answered requests; wrapping the adapter sees failures
    too, and measures time to the response headers (chunk bodies are sent within it).
    """

    def __init__(self, inner: requests.adapters.BaseAdapter, histogram: Histogram) -> None:
        super().__init__()
        self.inner = inner
        self.histogram = histogram

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        method = request.method or "GET"
        if method not in GCS_METHODS:
            method = "other"
        start = time.monotonic()
        status: int | None = None
        try:
            response = self.inner.send(request, *args, **kwargs)
            status = int(response.status_code)
            return response
        finally:
            self.histogram.labels(method=method, outcome=gcs_outcome(status)).observe(
                time.monotonic() - start
            )

    def close(self) -> None:
        self.inner.close()


class _TimedPoster:
    """Times every POST of the poster it wraps into ``rup_gcs_request_duration_seconds``,
    as :class:`_TimedAdapter` does for the session's requests (here: to the whole answer)."""

    def __init__(self, inner: WholeObjectPoster, histogram: Histogram) -> None:
        self._inner = inner
        self._histogram = histogram
        #: the histogram's child per outcome (labels() costs a lookup and a lock per call)
        self._by_outcome: dict[str, Any] = {}

    async def post(
        self, url: str, body: Body, content_type: str, timeouts: tuple[float, float]
    ) -> StoreOutcome:
        start = time.monotonic()
        outcome = await self._inner.post(url, body, content_type, timeouts)
        status = (
            200 if isinstance(outcome, Stored)
            else outcome.status if isinstance(outcome, Refused)
            else None
        )  # fmt: skip
        outcome_label = gcs_outcome(status)
        timed = self._by_outcome.get(outcome_label)
        if timed is None:
            timed = self._by_outcome[outcome_label] = self._histogram.labels(
                method="POST", outcome=outcome_label
            )
        timed.observe(time.monotonic() - start)
        return outcome


def timed_poster(poster: WholeObjectPoster, metrics: ServerMetrics) -> WholeObjectPoster:
    """``poster``, its POSTs timed into ``metrics`` like every request of the session."""
    return _TimedPoster(poster, metrics.gcs_requests)


def observe_gcs_requests(session: requests.Session, metrics: ServerMetrics) -> None:
    """Time every request ``session`` makes into ``metrics`` from now on.

    Idempotent per session: a session already observed reports to ``metrics`` instead (a
    backend may outlive one server and serve the next).
    """
    for prefix, adapter in list(session.adapters.items()):
        if isinstance(adapter, _TimedAdapter):
            adapter.histogram = metrics.gcs_requests
        else:
            session.adapters[prefix] = _TimedAdapter(adapter, metrics.gcs_requests)


class MetricsListenError(OSError):
    """The metrics listener could not be opened (its ``errno`` says why): not the proxy's
    own listener, which a caller may want to tell apart in its message."""


class _MetricsServerV6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """wsgiref's handler, without a stderr line per scrape, and with a bound on slow clients."""

    timeout = _REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass


#: a probe: ``(HTTP status line, body)`` for ``/healthz`` or ``/readyz``
Probe = Callable[[], tuple[str, str]]


def _routes(app: WSGIApp, probes: Mapping[str, Probe]) -> WSGIApp:
    """``app`` at ``/metrics``, each probe at its path; every other path is a 404 (a scraper
    at a wrong URL should hear so, not get metrics by accident)."""

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path == METRICS_PATH:
            return app(environ, start_response)
        probe = probes.get(str(path))
        if probe is not None:
            status, body = probe()
            start_response(
                status,
                [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")],
            )
            return [body.encode() + b"\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"only /metrics, /healthz and /readyz live here\n"]

    return serve


async def serve_metrics(
    metrics: ServerMetrics,
    host: str,
    port: int,
    probes: Mapping[str, Probe] | None = None,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` (and ``probes``, path -> probe) on ``host:port`` until
    cancelled; reports the bound address.

    prometheus-client's WSGI app on wsgiref's threading server, in a thread of its own (the
    exposition server is blocking); probes run in its request threads. Cancelling this task
    stops the server and waits for its thread, so the port is closed when the task is gone.
    """
    server_class = _MetricsServerV6 if ":" in host else ThreadingWSGIServer
    app = _routes(make_wsgi_app(metrics.registry), probes or {})
    try:
        httpd: WSGIServer = make_server(host, port, app, server_class, _QuietHandler)
    except OSError as exc:
        raise MetricsListenError(exc.errno, exc.strerror) from exc
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="rup-metrics", daemon=True
    )
    thread.start()
    try:
        address = httpd.server_address
        task_status.started((str(address[0]), int(address[1])))
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            # shutdown() waits for serve_forever to notice, at most one poll interval.
            await trio.to_thread.run_sync(httpd.shutdown)
            httpd.server_close()
            await trio.to_thread.run_sync(thread.join)
