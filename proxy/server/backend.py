"""Where the proxy writes: real GCS, any GCS-compatible endpoint, or the embedded one.

``rup serve`` must run on a fresh machine with no setup, so when it is given neither an
endpoint nor credentials it starts faultnet's strict GCS endpoint in-process (in memory, or
under ``--data-dir``) and writes there. Buckets on the embedded endpoint are created on
first use, since nobody else can create them.
"""

from __future__ import annotations

import contextlib
import enum
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
import requests.adapters
from google.cloud import storage  # type: ignore[import-untyped]

__all__ = [
    "Backend",
    "GcsTarget",
    "TargetKind",
    "open_backend",
    "pooled_session",
]


class TargetKind(enum.Enum):
    """Which GCS a backend talks to."""

    REAL = "gcs"  # storage.googleapis.com with Application Default Credentials
    ENDPOINT = "endpoint"  # a URL given on the command line, anonymous
    EMBEDDED = "embedded"  # faultnet's strict endpoint started in this process


@dataclass(frozen=True)
class GcsTarget:
    """What ``rup serve`` was asked to write to; :meth:`resolve` decides for "nothing given"."""

    endpoint: str | None = None
    data_dir: Path | None = None
    project: str | None = None
    force_embedded: bool = False

    def resolve(self) -> TargetKind:
        if self.endpoint is not None:
            return TargetKind.ENDPOINT
        if self.force_embedded or self.data_dir is not None:
            return TargetKind.EMBEDDED
        return TargetKind.REAL if _default_credentials_configured() else TargetKind.EMBEDDED


def _default_credentials_configured() -> bool:
    """Whether Application Default Credentials are set up, without probing the network.

    ``google.auth.default()`` would also try the GCE metadata server, which costs seconds on
    a machine that is not on GCE; a fresh machine should start the embedded endpoint at once.
    """
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return True
    config_dir = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(
        os.path.expanduser("~"), ".config", "gcloud"
    )
    return os.path.exists(os.path.join(config_dir, "application_default_credentials.json"))


class Backend:
    """A storage client plus what the proxy needs to know about the target behind it."""

    def __init__(self, client: storage.Client, kind: TargetKind, url: str) -> None:
        self.client = client
        self.kind = kind
        #: where requests go, for logs (never contains a secret)
        self.url = url
        self._known_buckets: set[str] = set()
        self._lock = threading.Lock()

    def bucket(self, name: str) -> storage.Bucket:
        """The bucket handle for ``name``; creates it first on the embedded endpoint.

        Blocking (it may make HTTP requests): call it from a worker thread.
        """
        bucket = self.client.bucket(name)
        if self.kind is TargetKind.EMBEDDED:
            with self._lock:
                if name not in self._known_buckets:
                    if not bucket.exists():
                        bucket.create()
                    self._known_buckets.add(name)
        return bucket


@contextlib.contextmanager
def open_backend(target: GcsTarget) -> Iterator[Backend]:
    """A backend for ``target``; an embedded endpoint lives exactly as long as the context."""
    kind = target.resolve()
    # faultnet.gcs.clients is light; GcsServer is imported only for the embedded endpoint.
    from faultnet.gcs.clients import anonymous_client, without_background_fetches

    if kind is TargetKind.REAL:
        client = without_background_fetches(storage.Client(project=target.project))
        yield Backend(client, kind, "https://storage.googleapis.com")
        return

    from faultnet.gcs import GcsServer

    if kind is TargetKind.ENDPOINT:
        assert target.endpoint is not None
        yield Backend(
            anonymous_client(target.endpoint, http=pooled_session()), kind, target.endpoint
        )
        return
    with GcsServer(host="127.0.0.1", port=0, data_dir=target.data_dir) as server:
        yield Backend(anonymous_client(server.url, http=pooled_session()), kind, server.url)


def pooled_session(connections: int = 128) -> requests.Session:
    """A requests session that keeps up to ``connections`` connections alive per host.

    Every upload's writer makes its requests from a worker thread; requests' default pool
    of 10 would make busy proxies reconnect to GCS for most chunks.
    """
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=connections)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
