"""Per-upload faults on the proxy -> GCS leg, through one shared ``requests`` session.

The proxy has one storage client, hence one session, for all its uploads. A chaos run wants
each upload's GCS requests to suffer that upload's own fault plan (so the faults an upload
meets do not depend on which other uploads share the connection pool) and to carry that
upload's ``x-retry-test-id`` (so GCS-side scripted faults hit the upload they were written
for). :class:`UploadRouter` is that session: it recognises an upload by its object name when
the resumable session is initiated, learns the session's ``upload_id`` from the reply, and
from then on sends every request of that session through the upload's own
:class:`~faultnet.transport.FaultyHTTPAdapter`. A small object stored by one multipart
request is recognised by the name in its first part. Requests of unknown uploads, and every
other request, go through a plain pooled adapter.

The segments of composite uploads are temporary objects named by the proxy, which says
nothing of the upload they belong to: sessions of names under a registered temporary prefix
(:meth:`UploadRouter.route_temporaries`) share one fault plan, and carry no retry test.

It also speaks the retry-test API (``POST /retry_test``), which the strict endpoint shares
with storage-testbench, so the same run works against either.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from requests.adapters import BaseAdapter, HTTPAdapter

from faultnet.counters import FaultCounters
from faultnet.plan import FaultPlan
from faultnet.transport import FaultyHTTPAdapter

__all__ = ["RetryTestClient", "UploadRouter"]

_RETRY_TEST_HEADER = "x-retry-test-id"
_UPLOAD_METHOD = "storage.objects.insert"


@dataclass(frozen=True)
class _Route:
    adapter: FaultyHTTPAdapter
    retry_test_id: str | None


class UploadRouter(requests.Session):
    """A session that sends each registered upload's requests through that upload's faults.

    Thread-safe: the proxy's writers call it from many worker threads at once.
    """

    def __init__(self, counters: FaultCounters, *, pool_size: int = 64) -> None:
        super().__init__()
        # A proxy from the environment would route around the faulty adapters.
        self.trust_env = False
        self._counters = counters
        self._plain = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
        self.mount("http://", self._plain)
        self.mount("https://", self._plain)
        self._lock = threading.Lock()
        self._by_name: dict[str, _Route] = {}
        self._by_upload_id: dict[str, _Route] = {}
        self._names_by_upload_id: dict[str, str] = {}
        #: the temporary prefix of composite uploads' segments, and the route they share
        self._temporaries: tuple[str, _Route] | None = None
        # get_adapter() only sees the URL; send() decides the route and passes it on here.
        self._current = threading.local()

    def route_temporaries(self, prefix: str, plan: FaultPlan) -> None:
        """From now on, sessions of objects under ``prefix`` that no upload registered (the
        segments of composite uploads) suffer ``plan``, all of them together."""
        with self._lock:
            self._temporaries = (prefix, _Route(FaultyHTTPAdapter(plan, self._counters), None))

    def register(self, name: str, plan: FaultPlan, retry_test_id: str | None) -> None:
        """From now on, requests for object ``name`` suffer ``plan`` and carry the test id."""
        route = _Route(FaultyHTTPAdapter(plan, self._counters), retry_test_id)
        with self._lock:
            self._by_name[name] = route

    def release(self, name: str) -> None:
        """Forget the upload of ``name`` and close its connections."""
        with self._lock:
            route = self._by_name.pop(name, None)
            for upload_id in [u for u, n in self._names_by_upload_id.items() if n == name]:
                del self._names_by_upload_id[upload_id]
                self._by_upload_id.pop(upload_id, None)
        if route is not None:
            route.adapter.close()

    def close(self) -> None:
        with self._lock:
            names = list(self._by_name)
            temporaries, self._temporaries = self._temporaries, None
        for name in names:
            self.release(name)
        if temporaries is not None:
            temporaries[1].adapter.close()
        super().close()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        route, name = self._route_for(request)
        if route is not None and route.retry_test_id is not None:
            request.headers[_RETRY_TEST_HEADER] = route.retry_test_id
        self._current.route = route
        try:
            response = super().send(request, **kwargs)
        finally:
            self._current.route = None
        if name is not None and "Location" in response.headers:
            upload_id = _query(response.headers["Location"]).get("upload_id")
            if upload_id is not None:
                with self._lock:
                    if route is not None and route in (self._by_name.get(name), self._shared()):
                        self._by_upload_id[upload_id] = route
                        self._names_by_upload_id[upload_id] = name
        return response

    def get_adapter(self, url: str) -> BaseAdapter:
        route: _Route | None = getattr(self._current, "route", None)
        return route.adapter if route is not None else super().get_adapter(url)

    def _route_for(self, request: requests.PreparedRequest) -> tuple[_Route | None, str | None]:
        """The upload's route, and its object name when this request starts the session."""
        query = _query(request.url or "")
        upload_id = query.get("upload_id")
        with self._lock:
            if upload_id is not None:
                return self._by_upload_id.get(upload_id), None
            if request.method != "POST":
                return None, None
            upload_type = query.get("uploadType")
            if upload_type == "resumable":
                name = query.get("name") or _name_in_body(request.body)
            elif upload_type == "multipart":  # a small object, stored by one request
                name = _name_in_multipart(request.body)
            else:
                return None, None
            if name is None:
                return None, None
            route = self._by_name.get(name)
            if route is None and self._temporaries is not None:
                prefix, shared = self._temporaries
                route = shared if name.startswith(prefix) else None
            return route, name

    def _shared(self) -> _Route | None:
        return None if self._temporaries is None else self._temporaries[1]


