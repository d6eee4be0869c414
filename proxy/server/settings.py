"""Server settings: every limit and timeout of ``rup serve`` in one frozen value.

A :class:`ServerSettings` is built once (by ``rup serve`` from its flags, or by a test) and
never changes while the server runs. Secrets it carries (bearer tokens, the token key) are
excluded from its ``repr`` so that printing the settings never leaks them.
"""

from __future__ import annotations

import enum
import os
import ssl
from dataclasses import dataclass, field

from protocol import SEGMENT_QUANTUM
from reliablewriter import DEFAULT_TEMP_PREFIX, CompositeSettings, WriterSettings

__all__ = [
    "CompositeMode",
    "CompositePolicy",
    "KiB",
    "MiB",
    "ServerSettings",
    "SettingsError",
]

KiB = 1024
MiB = 1024 * KiB

#: the writer uploads in multiples of this, so no upload window may be smaller
_GCS_CHUNK_ALIGNMENT = 256 * KiB


class SettingsError(ValueError):
    """A combination of settings that cannot work."""


class CompositeMode(enum.Enum):
    """When an upload is made composite (``rup serve --composite``)."""

    ALWAYS = "always"
    """Every upload of known size whose client speaks version 3 and did not ask otherwise."""
    AUTO = "auto"
    """Those of them whose declared size reaches the threshold."""
    NEVER = "never"
    """None: one resumable session per upload."""


@dataclass(frozen=True)
class CompositePolicy:
    """Which uploads are composite, and how they are cut (docs/protocol.md section 14).

    Segments are ``segment_size`` bytes (a multiple of 256 KiB), stored as temporary objects
    under ``temp_prefix``; ``parallel_segments`` is what the server tells clients it serves
    best at once. A client sees its uploads made composite only if it speaks version 3.
    """

    mode: CompositeMode = CompositeMode.AUTO
    #: like gcloud's parallel composite upload threshold
    threshold: int = 150 * MiB
    segment_size: int = 64 * MiB
    parallel_segments: int = 4
    temp_prefix: str = DEFAULT_TEMP_PREFIX
    #: how often the server sweeps the buckets it stored segments in for the temporaries
    #: of uploads idle for longer than the token lifetime
    sweep_interval: float = 3600.0

    def __post_init__(self) -> None:
        if self.sweep_interval <= 0:
            raise SettingsError("the sweep interval must be positive")
        if self.threshold < 0:
            raise SettingsError("the composite threshold must not be negative")
        # What the writer needs of a cut (reliablewriter checks it), then what the wire
        # can say: segments in the protocol's quantum, K in COMPOSITE_OPENED's u16.
        try:
            self.cut_for(WriterSettings())
        except ValueError as exc:
            raise SettingsError(f"composite uploads: {exc}") from None
        if self.segment_size % SEGMENT_QUANTUM:
            raise SettingsError(f"segment size must be a multiple of {SEGMENT_QUANTUM // KiB} KiB")
        if self.parallel_segments > 0xFFFF:
            raise SettingsError("parallel segments must be at most 65535")

    def cut_for(self, writer: WriterSettings, segment_size: int | None = None) -> CompositeSettings:
        """This policy as the writer's settings for one composite upload (``segment_size``:
        the one its token recorded, if the policy has changed since)."""
        return CompositeSettings(
            segment_size=self.segment_size if segment_size is None else segment_size,
            parallel_segments=self.parallel_segments,
            temp_prefix=self.temp_prefix,
            writer=writer,
        )

    def applies_to(self, expected_size: int | None, *, single_session: bool) -> bool:
        """Whether an upload of ``expected_size`` bytes is made composite."""
        if single_session or expected_size is None or self.mode is CompositeMode.NEVER:
            return False
        return self.mode is CompositeMode.ALWAYS or expected_size >= self.threshold

    def reserves(self, name: str) -> bool:
        """Whether ``name`` lies in the temporary namespace, which no client may write."""
        return name.startswith(self.temp_prefix)


