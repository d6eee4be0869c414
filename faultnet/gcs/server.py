"""``GcsServer``: the strict GCS endpoint, served from background threads.

The server is synchronous and threaded on purpose: trio code and blocking code (requests,
google-cloud-storage) can both talk to it from the same process, and it never runs on
anyone's event loop. One thread accepts; each connection gets its own thread, so a client
that stalls mid-body holds up nobody else. :meth:`GcsServer.stop` shuts every socket down,
wakes every scripted stall, and joins every thread it started.

**Access.** With ``access_token`` set, every request must carry ``Authorization: Bearer
<token>``; anything else is answered 401 before it is routed, so an unauthenticated
caller learns nothing, not even which buckets exist. That includes requests on a
resumable session's URI. On real GCS the session URI is itself a bearer capability
(whoever holds it may upload, without credentials); here holding the URI is not enough:
the holder must also carry the token. The reason is this endpoint's use: embedded in
``rup serve``, its session URIs travel inside upload tokens and reach places (clients,
other proxies) that should not gain write access to the store by holding one. Clients
that talk to the endpoint with credentials (google-cloud-storage with a static-token
credentials object, google-resumable-media through an authorized session) send the
bearer on every request anyway, session URIs included. The token is compared in constant
time and never logged. Without ``access_token`` the endpoint is open, as storage-testbench
is; that is for tests and for loopback use by one user.

What requests mean lives in :mod:`faultnet.gcs.api`; this module only moves bytes and
turns failures into responses: a :class:`~faultnet.gcs.errors.GcsApiError` becomes its
JSON error, a malformed request its 4xx, and any other exception a 500 - the server
itself keeps going. The log line for such a 500 names the exception's type and where it
was raised, never its text (which may hold a file path or a request's secrets).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import os
import re
import socket
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Self

from faultnet.gcs.api import Exchange, GcsApi, Reply
from faultnet.gcs.errors import GcsApiError, error_body
from faultnet.gcs.http11 import HttpConnection, PeerGoneError, ProtocolError, Request, Response
from faultnet.gcs.resumable import UPLOAD_QUANTUM
from faultnet.gcs.retry_test import RetryTests
from faultnet.gcs.store import DEFAULT_SESSION_TTL, Store

__all__ = ["GcsServer"]

logger = logging.getLogger("faultnet.gcs")

_TOKEN_SYNTAX = re.compile(r"[\x21-\x7e]{1,4096}")
#: an unauthorized request's body is read (to keep the connection) only up to this size
_DISCARD_AT_MOST = 64 * 1024


class GcsServer:
    """A GCS JSON API endpoint on ``host:port`` (0: any free port), in memory or on disk.

    ``chunk_persist_granularity``: how much of a chunk cut off partway is kept (its
    prefix up to a multiple of this; 0 keeps nothing). ``sleep`` is how scripted stalls
    wait; tests pass their own to control them. The default wakes early on :meth:`stop`.
    ``compute_md5=False`` saves most of the CPU ingest costs, for benchmarks on small
    machines; objects then have no ``md5Hash``. ``access_token``: a secret every request
    must carry as ``Authorization: Bearer <token>`` (see the module's docstring).
    ``session_ttl``: seconds after its start when a resumable session is forgotten and its
    files deleted, whether abandoned or finished (default: a week, as on GCS); checked at
    start and then every quarter of it (at most every minute).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        chunk_persist_granularity: int = UPLOAD_QUANTUM,
        *,
        max_body_bytes: int = 1 << 31,
        max_head_bytes: int = 64 * 1024,
        idle_timeout: float = 300.0,
        sleep: Callable[[float], None] | None = None,
        compute_md5: bool = True,
        access_token: str | None = None,
        session_ttl: float = DEFAULT_SESSION_TTL,
    ) -> None:
        if chunk_persist_granularity < 0:
            raise ValueError("chunk_persist_granularity must be >= 0")
        if access_token is not None and not _TOKEN_SYNTAX.fullmatch(access_token):
            # Said without the token: it is a secret, and this may end up in a log.
            raise ValueError("access_token must be 1 to 4096 visible ASCII characters")
        self._expected_authorization = (
            None if access_token is None else f"Bearer {access_token}".encode()
        )
        self.store = Store(data_dir, compute_md5=compute_md5, session_ttl=session_ttl)
        # Often enough that a session outlives its TTL by a quarter of it at most.
        self._sweep_interval = min(max(session_ttl / 4, 0.05), 60.0)
        self.retry_tests = RetryTests()
        self._stopping = threading.Event()
        self.api = GcsApi(
            self.store,
            self.retry_tests,
            sleep=sleep or self._interruptible_sleep,
            persist_granularity=chunk_persist_granularity,
        )
        self._requested = (host, port)
        self._max_body_bytes = max_body_bytes
        self._max_head_bytes = max_head_bytes
        self._idle_timeout = idle_timeout
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("GcsServer is not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> None:
        if self._listener is not None:
            raise RuntimeError("GcsServer already started")
        self._stopping.clear()
        listener = socket.create_server(self._requested, backlog=512)
        self._listener = listener
        self._spawn(lambda: self._accept_loop(listener), name="gcs-accept")
        self._spawn(self._sweep_loop, name="gcs-sweep")

    def stop(self) -> None:
        """Close the listener and every connection, wake stalls, and join all threads."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        while True:
            with self._lock:
                threads = [t for t in self._threads if t is not threading.current_thread()]
            if not threads:
                break
            for thread in threads:
                thread.join()
        self.store.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def create_retry_test(
        self, instructions: Mapping[str, Sequence[str]], transport: str = "HTTP"
    ) -> str:
        """Register scripted faults (see :mod:`faultnet.gcs.retry_test`); returns the id."""
        test_id: str = self.retry_tests.create(instructions, transport)["id"]
        return test_id

    def _interruptible_sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _spawn(self, target: Callable[[], None], *, name: str) -> None:
        def run() -> None:
            try:
                target()
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=name, daemon=True)
        # Started under the lock, so stop() never sees (and joins) a thread not yet started.
        with self._lock:
            self._threads.add(thread)
            thread.start()

    # -- connections --------------------------------------------------------------------

    def _sweep_loop(self) -> None:
        """Expire old sessions until :meth:`stop` (the store also does so when it loads)."""
        while not self._stopping.wait(self._sweep_interval):
            try:
                self.store.expire_sessions()
            except Exception as exc:  # a sweep that fails is retried by the next one
                logger.error("session sweep failed: %s", _describe(exc))  # noqa: TRY400

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                logger.exception("accept failed; the listener goes on")
                self._stopping.wait(0.1)  # e.g. out of file descriptors: do not spin
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self._idle_timeout)
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                self._sockets.add(sock)
            self._spawn(functools.partial(self._serve, sock), name=f"gcs-conn-{peer[1]}")

    def _serve(self, sock: socket.socket) -> None:
        connection = HttpConnection(
            sock, max_head_bytes=self._max_head_bytes, max_body_bytes=self._max_body_bytes
        )
        try:
            while connection.usable and not self._stopping.is_set():
                if not self._serve_one(connection):
                    break
        except PeerGoneError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(sock)
            connection.close()

    def _serve_one(self, connection: HttpConnection) -> bool:
        """Serve one request; False once the connection is done."""
        try:
            request = connection.read_request()
        except ProtocolError as exc:
            message = str(exc)
            connection.send_response(
                Response(exc.status, error_body(exc.status, message, "invalid")),
                keep_alive=False,
            )
            return False
        if request is None:
            return False
        if not self._authorized(request):
            return self._refuse_unauthorized(connection, request)
        host = request.header("host")
        base_url = f"http://{host}" if host else self.url
        method, handler = self.api.route(request)
        test_id = request.header("x-retry-test-id")
        try:
            instruction = self.retry_tests.peek(test_id, method) if method else None
            exchange = Exchange(
                request, connection, base_url, method, test_id, instruction, self.retry_tests
            )
            reply = self.api.handle(exchange, handler)
        except GcsApiError as exc:
            reply = Reply(Response(exc.status, error_body(exc.status, exc.message, exc.reason)))
        except ProtocolError as exc:
            reply = Reply(Response(exc.status, error_body(exc.status, str(exc), "invalid")))
            connection.close_after_response()  # framing lost: the next request is unfindable
        except PeerGoneError:
            raise
        except Exception as exc:
            logger.error(  # noqa: TRY400 - the exception's text may hold secrets: _describe
                "handler for %s (%s) failed: %s\n%s",
                method or "request",
                request.method,
                _describe(exc),
                "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
            )
            reply = Reply(Response(500, error_body(500, "Internal error", "backendError")))
        return self._deliver(connection, request.keep_alive, reply)

    def _authorized(self, request: Request) -> bool:
        expected = self._expected_authorization
        if expected is None:
            return True
        given = request.header("authorization")
        if given is None:
            return False
        scheme, _, credential = given.strip().partition(" ")
        presented = f"Bearer {credential.strip()}".encode("latin-1", "replace")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented, expected)

    def _refuse_unauthorized(self, connection: HttpConnection, request: Request) -> bool:
        """Answer 401 without reading more than a small body (nobody pays for a stranger's)."""
        declared = connection.declared_body_length()
        if declared is not None and declared <= _DISCARD_AT_MOST:
            connection.discard_body()  # so the connection can go on to the next request
        if request.header("authorization") is None:
            message, reason = "no bearer token sent", "required"
        else:
            message, reason = "bearer token not accepted", "authError"
        response = Response(
            401, error_body(401, message, reason), (("WWW-Authenticate", 'Bearer realm="rup"'),)
        )
        return self._deliver(connection, request.keep_alive, Reply(response))

    def _deliver(self, connection: HttpConnection, keep_alive: bool, reply: Reply) -> bool:
        if reply.reset:
            connection.reset()
            return False
        if not connection.usable:
            return False  # the body was cut off: there is nobody to answer
        pause = None
        if reply.pause_at is not None:
            seconds = reply.pause_seconds

            def pause() -> None:
                self.api.sleep(seconds)

        connection.send_response(
            reply.response,
            keep_alive=keep_alive,
            cut_after=reply.cut_after,
            pause_at=reply.pause_at,
            pause=pause,
        )
        return connection.usable


def _describe(exc: BaseException) -> str:
    """What went wrong, without the values an exception carries.

    An exception's text can hold a path under the data directory, a request's header, or
    an upload id; none of those may reach a log. So the log gets the exception's type (and
    an OS error's errno and meaning), and the traceback's frames without their values.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__} (errno {exc.errno}: {os.strerror(exc.errno)})"
    return type(exc).__name__