def _query(url: str) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(urlsplit(url).query).items()}


def _name_in_body(body: object) -> str | None:
    """The object name in a resumable upload's initiating JSON body, if there is one."""
    if isinstance(body, bytes | bytearray):
        body = bytes(body).decode("utf-8", "replace")
    if not isinstance(body, str) or not body.startswith("{"):
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    name = document.get("name") if isinstance(document, dict) else None
    return name if isinstance(name, str) else None


#: how far into a multipart body its first part (the object resource) is looked for
_RESOURCE_SEARCH_LIMIT = 64 * 1024


def _name_in_multipart(body: object) -> str | None:
    """The object name in a multipart upload's first part (the JSON resource), if any."""
    if not isinstance(body, bytes | bytearray):
        return None
    head = bytes(body[:_RESOURCE_SEARCH_LIMIT])
    start = head.find(b"\r\n\r\n")
    end = head.find(b"\r\n--", start)
    if start < 0 or end < 0:
        return None
    return _name_in_body(head[start + 4 : end])


class RetryTestClient:
    """storage-testbench's retry-test API: script faults, then see which ones fired."""

    def __init__(self, endpoint: str, session: requests.Session | None = None) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._session = session or requests.Session()

    def create(self, instructions: Sequence[str]) -> str:
        """Register ``instructions`` for uploads (``storage.objects.insert``); returns the id."""
        response = self._session.post(
            f"{self._endpoint}/retry_test",
            json={"instructions": {_UPLOAD_METHOD: list(instructions)}, "transport": "HTTP"},
            timeout=30,
        )
        response.raise_for_status()
        test_id: str = response.json()["id"]
        return test_id

    def fired(self, test_id: str, instructions: Sequence[str]) -> list[str]:
        """Which of ``instructions`` (as created) have fired; deletes the test."""
        response = self._session.get(f"{self._endpoint}/retry_test/{test_id}", timeout=30)
        response.raise_for_status()
        remaining = _remaining(response.json())
        self._session.delete(f"{self._endpoint}/retry_test/{test_id}", timeout=30)
        # instructions fire in order, so what is left is a suffix of what was given
        return list(instructions[: len(instructions) - len(remaining)])


def _remaining(resource: Mapping[str, Any]) -> list[str]:
    queue = resource.get("instructions", {}).get(_UPLOAD_METHOD, [])
    return [str(item) for item in queue]
