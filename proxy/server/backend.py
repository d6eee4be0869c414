"""Where the proxy writes: real GCS, any GCS-compatible endpoint, or the embedded one.

``rup serve`` must run on a fresh machine with no setup, so when it is given neither an
endpoint nor credentials it starts faultnet's strict GCS endpoint in-process (in memory, or
under ``--data-dir``) and writes there. The embedded endpoint requires a bearer secret
unless the operator asks for it to be open: it holds every object the proxy wrote, and
anyone who can reach it would otherwise bypass the proxy's own auth and allow-lists.

Sessions are named by reference, not by URL. An upload token carries the GCS session's
``upload_id`` only; the proxy that resumes it builds the session URI from *its own*
configured endpoint (:meth:`Backend.session_uri`). So a restarted embedded endpoint may come
back on another port, and no URL from a token is ever requested: a forged token cannot
make the proxy send a request (and, on real GCS, its OAuth bearer) anywhere else.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests
import requests.adapters
from google.api_core import exceptions as api_exceptions
from google.cloud import storage  # type: ignore[import-untyped]

from protocol import ErrorCode
from proxy.server.errors import ServerError, quote
from reliablewriter.http_posts import WholeObjectPoster, post_pool_for
from reliablewriter.transport import http_session

__all__ = [
    "Backend",
    "GcsTarget",
    "SessionReferenceError",
    "TargetKind",
    "open_backend",
    "pooled_session",
    "read_environment_once",
]

#: for the metadata requests made here: an object's generation, a bucket's existence
_METADATA_REQUEST_TIMEOUT = 30.0

#: what an ``upload_id`` may look like (GCS's and the embedded endpoint's are base64url)
_SESSION_REFERENCE = re.compile(r"[A-Za-z0-9_.~-]{1,1024}")


class TargetKind(enum.Enum):
    """Which GCS a backend talks to."""

    REAL = "gcs"  # storage.googleapis.com with Application Default Credentials
    ENDPOINT = "endpoint"  # a URL given on the command line, anonymous or with a bearer
    EMBEDDED = "embedded"  # faultnet's strict endpoint started in this process


class SessionReferenceError(ValueError):
    """A session URI or reference that does not belong to this backend's endpoint and bucket.

    The message never contains the URI or the reference (both are bearer credentials).
    """


@dataclass(frozen=True)
class GcsTarget:
    """What ``rup serve`` was asked to write to; :meth:`resolve` decides for "nothing given".

    ``access_token``: for the embedded endpoint, the bearer secret it requires (``None``:
    open to anyone who can reach it); for ``endpoint``, a bearer sent with every request.
    ``listen``: where the embedded endpoint listens (default: loopback, any free port).
    ``create_buckets``: create a missing bucket on first use (``None``: only for the
    embedded endpoint in memory, where nobody else could create it).
    """

    endpoint: str | None = None
    data_dir: Path | None = None
    project: str | None = None
    force_embedded: bool = False
    listen: tuple[str, int] = ("127.0.0.1", 0)
    access_token: str | None = field(default=None, repr=False)
    create_buckets: bool | None = None

    def resolve(self) -> TargetKind:
        if self.endpoint is not None:
            return TargetKind.ENDPOINT
        if self.force_embedded or self.data_dir is not None:
            return TargetKind.EMBEDDED
        return TargetKind.REAL if _default_credentials_configured() else TargetKind.EMBEDDED

    def creates_buckets(self) -> bool:
        """Whether a missing bucket is created on first use."""
        if self.create_buckets is not None:
            return self.create_buckets
        return self.resolve() is TargetKind.EMBEDDED and self.data_dir is None


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
    """A storage client plus what the proxy needs to know about the target behind it.

    ``create_buckets`` (default: only for the embedded endpoint) makes :meth:`bucket`
    create a bucket that does not exist yet. ``poster``, if given, sends each object stored
    in one request (``PUT_OBJECT``, or an upload stored at ``COMPLETE``) straight from trio
    instead of through the client's session in a worker thread: :func:`open_backend` gives
    one when the session does nothing it cannot
    (:func:`~reliablewriter.http_posts.post_pool_for`).
    """

    def __init__(
        self,
        client: storage.Client,
        kind: TargetKind,
        url: str,
        *,
        create_buckets: bool | None = None,
        poster: WholeObjectPoster | None = None,
    ) -> None:
        self.client = client
        self.poster = poster
        self.kind = kind
        #: where requests go, for logs (never contains a secret)
        self.url = url
        self.create_buckets = (
            kind is TargetKind.EMBEDDED if create_buckets is None else create_buckets
        )
        self._known_buckets: set[str] = set()

    def bucket(self, name: str) -> storage.Bucket:
        """The bucket handle for ``name``; creates the bucket first if asked to.

        Blocking (it may make HTTP requests): call it from a worker thread. A GCS that
        fails those requests makes it raise a retryable GCS_ERROR at once: no lock is held
        and no retry is hidden in the library (its default would retry ``exists`` for two
        minutes, and every other open of a freshly started proxy queued behind it).
        Threads may look at the same time; the one whose create is answered 409 lost a
        harmless race.
        """
        bucket = self.client.bucket(name)
        if self.create_buckets and name not in self._known_buckets:
            try:
                if not bucket.exists(retry=None, timeout=_METADATA_REQUEST_TIMEOUT):
                    with contextlib.suppress(api_exceptions.Conflict):
                        bucket.create(retry=None, timeout=_METADATA_REQUEST_TIMEOUT)
            except (api_exceptions.GoogleAPICallError, requests.RequestException) as exc:
                raise ServerError(
                    ErrorCode.GCS_ERROR,
                    f"could not make sure bucket {quote(name)} exists: {type(exc).__name__}",
                    retryable=True,
                ) from exc
            self._known_buckets.add(name)
        return bucket

    def ready_bucket(self, name: str) -> storage.Bucket | None:
        """The bucket handle for ``name`` if getting it needs no request (no creation
        asked, or the bucket already seen); else None: call :meth:`bucket` in a thread.
        Non-blocking, so a small object's hot path skips a thread hop."""
        if self.create_buckets and name not in self._known_buckets:
            return None
        return self.client.bucket(name)

    def live_generation(self, bucket: str, name: str) -> int:
        """The generation of the live ``bucket/name``, or 0 if there is none (one request).

        Blocking: call it from a worker thread. Raises google-api-core's errors for anything
        but "not found" (a missing bucket also reads as "no object": the session's start
        names it).
        """
        blob = self.bucket(bucket).get_blob(name, retry=None, timeout=_METADATA_REQUEST_TIMEOUT)
        return 0 if blob is None else int(blob.generation)

    # --- session references ---------------------------------------------------------

    @property
    def _api_base(self) -> urllib.parse.SplitResult:
        return urllib.parse.urlsplit(str(self.client.api_endpoint).rstrip("/"))

    def _session_path(self, bucket: str) -> str:
        return f"{self._api_base.path}/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o"

    def session_reference(self, bucket: str, session_uri: str) -> str:
        """What a token keeps of ``session_uri``: the session's ``upload_id``.

        Checks that the URI is a resumable session of ``bucket`` at this backend's endpoint,
        since it is only ever reached again through :meth:`session_uri`.
        """
        parts = urllib.parse.urlsplit(session_uri)
        base = self._api_base
        ids = urllib.parse.parse_qs(parts.query).get("upload_id", [])
        if (
            (parts.scheme, parts.netloc) != (base.scheme, base.netloc)
            or urllib.parse.unquote(parts.path) != urllib.parse.unquote(self._session_path(bucket))
            or len(ids) != 1
            or not _SESSION_REFERENCE.fullmatch(ids[0])
        ):
            raise SessionReferenceError(
                f"GCS returned a session for bucket {bucket!r} that is not at the configured "
                "endpoint, or not in the form of a resumable upload session"
            )
        return ids[0]

    def session_uri(self, bucket: str, reference: str) -> str:
        """The URI of the session ``reference`` names in ``bucket``, at this backend's endpoint.

        Raises :class:`SessionReferenceError` for a reference that is not an ``upload_id``:
        nothing from a token reaches a URL except an upload id in its query.
        """
        if not _SESSION_REFERENCE.fullmatch(reference):
            raise SessionReferenceError("the token's session reference is not an upload id")
        base = self._api_base
        query = urllib.parse.urlencode({"uploadType": "resumable", "upload_id": reference})
        return urllib.parse.urlunsplit(
            (base.scheme, base.netloc, self._session_path(bucket), query, "")
        )


