"""The backend's GCS session takes its proxy from the environment once, when it is made."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from faultnet.gcs import GcsServer
from proxy.server.backend import GcsTarget, open_backend

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class ForwardProxy:
    """An HTTP forward proxy that forwards nothing: it records each request line (absolute
    URLs, since clients send those to a proxy) and answers 404."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(10.0)
        self.request_lines: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def _serve(self) -> None:
        for _ in range(20):  # more than any test sends
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed, or nobody came
            with conn:
                conn.settimeout(10.0)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    data = conn.recv(4096)
                    if not data:
                        break
                    head += data
                self.request_lines.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
                conn.sendall(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self._listener.close()
        self._thread.join(timeout=10)


@pytest.fixture
def forward_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ForwardProxy]:
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    proxy = ForwardProxy()
    yield proxy
    proxy.close()


def test_the_environment_proxy_carries_gcs_requests_even_once_it_is_unset(
    forward_proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = "http://127.0.0.1:9"  # never reached directly
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    with open_backend(GcsTarget(endpoint=endpoint, create_buckets=False)) as backend:
        monkeypatch.delenv("HTTP_PROXY")  # read when the backend was made: still in force
        assert backend.live_generation("bucket-a", "name") == 0  # the proxy's 404
        assert backend.live_generation("bucket-a", "other") == 0
    assert forward_proxy.request_lines == [
        f"GET {endpoint}/storage/v1/b/bucket-a/o/name?projection=noAcl&prettyPrint=false HTTP/1.1",
        f"GET {endpoint}/storage/v1/b/bucket-a/o/other?projection=noAcl&prettyPrint=false HTTP/1.1",
    ]


def test_no_proxy_for_the_endpoint_sends_gcs_requests_straight_to_it(
    forward_proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch, gcs_server: GcsServer
) -> None:
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with open_backend(GcsTarget(endpoint=gcs_server.url, create_buckets=True)) as backend:
        monkeypatch.delenv("NO_PROXY")
        assert backend.live_generation("bucket-b", "name") == 0  # the endpoint's own answer
        backend.bucket("bucket-b")  # created at the endpoint, straight
        assert backend.live_generation("bucket-b", "name") == 0
    assert forward_proxy.request_lines == []
