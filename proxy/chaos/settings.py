"""What one chaos run does: :class:`ChaosSettings`, from which everything else follows.

The same settings drive both kinds of run: in one process (:mod:`proxy.chaos.run`) and,
with ``process_faults``, with the proxy, the GCS endpoint and every client as processes
of their own (:mod:`proxy.chaos.process_run`). The settings become the proxy's
(:meth:`ChaosSettings.server_settings`, or :meth:`ChaosSettings.serve_arguments` for
``rup serve``) and the clients' (:meth:`ChaosSettings.client_settings`).
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass
from typing import Final

from proxy.chaos.workload import FAULT_MIXES, ChunkGeometry, UploadSpec, plan_uploads
from proxy.client import ClientSettings
from proxy.client import RetryPolicy as ClientRetryPolicy
from proxy.server.settings import CompositeMode, CompositePolicy, ServerSettings
from reliablewriter import MiB, RetryPolicy, WriterSettings

__all__ = ["BUCKET", "ORPHAN_TIMEOUT", "ChaosSettings"]

#: where every chaos upload goes
BUCKET: Final = "rup-chaos"
#: how long the proxy keeps an upload that has no connection and sees no activity
ORPHAN_TIMEOUT: Final = 8.0
#: the longest --max-down: a client must outlast it, and uploads have deadlines
_MAX_DOWN_LIMIT: Final = 60.0
#: how long a rerun ``rup upload`` may take to start and re-attach
_CLIENT_START_ALLOWANCE: Final = 10.0
#: on top of every documented delay, for processes on a busy machine
_SETTLE_SLACK: Final = 10.0


@dataclass(frozen=True)
class ChaosSettings:
    """One chaos run; the defaults are ``rup chaos`` with no options."""

    uploads: int = 200
    seed: int = 1
    max_size: int = 64 * MiB
    connections: int = 4
    concurrency: int = 8
    faults: str = "moderate"
    intensity: float = 1.0
    #: seconds an upload may take before it counts as hung
    deadline: float = 120.0
    #: share of uploads that use ifGenerationMatch
    precondition_share: float = 0.1
    gcs_endpoint: str | None = None
    #: script only the GCS faults storage-testbench knows too (it refuses rup's own)
    portable_faults: bool = False
    #: upload indexes to run (replaying a failure); empty runs them all
    only: tuple[int, ...] = ()
    geometry: ChunkGeometry = dataclasses.field(default_factory=ChunkGeometry)
    #: run the proxy, the GCS endpoint and every client as processes, and kill them
    process_faults: bool = False
    #: with process_faults: the mean time between two process faults, in seconds
    process_fault_interval: float = 4.0
    #: with process_faults: the longest a killed process stays down, in seconds
    max_down: float = 10.0
    #: share of uploads stored as composite uploads (``--composite``: all of them); the
    #: proxy makes every upload composite unless its client asks for one session
    composite_share: float = 0.25
    #: share of the uploads that fit one PUT_OBJECT and use no precondition sent as one
    one_request_share: float = 0.25
    #: share of the streamed uploads whose frames are ``geometry.large_frame``
    large_frame_share: float = 0.25

    def __post_init__(self) -> None:
        if self.faults not in FAULT_MIXES:
            raise ValueError(f"unknown fault mix {self.faults!r}; known: {', '.join(FAULT_MIXES)}")
        if self.uploads < 1 or self.connections < 1 or self.concurrency < 1:
            raise ValueError("--uploads, --connections and --concurrency must be at least 1")
        if not self.intensity >= 0 or not math.isfinite(self.intensity):
            raise ValueError(f"--intensity must be a finite number >= 0, got {self.intensity}")
        if self.deadline <= 0:
            raise ValueError("--deadline must be positive")
        if self.max_size < 0:
            raise ValueError("--max-size must not be negative")
        if not 0 <= self.precondition_share <= 1:
            raise ValueError("--generation-match must be a share within 0..1")
        if not self.process_fault_interval > 0:
            raise ValueError("--process-fault-interval must be positive")
        if not 0 <= self.max_down <= _MAX_DOWN_LIMIT:
            raise ValueError(f"--max-down must be within 0..{_MAX_DOWN_LIMIT:.0f} seconds")
        if not 0 <= self.composite_share <= 1:
            raise ValueError("--composite-share must be a share within 0..1")
        if not 0 <= self.one_request_share <= 1:
            raise ValueError("--one-request-share must be a share within 0..1")
        if not 0 <= self.large_frame_share <= 1:
            raise ValueError("--large-frame-share must be a share within 0..1")
        if self.process_faults and self.gcs_endpoint is not None:
            raise ValueError("--process-faults runs its own GCS endpoint: drop --gcs-endpoint")

    def replay_command(self, only: tuple[int, ...] = ()) -> str:
        """The ``rup chaos`` command that reruns this run, or just the uploads in ``only``."""
        words = [
            "rup", "chaos",
            "--uploads", str(self.uploads),
            "--seed", str(self.seed),
            "--max-size", str(self.max_size),
            "--connections", str(self.connections),
            "--concurrency", str(self.concurrency),
            "--faults", self.faults,
            "--intensity", repr(self.intensity),
            "--deadline", repr(self.deadline),
            "--generation-match", repr(self.precondition_share),
            "--composite-share", repr(self.composite_share),
            "--one-request-share", repr(self.one_request_share),
            "--large-frame-share", repr(self.large_frame_share),
        ]  # fmt: skip
        if self.gcs_endpoint is not None:
            words += ["--gcs-endpoint", self.gcs_endpoint]
        if self.portable_faults:
            words.append("--portable-faults")
        if self.process_faults:
            words += [
                "--process-faults",
                "--process-fault-interval", repr(self.process_fault_interval),
                "--max-down", repr(self.max_down),
            ]  # fmt: skip
        if only or self.only:
            words += ["--only", ",".join(map(str, only or self.only))]
        return shlex.join(words)

    def as_dict(self) -> dict[str, object]:
        """The settings as the JSON report shows them."""
        return {
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "geometry"},
            "geometry": dataclasses.asdict(self.geometry),
        }

    def uploads_to_run(self) -> list[UploadSpec]:
        """The run's uploads (only those of ``only``, when given)."""
        mix = FAULT_MIXES[self.faults]
        if self.portable_faults:
            mix = mix.portable()
        specs = plan_uploads(
            uploads=self.uploads,
            seed=self.seed,
            max_size=self.max_size,
            connections=self.connections,
            mix=mix,
            intensity=self.intensity,
            geometry=self.geometry,
            precondition_share=self.precondition_share,
            composite_share=self.composite_share,
            one_request_share=self.one_request_share,
            large_frame_share=self.large_frame_share,
        )
        return [spec for spec in specs if not self.only or spec.index in self.only]

    def server_settings(self) -> ServerSettings:
        g = self.geometry
        return ServerSettings(
            max_frame_size=max(g.frame, g.put_object),
            upload_buffer_limit=g.window,
            min_upload_window=g.min_chunk,
            total_buffer_limit=max(64 * MiB, 2 * self.concurrency * g.window),
            handshake_timeout=10.0,
            idle_timeout=60.0,
            # An upload whose UploadOpened reply a fault swallowed is an orphan: its client
            # opened another. This is how long the proxy keeps orphans before releasing them.
            upload_idle_timeout=ORPHAN_TIMEOUT,
            complete_timeout=60.0,
            # finished uploads are judged at once; nobody asks the proxy again
            result_retention=1.0,
            shutdown_grace=2.0,
            one_request_limit=g.one_request,
            composite=self.composite_policy(),
            writer=WriterSettings(
                min_chunk_size=g.min_chunk,
                max_chunk_size=g.max_chunk,
                buffer_limit=g.window,
                retry=RetryPolicy(
                    max_attempts=12, deadline=60.0, initial_delay=0.02, max_delay=1.0
                ),
                connect_timeout=5.0,
                # a stalled GCS connection must be noticed well within the upload's deadline
                progress_timeout=3.0,
            ),
        )

    def composite_policy(self) -> CompositePolicy:
        """Every upload of known size is composite, unless its client asks for one session
        (which the run's other uploads do); segments are :attr:`ChunkGeometry.segment`."""
        return CompositePolicy(mode=CompositeMode.ALWAYS, segment_size=self.geometry.segment)

    @property
    def resume_window(self) -> float:
        """How long the proxy keeps an unattached upload's GCS session: longer than a
        killed client stays down, so its rerun can resume."""
        return ORPHAN_TIMEOUT + self.max_down + _CLIENT_START_ALLOWANCE

    @property
    def session_ttl(self) -> float:
        """How long the GCS endpoint of a process-fault run keeps a resumable session.

        Longer than any upload may take (past its deadline it is judged hung), and it is
        the only thing that can clear a session whose token never reached a client (the
        proxy killed between opening the session and replying): a run waits for it before
        it calls what is left on disk a leak.
        """
        return self.deadline + _CLIENT_START_ALLOWANCE

    @property
    def settle_time(self) -> float:
        """How long a process-fault run may take to let go of everything after its last
        upload: an unattached upload keeps its session for the resume window, and a session
        no proxy knows of any more lasts until the endpoint's TTL, which it checks every
        quarter of the TTL (at most every minute)."""
        ttl_swept = self.session_ttl + min(self.session_ttl / 4, 60.0)
        return max(self.resume_window, ttl_swept) + _SETTLE_SLACK

    def serve_arguments(self) -> list[str]:
        """The ``rup serve`` options of a process-fault run's proxy: what the command line
        can say of :meth:`server_settings` (its writer keeps ``rup serve``'s defaults)."""
        g = self.geometry
        total = max(64 * MiB, 2 * self.concurrency * g.window)
        return [
            "--max-frame-mib", f"{g.frame / MiB:g}",
            "--upload-buffer-mib", f"{g.window / MiB:g}",
            "--min-window-mib", f"{g.min_chunk / MiB:g}",
            "--total-buffer-mib", f"{total / MiB:g}",
            "--handshake-timeout", "10",
            "--idle-timeout", "60",
            "--upload-idle-timeout", f"{ORPHAN_TIMEOUT:g}",
            "--complete-timeout", "60",
            "--drain-timeout", "5",
            "--resume-window", f"{self.resume_window:g}",
            "--one-request-limit-mib", f"{g.one_request / MiB:g}",
            "--composite", self.composite_policy().mode.value,
            "--segment-size-mib", f"{self.composite_policy().segment_size / MiB:g}",
        ]  # fmt: skip

    def client_settings(self, spec: UploadSpec) -> ClientSettings:
        return ClientSettings(
            connections=spec.connections,
            frame_size=self.geometry.frame_for(spec),
            put_object_limit=self.geometry.put_object,
            connect_timeout=5.0,
            # a stalled client connection must be noticed well within the upload's deadline
            reply_timeout=4.0,
            complete_timeout=self.deadline,
            stream_buffer=2 * self.geometry.window,
            retry=ClientRetryPolicy(deadline=20.0, initial_delay=0.02, max_delay=0.5),
        )