@contextlib.contextmanager
def open_backend(target: GcsTarget) -> Iterator[Backend]:
    """A backend for ``target``; an embedded endpoint lives exactly as long as the context."""
    kind = target.resolve()
    # faultnet.gcs.clients is light; GcsServer is imported only for the embedded endpoint.
    from faultnet.gcs.clients import without_background_fetches

    creates = target.creates_buckets()
    with contextlib.ExitStack() as stack:
        if kind is TargetKind.REAL:
            client = without_background_fetches(storage.Client(project=target.project))
            url = "https://storage.googleapis.com"
        elif kind is TargetKind.ENDPOINT:
            assert target.endpoint is not None
            client = _client(target.endpoint, target.access_token)
            url = target.endpoint
        else:
            from faultnet.gcs import GcsServer

            host, port = target.listen
            server = stack.enter_context(
                GcsServer(host=host, port=port, data_dir=target.data_dir,
                          access_token=target.access_token)
            )  # fmt: skip
            url = server.url
            client = _client(url, target.access_token)
        read_environment_once(http_session(client), url)
        pool = post_pool_for(http_session(client), str(client.api_endpoint))
        if pool is not None:
            stack.callback(pool.close)  # its idle connections, before the endpoint stops
        yield Backend(client, kind, url, create_buckets=creates, poster=pool)


def _client(url: str, access_token: str | None) -> storage.Client:
    """A client for the endpoint at ``url``, sending ``access_token`` as its bearer if set."""
    from faultnet.gcs.clients import anonymous_client, authorized_client

    if access_token is None:
        return anonymous_client(url, http=pooled_session())
    return authorized_client(url, access_token, http=pooled_session())


def read_environment_once(session: requests.Session, url: str) -> None:
    """Have ``session`` take what requests reads from the environment for ``url`` (its
    proxy, unless ``NO_PROXY`` spares it, and a ``REQUESTS_CA_BUNDLE``) now, once.

    Otherwise requests reads it again on every request, scanning ``os.environ`` several
    times: 0.25-0.5 ms of CPU a request, 10-20% of what the proxy spends on a small object
    in all. A running proxy's environment does not change, and every request goes to
    ``url``'s host. ``~/.netrc``, which requests would also look for, is not read: GCS and
    the endpoints rup writes to take bearer tokens.
    """
    if not session.trust_env:
        return
    for scheme, proxy in requests.utils.get_environ_proxies(url).items():
        session.proxies.setdefault(scheme, proxy)
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle and session.verify is True:
        session.verify = bundle
    session.trust_env = False


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
