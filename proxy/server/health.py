"""The probes a load balancer or Kubernetes asks: ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process can answer at all: a liveness probe that fails
means the process is wedged and should be restarted. ``/readyz`` answers 200 only while
the proxy takes new connections and its GCS endpoint accepts TCP connections; from the
moment a SIGTERM starts the drain it answers 503, so a load balancer stops sending new
clients while the connections it has are told to go away. Both are served on the metrics
listener (``rup serve --metrics``), by its request threads.

The GCS check is a TCP connect (no request, no credentials), remembered for a moment so
that probes from several load balancers cost one connect.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse
from collections.abc import Callable

__all__ = ["HEALTHZ_PATH", "READYZ_PATH", "Health"]

HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"

_OK = "200 OK"
_UNAVAILABLE = "503 Service Unavailable"


def _endpoint_address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname or "127.0.0.1", parts.port or default


class Health:
    """Answers the two probes for one server.

    ``draining``: whether the server has begun its shutdown (it then takes no new clients).
    ``gcs_url``: the GCS endpoint whose reachability readiness requires.
    ``connect_timeout`` bounds one check; a result is reused for ``remember`` seconds.
    """

    def __init__(
        self,
        draining: Callable[[], bool],
        gcs_url: str,
        *,
        connect_timeout: float = 1.0,
        remember: float = 2.0,
    ) -> None:
        self._draining = draining
        self._gcs = _endpoint_address(gcs_url)
        self._connect_timeout = connect_timeout
        self._remember = remember
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._gcs_problem: str | None = None

    def healthz(self) -> tuple[str, str]:
        return _OK, "alive"

    def readyz(self) -> tuple[str, str]:
        if self._draining():
            return _UNAVAILABLE, "draining: shutting down, not taking new connections"
        problem = self._gcs_reachability()
        if problem is not None:
            return _UNAVAILABLE, problem
        return _OK, "ready"

    def probes(self) -> dict[str, Callable[[], tuple[str, str]]]:
        """Path -> probe, for :func:`proxy.server.metrics.serve_metrics`."""
        return {HEALTHZ_PATH: self.healthz, READYZ_PATH: self.readyz}

    def _gcs_reachability(self) -> str | None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= self._remember:
                self._gcs_problem = self._connect()
                self._checked_at = time.monotonic()
            return self._gcs_problem

    def _connect(self) -> str | None:
        host, port = self._gcs
        try:
            with socket.create_connection((host, port), timeout=self._connect_timeout):
                return None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return f"GCS endpoint {host}:{port} unreachable: {reason}"