@dataclass(frozen=True)
class ServerSettings:
    """How a proxy server listens, authenticates, and limits its clients.

    Buffers: every upload gets a window ahead of its committed offset, paid for (payload and
    per-piece overhead) from the shared ``total_buffer_limit``, of which one client may hold
    ``client_buffer_share``. It starts at ``min_upload_window`` and doubles, up to
    ``upload_buffer_limit``, as the client fills it (see :mod:`proxy.server.budget`). When
    the budget cannot pay for ``min_upload_window``, a new upload waits up to
    ``budget_wait`` for windows to come back, then is refused with a retryable TOO_BUSY.
    Existing uploads never need more than they hold, so no client can deadlock another.
    """

    host: str = "127.0.0.1"
    port: int = 0
    server_name: str = "rup"

    #: bearer tokens a client may present in its Hello; empty means no authentication
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    #: 32-byte AES-GCM key for upload tokens; instances sharing it can resume each other's uploads
    token_key: bytes = field(default_factory=lambda: os.urandom(32), repr=False)
    #: how long an upload token stays valid after the upload was opened
    token_lifetime: float = 7 * 24 * 3600.0
    #: TLS for the client leg; ``None`` serves plain TCP
    tls: ssl.SSLContext | None = field(default=None, repr=False)

    #: the largest data of one WRITE_AT or PUT_OBJECT a client may send (the Welcome agrees
    #: the smaller of this and the client's); 8 MiB lets every object a one-request upload
    #: would store come as one PUT_OBJECT, paid from the budget before it is read
    max_frame_size: int = 8 * MiB
    upload_buffer_limit: int = 32 * MiB
    min_upload_window: int = 1 * MiB
    total_buffer_limit: int = 1024 * MiB
    #: uploads one client may hold open (counted per bearer token when auth is on, else per IP)
    max_uploads_per_client: int = 256
    max_connections_per_client: int = 256
    #: the fraction of ``total_buffer_limit`` one client (bearer token, or IP without auth)
    #: may hold, so that no client can take the budget the others need
    client_buffer_share: float = 0.5
    #: connections open at once, whoever they are from; more are refused at accept
    max_connections: int = 1024
    #: connections that have not completed their Hello yet; at the cap, the one that has
    #: waited longest is dropped (TOO_MANY_CONNECTIONS) to make room for a new one
    max_preauth_connections: int = 128
    #: bytes a connection may send before its Hello is accepted (a Hello is far smaller);
    #: so a crowd of half-sent Hellos costs at most this much each
    preauth_read_limit: int = 8 * KiB

    #: a connection that completes no handshake (TLS and Hello) within this is dropped
    handshake_timeout: float = 10.0
    #: a connection with nothing outstanding that sends nothing for this long is closed
    idle_timeout: float = 120.0
    #: an upload with no connection and no activity for this long is released (GCS session kept)
    upload_idle_timeout: float = 300.0
    #: how long a Complete waits for missing bytes still on their way (frames in flight on
    #: other connections) before it is answered with the missing ranges (INCOMPLETE, or
    #: MISSING_RANGES to a version-1 client); 0 answers at once
    complete_timeout: float = 1.0
    #: how long a new upload waits for buffer budget to come back before TOO_BUSY
    budget_wait: float = 30.0
    #: how long a completed upload remembers its result, for repeated Complete requests
    result_retention: float = 600.0
    #: on shutdown, how long in-flight frames get to finish after GoingAway went out
    shutdown_grace: float = 5.0
    #: on shutdown, how long uploads get to finish the GCS requests they have in flight
    drain_timeout: float = 10.0
    #: how long an upload nobody is attached to keeps its GCS session before it is cancelled
    #: (well inside GCS's 7-day session life); its token cannot resume it after that
    resume_window: float = 3600.0

    #: when not empty, only these buckets may be written
    allowed_buckets: tuple[str, ...] = ()
    #: when not empty, object names must start with one of these
    allowed_prefixes: tuple[str, ...] = ()

    #: an upload declared at the open to be at most this size is stored by one request at
    #: COMPLETE, with no resumable session (gcloud's single-request threshold); 0: never
    one_request_limit: int = 8 * MiB

    #: which uploads are composite (segments composed at the end), and how they are cut
    composite: CompositePolicy = field(default_factory=CompositePolicy)

    #: template for each upload's writer; the server sets its buffer limit per upload
    writer: WriterSettings = field(default_factory=WriterSettings)

    def __post_init__(self) -> None:
        if len(self.token_key) != 32:
            raise SettingsError("token_key must be exactly 32 bytes (AES-256-GCM)")
        if self.min_upload_window < _GCS_CHUNK_ALIGNMENT:
            raise SettingsError(f"min_upload_window must be at least {_GCS_CHUNK_ALIGNMENT} bytes")
        if self.upload_buffer_limit < self.min_upload_window:
            raise SettingsError("upload_buffer_limit must be at least min_upload_window")
        if self.total_buffer_limit < self.upload_buffer_limit:
            raise SettingsError("total_buffer_limit must be at least upload_buffer_limit")
        if not 0 < self.client_buffer_share <= 1:
            raise SettingsError("client_buffer_share must be above 0 and at most 1")
        for name in ("max_connections", "max_preauth_connections", "preauth_read_limit"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1")
        if self.complete_timeout < 0:
            raise SettingsError("complete_timeout must not be negative")
        for name in ("handshake_timeout", "idle_timeout", "upload_idle_timeout", "resume_window"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        if self.one_request_limit < 0:
            raise SettingsError("one_request_limit must not be negative")
        if self.drain_timeout < 0:
            raise SettingsError("drain_timeout must not be negative")

    @property
    def client_buffer_limit(self) -> int:
        """The most of the buffer budget one client may hold."""
        return int(self.total_buffer_limit * self.client_buffer_share)

    def allows(self, bucket: str, name: str) -> bool:
        """Whether the allow-lists permit writing ``name`` into ``bucket``; never a name in
        the temporary namespace of composite uploads, which only the server writes."""
        if self.allowed_buckets and bucket not in self.allowed_buckets:
            return False
        if self.composite.reserves(name):
            return False
        return not self.allowed_prefixes or name.startswith(self.allowed_prefixes)
