"""Client helpers for a :class:`~faultnet.gcs.GcsServer`: storage clients, session starts.

Used by ``rup serve`` (the embedded endpoint's client), ``rup demo``, the chaos runner,
the benchmarks and the tests; so they live here, not in pytest fixtures.
"""

from __future__ import annotations

import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage  # type: ignore[import-untyped]

__all__ = [
    "anonymous_client",
    "authorized_client",
    "start_resumable_upload",
    "without_background_fetches",
]


def anonymous_client(url: str, *, http: requests.Session | None = None) -> storage.Client:
    """A google-cloud-storage client for the endpoint at ``url``, without credentials.

    ``http`` replaces the client's transport, e.g. a session with faultnet's
    fault-injecting adapter mounted.
    """
    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": url},
        _http=http,
    )
    return without_background_fetches(client)


def authorized_client(
    url: str, access_token: str, *, http: requests.Session | None = None
) -> storage.Client:
    """A google-cloud-storage client for an endpoint that requires ``access_token``.

    Every request carries ``Authorization: Bearer <access_token>``, session URIs of
    resumable uploads included. ``http``, if given, lends its transport adapters (e.g.
    faultnet's fault-injecting one) to the authorized session; it is not changed.
    """
    from google.auth.transport.requests import AuthorizedSession
    from google.oauth2.credentials import Credentials

    credentials = Credentials(token=access_token)  # type: ignore[no-untyped-call]
    session = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
    if http is not None:
        session.trust_env = http.trust_env
        for prefix, adapter in http.adapters.items():
            session.mount(prefix, adapter)
    client = storage.Client(
        project="test",
        credentials=credentials,
        client_options={"api_endpoint": url},
        _http=session,
    )
    return without_background_fetches(client)


def without_background_fetches(client: storage.Client) -> storage.Client:
    """Stop ``client`` from starting threads of its own behind the caller's back.

    google-cloud-storage 3.x keeps a bucket-metadata cache for telemetry: a cache miss or a
    404 starts a daemon thread that fetches the bucket, retrying with backoff. Those threads
    belong to no nursery, outlive the endpoint they talk to, send requests through the
    fault-injecting transport that nobody asked for, and draw on the global ``random``
    state. rup needs none of that metadata.
    """
    client._bucket_metadata_cache = None
    return client


def start_resumable_upload(
    url: str,
    bucket: str,
    name: str,
    *,
    http: requests.Session | None = None,
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
) -> str:
    """Initiate a resumable upload of ``bucket/name`` at ``url``; returns the session URI.

    Raises ``requests.HTTPError`` if the endpoint refuses (e.g. 412 on a precondition).
    """
    response = (http or requests).post(
        f"{url}/upload/storage/v1/b/{bucket}/o",
        params={"uploadType": "resumable", "name": name, **(query or {})},
        headers=headers,
        timeout=30,
    )
    response.raise_for_status()
    return response.headers["Location"]
