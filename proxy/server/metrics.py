"""Prometheus metrics for the proxy, and the ``/metrics`` endpoint that serves them.

Each server owns its own :class:`prometheus_client.CollectorRegistry`, so several servers in
one process (tests, the demo) never mix their numbers. The endpoint is prometheus-client's
own exposition app (:func:`prometheus_client.make_wsgi_app`) on wsgiref's threading server,
run by a trio task in the server's nursery: ``GET /metrics`` only.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from _typeshed.wsgi import WSGIApplication as WSGIApp

__all__ = ["ServerMetrics", "serve_metrics"]

_REQUEST_TIMEOUT = 10.0


class ServerMetrics:
    """The proxy's counters and gauges, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
            "rup_bytes_received", "WriteAt payload bytes received and verified", registry=r
        )
        self.bytes_committed = Counter(
            "rup_bytes_committed", "Bytes acknowledged as durable by GCS", registry=r
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

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _MetricsServerV6(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """wsgiref's handler, without a stderr line per scrape, and with a bound on slow clients."""

    timeout = _REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _metrics_only(app: WSGIApp) -> WSGIApp:
    """``app`` at ``/metrics``; every other path is a 404 (a scraper at a wrong URL should
    hear so, not get metrics by accident)."""

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/metrics":
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"only /metrics lives here\n"]

    return serve


async def serve_metrics(
    metrics: ServerMetrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``host:port`` until cancelled; reports the bound address.

    prometheus-client's WSGI app on wsgiref's threading server, in a thread of its own (the
    exposition server is blocking). Cancelling this task stops the server and waits for its
    thread, so the port is closed when the task is gone.
    """
    server_class = _MetricsServerV6 if ":" in host else ThreadingWSGIServer
    httpd: WSGIServer = make_server(
        host, port, _metrics_only(make_wsgi_app(metrics.registry)), server_class, _QuietHandler
    )
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
