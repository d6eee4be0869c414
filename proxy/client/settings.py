"""How an upload is tuned and where it goes: one retry policy, one settings value, one options.

* :class:`RetryPolicy` is the only place that decides how long to wait before trying again,
  for reconnects and for a ``Complete`` alike (capped exponential backoff with full jitter).
* :class:`ClientSettings` tunes the transfer (connections, frame size, timeouts).
* :class:`UploadOptions` is everything an entry point needs besides the data and the
  destination: the proxy, credentials, object properties, settings, hooks. Every entry point
  (:func:`~proxy.client.connect_upload`, :func:`~proxy.client.upload_file`, ...) takes one.

All three are frozen: change one with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from protocol import HARD_MAX_FRAME_SIZE
from proxy.client.names import ProxyTarget

if TYPE_CHECKING:
    from proxy.client.results import UploadProgress

__all__ = [
    "ClientSettings",
    "Connector",
    "KiB",
    "MiB",
    "RetryPolicy",
    "UploadOptions",
    "default_connector",
]

KiB: Final = 1024
MiB: Final = 1024 * KiB

#: Opens one byte stream to the proxy at ``(host, port)``: lets callers add TLS, faults or
#: another transport. The default opens TCP (and TLS when :attr:`UploadOptions.tls` is set).
Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]


def default_connector(tls: ssl.SSLContext | None) -> Connector:
    """Plain TCP, or TLS over it when ``tls`` is given (the server's name is checked)."""

    async def connect(host: str, port: int) -> trio.abc.Stream:
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if tls is None:
            return stream
        ssl_stream = trio.SSLStream(stream, tls, server_hostname=host)
        try:
            await ssl_stream.do_handshake()
        except BaseException:  # refused, broken or cancelled: the socket must not leak
            await trio.aclose_forcefully(stream)
            raise
        return ssl_stream

    return connect


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again, and when to stop: bounded by time, not by a count of attempts.

    Retries go on while less than ``deadline`` seconds have passed since the upload last made
    progress (bytes newly acknowledged or committed, the upload opened, every byte sent);
    google-cloud-storage's default deadline is the same 120 s. Between attempts a slot waits
    a random time up to ``initial_delay * multiplier ** (attempt - 1)``, capped at
    ``max_delay`` (exponential backoff with full jitter), so reconnecting clients spread out.
    """

    deadline: float = 120.0
    initial_delay: float = 0.1
    max_delay: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.deadline < 0 or self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError(
                "deadline and initial_delay must not be negative, nor max_delay below initial_delay"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``attempt`` (1 for the first retry)."""
        ceiling = self.initial_delay * self.multiplier ** max(0, attempt - 1)
        return rng.uniform(0.0, min(self.max_delay, ceiling))

    def expired(self, since_progress: float) -> bool:
        """Whether ``since_progress`` seconds without progress is too long to go on trying."""
        return since_progress >= self.deadline


@dataclass(frozen=True)
class ClientSettings:
    """Tuning for one upload. The defaults suit a LAN or loopback proxy."""

    connections: int = 4
    #: payload bytes per WriteAt frame; capped by what the proxy's Welcome allows
    frame_size: int = 4 * MiB
    #: an object up to this size (or ``frame_size``, if larger) goes as one PutObject when
    #: the proxy agrees a frame that large (rup serve's default does); larger ones are
    #: streamed in WriteAt frames of ``frame_size``
    put_object_limit: int = 8 * MiB
    #: WriteAt frames sent on one connection before waiting for an Ack
    frames_in_flight: int = 4
    connect_timeout: float = 10.0
    #: while a reply is due, this long without a byte from the proxy means the link stalled
    reply_timeout: float = 30.0
    #: Complete waits for GCS to commit the tail, so it gets longer
    complete_timeout: float = 300.0
    #: a stream keeps at most this many bytes that the proxy has not committed yet
    stream_buffer: int = 64 * MiB
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @property
    def offered_frame_size(self) -> int:
        """The frame size a Hello offers: room for a WriteAt frame and for a PutObject."""
        return min(max(self.frame_size, self.put_object_limit), HARD_MAX_FRAME_SIZE)

    def __post_init__(self) -> None:
        if self.connections < 1:
            raise ValueError(f"connections must be at least 1, got {self.connections}")
        if self.frame_size < 1 or self.frames_in_flight < 1:
            raise ValueError("frame_size and frames_in_flight must be positive")
        if self.put_object_limit < 0:
            raise ValueError(f"put_object_limit must not be negative, got {self.put_object_limit}")
        if self.stream_buffer < self.frame_size:
            raise ValueError("stream_buffer must hold at least one frame")


@dataclass(frozen=True)
class UploadOptions:
    """Where and how to upload: everything an entry point takes besides the data and the URL.

    ``proxy`` is ``"HOST:PORT"``, ``(host, port)``, several of those (``"A:1,B:2"`` or a
    list): the slots fail over from one to the next when one cannot be reached.
    ``connector`` replaces the plain TCP (or, with ``tls``, TLS) connection, e.g. with a
    fault-injecting stream. ``expected_size``
    is filled in by :func:`~proxy.client.upload_file` from the file. ``progress`` is called
    from the upload's tasks with a snapshot whenever something changes; keep it quick.
    """

    proxy: ProxyTarget
    auth: str = field(default="", repr=False)
    tls: ssl.SSLContext | None = None
    connector: Connector | None = None
    settings: ClientSettings = field(default_factory=ClientSettings)
    content_type: str = "application/octet-stream"
    metadata: Mapping[str, str] = field(default_factory=dict)
    if_generation_match: int | None = None
    expected_size: int | None = None
    progress: Callable[[UploadProgress], None] | None = None
    #: ask the proxy for one resumable session whatever the size (protocol version 3): never
    #: a composite upload, so the object gets an MD5; a proxy may otherwise store a large
    #: upload as segments uploaded in parallel and composed (protocol section 14)
    single_session: bool = False
    #: resume the upload this token belongs to (:attr:`Upload.token` of an earlier run); if
    #: the proxy cannot resume it, a new upload is opened and every byte is sent
    token: bytes | None = field(default=None, repr=False)
