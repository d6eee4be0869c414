"""Prometheus metrics for the proxy, and the ``/metrics`` endpoint that serves them.

Each server owns its own :class:`prometheus_client.CollectorRegistry`, so several servers in
one process (tests, the demo) never mix their numbers. The endpoint is a deliberately tiny
HTTP/1.0 responder running as a trio task in the server's nursery: one request per
connection, ``GET /metrics`` only.
"""

from __future__ import annotations

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ServerMetrics", "serve_metrics"]

_MAX_REQUEST_HEAD = 8 * 1024
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


async def _answer(stream: trio.abc.Stream, metrics: ServerMetrics) -> None:
    head = b""
    with trio.move_on_after(_REQUEST_TIMEOUT):
        while b"\r\n\r\n" not in head and len(head) < _MAX_REQUEST_HEAD:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            head += chunk
    request_line = head.split(b"\r\n", 1)[0].split()
    if len(request_line) >= 2 and request_line[0] == b"GET" and request_line[1] == b"/metrics":
        status, content_type, body = b"200 OK", CONTENT_TYPE_LATEST.encode(), metrics.render()
    else:
        status, content_type, body = b"404 Not Found", b"text/plain", b"only /metrics lives here\n"
    response = (
        b"HTTP/1.0 " + status + b"\r\nContent-Type: " + content_type
        + b"\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n" + body
    )  # fmt: skip
    try:
        await stream.send_all(response)
    except trio.BrokenResourceError:
        pass  # the scraper went away; nothing to tell it
    finally:
        await trio.aclose_forcefully(stream)


async def serve_metrics(
    metrics: ServerMetrics,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``host:port`` until cancelled; reports the bound address."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()

    async def handler(stream: trio.SocketStream) -> None:
        await _answer(stream, metrics)

    async with trio.open_nursery() as nursery:
        task_status.started((sockname[0], sockname[1]))
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)
