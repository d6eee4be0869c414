"""A real proxy served from a thread of its own, for commands that run their own trio loop."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from faultnet.plan import FaultPlan
from faultnet.tcpproxy import open_chaos_proxy
from proxy.server import ProxyServer, serve_in_background
from proxy.server.backend import Backend, TargetKind
from proxy.server.settings import ServerSettings

__all__ = ["AUTH_TOKEN", "ThreadedProxy", "proxy_in_thread", "stored"]

#: the bearer token the upload tests' proxy wants (conftest's ``proxy_address``)
AUTH_TOKEN = "sesame"


@dataclass(frozen=True)
class ThreadedProxy:
    """``address`` is where clients connect (``HOST:PORT``); ``server`` runs in the thread."""

    address: str
    server: ProxyServer


@contextlib.contextmanager
def proxy_in_thread(
    gcs_server: GcsServer, settings: ServerSettings, plan: FaultPlan | None = None
) -> Iterator[ThreadedProxy]:
    """Serve a proxy writing to ``gcs_server``; with ``plan``, clients reach it through a
    faultnet proxy that applies the plan."""
    ready: queue.Queue[tuple[ThreadedProxy, trio.lowlevel.TrioToken, trio.Event]] = queue.Queue()

    async def serve() -> None:
        backend = Backend(anonymous_client(gcs_server.url), TargetKind.EMBEDDED, gcs_server.url)
        async with (
            serve_in_background(settings, backend) as server,
            contextlib.AsyncExitStack() as stack,
        ):
            host, port = server.address
            if plan is not None:
                link = await stack.enter_async_context(open_chaos_proxy(server.address, plan))
                host, port = link.address
            stop = trio.Event()
            ready.put(
                (ThreadedProxy(f"{host}:{port}", server), trio.lowlevel.current_trio_token(), stop)
            )
            await stop.wait()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    proxy, token, stop = ready.get(timeout=30)
    try:
        yield proxy
    finally:
        trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(timeout=30)


def stored(gcs_server: GcsServer, bucket: str, name: str) -> bytes:
    """The object's bytes, read back with google-cloud-storage."""
    data: bytes = anonymous_client(gcs_server.url).bucket(bucket).blob(name).download_as_bytes()
    return data
