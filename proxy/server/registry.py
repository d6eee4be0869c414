"""Every upload this process holds, and the budget and limits they share.

The registry opens uploads (a new GCS session and a token) and attaches to them (by token,
taking the upload over from GCS when this process does not hold it). Upload tasks run in
the nursery given at construction (the server's), so they outlive the connections that
start them; a finished upload's outcome stays findable for ``result_retention``.

Tokens are safe to replay. An open reads the object's live generation (one metadata
request, so a doomed ``if_generation_match`` fails before any byte is sent) and pins it in
the token: every GCS session the token can ever start carries that precondition, so once
the upload completed (or anything else wrote the object) GCS itself refuses to write it
again. An attach whose session GCS no longer knows (aborted, expired, finished and
forgotten) is UPLOAD_FINISHED, never a silent new session; the session URI is rebuilt from
this proxy's endpoint, never taken from the token. An upload released for idleness keeps
its session for ``resume_window``, then it is cancelled (:mod:`proxy.server.dormant`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
from collections import Counter as TallyCounter
from collections.abc import Callable
from dataclasses import dataclass

import requests
import trio
from google.api_core import exceptions as api_exceptions

from protocol import MAX_TOKEN_SIZE, ErrorCode
from proxy.server.backend import Backend, SessionReferenceError
from proxy.server.budget import BufferBudget, UploadWindow
from proxy.server.composites import CompositeUploads
from proxy.server.dormant import DormantSessions
from proxy.server.errors import ServerError, quote
from proxy.server.logging import get_logger, log_event
from proxy.server.metrics import ServerMetrics, timed_poster
from proxy.server.settings import ServerSettings
from proxy.server.tokens import BadTokenError, TokenCodec, UploadTicket
from proxy.server.uploads import OpenRequest, Upload, UploadState, first_window, largest_window
from proxy.server.whole_objects import WholeObjects
from reliablewriter.http_posts import WholeObjectPoster

__all__ = ["CompositeTokenError", "UploadRegistry"]

logger = get_logger(__name__)

#: room kept in the token-size check for the GCS session reference, which is not known
#: until the session exists (GCS's upload ids are about 150 characters)
_SESSION_REF_ALLOWANCE = 512

#: an open that waited this long for its window is logged (``budget-waited``)
_NOTABLE_BUDGET_WAIT = 1.0


class CompositeTokenError(ServerError):
    """An attach with a composite upload's token: there is no upload to bind. A version-3
    connection answers COMPOSITE_OPENED instead; an older one hears this refusal."""

    def __init__(self) -> None:
        super().__init__(
            ErrorCode.INVALID_REQUEST,
            "that is a composite upload's token: open its segments (OPEN_SEGMENT), then"
            " COMPOSE or DISCARD it",
        )


@dataclass(frozen=True)
class _Claim:
    """What a running upload holds here: its window and one of its client's upload slots."""

    window: UploadWindow
    client: str


class UploadRegistry:
    """Every upload this process holds, and the budget and limits they share.

    Upload tasks run in the nursery given at construction (the server's), so they outlive
    the connections that start them.
    """

    def __init__(
        self,
        settings: ServerSettings,
        backend: Backend,
        metrics: ServerMetrics,
        nursery: trio.Nursery,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._settings = settings
        self._backend = backend
        self._metrics = metrics
        self.codec = (
            TokenCodec(settings.token_key, lifetime=settings.token_lifetime)
            if clock is None
            else TokenCodec(settings.token_key, lifetime=settings.token_lifetime, clock=clock)
        )
        self._nursery = nursery
        self._budget = BufferBudget(
            settings.total_buffer_limit, settings.client_buffer_limit, metrics
        )
        self._uploads: dict[str, Upload] = {}
        self._opening: dict[str, trio.Event] = {}
        self._claims: dict[Upload, _Claim] = {}
        self._per_client: TallyCounter[str] = TallyCounter()
        self._dormant = DormantSessions(backend, settings.resume_window, settings.writer)
        nursery.start_soon(self._dormant.run)
        #: sends an object's one POST straight from trio when the backend can (else None:
        #: through its session in a worker thread); timed like every GCS request
        self._poster = None if backend.poster is None else timed_poster(backend.poster, metrics)
        #: PUT_OBJECT requests: stored in one GCS request each, paid from the same budget
        self.whole_objects = WholeObjects(settings, backend, self._budget, metrics, self._poster)
        #: what composite uploads need beyond their segments (which are uploads here)
        self.composites = CompositeUploads(settings, backend)
        nursery.start_soon(self.composites.sweep_periodically)
        metrics.buffer_held.set_function(self.held_bytes)

    # --- what uploads use (UploadHost) ------------------------------------------------

    @property
    def settings(self) -> ServerSettings:
        return self._settings

    @property
    def metrics(self) -> ServerMetrics:
        return self._metrics

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def poster(self) -> WholeObjectPoster | None:
        return self._poster

    def upload_running(self, upload: Upload) -> None:
        self._uploads[upload.upload_id] = upload
        self._dormant.forget(upload.upload_id)  # its session is in use again
        self._metrics.active_uploads.inc()

    def give_back(self, upload: Upload) -> None:
        claim = self._claims.pop(upload, None)
        if claim is not None:
            claim.window.release()
            self._forget_client(claim.client)

    def upload_stopped(self, upload: Upload) -> None:
        self._metrics.active_uploads.dec()
        self.give_back(upload)

    # --- what connections use ---------------------------------------------------------

    def __len__(self) -> int:
        return len(self._uploads)

    def get(self, upload_id: str) -> Upload | None:
        return self._uploads.get(upload_id)

    def held_bytes(self) -> int:
        """Bytes all live uploads hold in their buffers right now (read at scrape time)."""
        return sum(
            upload.writer.stats.held_bytes
            for upload in self._uploads.values()
            if upload.state is UploadState.ACTIVE
        )

    def uploads(self) -> list[Upload]:
        """Every upload this process holds (live, or finished and remembered for a while)."""
        return list(self._uploads.values())

    async def open(self, request: OpenRequest, client: str) -> Upload:
        """Start a new upload: a new GCS session, a writer, and a token for it.

        If cancelled partway, nothing is registered and nothing stays reserved; a GCS
        session may have been created, and is left to expire unused.
        """
        self._check_allowed(request.bucket, request.name)
        self._refuse_token_too_large(request)
        return await self._open_session(request, client, secrets.token_urlsafe(12))

    async def _open_session(
        self,
        request: OpenRequest,
        client: str,
        upload_id: str,
        *,
        destination: str | None = None,
    ) -> Upload:
        """Open ``request`` (already allowed) as ``upload_id``: pin the generation it may
        replace, start its session and seal its token; ``destination`` is the object a
        composite upload's segment is for."""
        pinned = dataclasses.replace(
            request, if_generation_match=await self._generation_to_replace(request)
        )
        upload = await self._start(upload_id, pinned, client, session_uri=None)
        reference = ""  # a small object stored by one request at COMPLETE has no session
        try:
            if not upload.writer.in_one_request:
                reference = self._backend.session_reference(request.bucket, upload.session_uri())
        except SessionReferenceError as exc:
            await upload.abort()
            raise ServerError(ErrorCode.GCS_ERROR, str(exc), retryable=False) from exc
        ticket = self.codec.issue(
            upload_id=upload_id,
            bucket=request.bucket,
            name=request.name,
            session_ref=reference,
            content_type=request.content_type,
            metadata=request.metadata,
            expected_size=request.expected_size,
            if_generation_match=pinned.if_generation_match,
            destination=destination,
        )
        upload.token = self.codec.seal(ticket)
        if len(upload.token) > MAX_TOKEN_SIZE:  # the probe's allowance was not enough: a bug
            await upload.abort()
            raise ServerError(ErrorCode.INTERNAL, f"upload {upload_id}'s token is too large")
        self._metrics.uploads_started.inc()
        log_event(
            logger,
            logging.INFO,
            "upload-opened",
            upload=upload_id,
            bucket=request.bucket,
            object=request.name,
            client=client,
            window=upload.window,
        )
        return upload

    async def attach(self, token: bytes, client: str) -> tuple[Upload, bool]:
        """The upload behind ``token``, taken over from GCS if this process does not hold it.

        Returns the upload and whether it was resumed from its GCS session (in which case
        the client must resend everything from the committed offset). If cancelled
        partway, the upload is not taken over here and stays resumable from its token.
        """
        ticket = self._ticket(token)
        if ticket.is_composite:
            raise CompositeTokenError
        try:
            # No session: a small object whose bytes all go in one request at COMPLETE.
            session_uri = (
                self._backend.session_uri(ticket.bucket, ticket.session_ref)
                if ticket.session_ref
                else None
            )
        except SessionReferenceError as exc:
            raise ServerError(ErrorCode.TOKEN_NOT_RESUMABLE, _not_resumable(exc)) from exc
        while ticket.upload_id in self._opening:
            await self._opening[ticket.upload_id].wait()
        upload = self._uploads.get(ticket.upload_id)
        if upload is not None:
            failure = upload.failure()
            if failure is not None and failure.code is not ErrorCode.UNKNOWN_UPLOAD:
                raise failure
            if failure is None:
                return upload, False
        self._check_allowed(ticket.bucket, ticket.object_name)
        if session_uri is None:
            # Nothing of it was durable, so it starts again from byte 0 (resumed), unless it
            # was aborted (a marker in GCS). If it was completed meanwhile (an instance stored
            # it, then died before its answer reached the client), the COMPLETE finds the
            # object by its size and CRC32C; anything else is refused by GCS (the pinned
            # generation).
            await self.composites.check_not_discarded(ticket)
        self._dormant.forget(ticket.upload_id)
        # A session GCS no longer knows fails the start with UPLOAD_FINISHED: the writer
        # never replaces it, since it may have been aborted or completed elsewhere.
        request = _request_from(ticket)
        if session_uri is None:
            request = dataclasses.replace(request, in_one_request=True)
        upload = await self._start(ticket.upload_id, request, client, session_uri=session_uri)
        upload.token = token
        self._metrics.uploads_resumed.inc()
        log_event(
            logger,
            logging.INFO,
            "upload-resumed",
            upload=ticket.upload_id,
            committed=upload.committed_offset,
            client=client,
        )
        return upload, True

    # --- composite uploads (docs/protocol.md section 14) -------------------------------

    async def open_composite(self, request: OpenRequest, client: str) -> bytes:
        """A new composite upload's token. Nothing starts in GCS: each segment opens its own
        session when its first connection asks for it (:meth:`open_segment`)."""
        self._check_allowed(request.bucket, request.name)
        self._refuse_token_too_large(request)
        pinned = await self._generation_to_replace(request)
        upload_id = secrets.token_urlsafe(12)
        policy = self._settings.composite
        ticket = self.codec.issue(
            upload_id=upload_id,
            bucket=request.bucket,
            name=request.name,
            session_ref="",
            content_type=request.content_type,
            metadata=request.metadata,
            expected_size=request.expected_size,
            if_generation_match=pinned,
            segment_size=policy.segment_size,
        )
        self._metrics.uploads_started.inc()
        log_event(
            logger,
            logging.INFO,
            "composite-opened",
            upload=upload_id,
            bucket=request.bucket,
            object=request.name,
            client=client,
            segment_size=policy.segment_size,
        )
        return self.codec.seal(ticket)

    def composite_ticket(self, token: bytes) -> UploadTicket:
        """The ticket of the composite upload ``token`` names, if this proxy may write it."""
        ticket = self._ticket(token)
        if not ticket.is_composite:
            raise ServerError(ErrorCode.INVALID_REQUEST, "that token names no composite upload")
        self._check_allowed(ticket.bucket, ticket.name)
        return ticket

    async def open_segment(self, token: bytes, index: int, client: str) -> Upload:
        """Segment ``index`` of the composite upload ``token`` names: the one this process
        is writing, or a new upload of its temporary object (started from byte 0).

        If cancelled partway, nothing is registered (a GCS session may have been created,
        and is left to expire unused).
        """
        ticket = self.composite_ticket(token)
        segment_id = f"{ticket.upload_id}.{index}"
        request = self.composites.segment_request(ticket, index)
        while segment_id in self._opening:
            await self._opening[segment_id].wait()
        live = self._uploads.get(segment_id)
        if live is not None and live.failure() is not None:
            live = None  # failed, aborted or released here: stored again, from byte 0
        if live is not None and live.state is UploadState.ACTIVE:
            return live
        await self.composites.check_writable(ticket)
        # Completed here and remembered: the client sees it whole, unless its temporary
        # object is gone (deleted underneath): then it is stored again.
        if live is not None and await self.composites.segment_stored(ticket, index):
            return live
        return await self._open_session(request, client, segment_id, destination=ticket.name)

    async def abort(self, upload: Upload) -> None:
        """Abort ``upload``; one without a GCS session (a small object that would have
        been stored at COMPLETE) leaves a marker in GCS, so its token never writes again
        on any instance."""
        await upload.abort()
        with contextlib.suppress(BadTokenError):
            ticket = self.codec.open(upload.token)
            if not ticket.session_ref and not ticket.is_composite:
                await self.composites.discard(ticket)

    async def discard_composite(self, token: bytes) -> None:
        """Abort a composite upload everywhere (a marker in GCS) and its segments here."""
        ticket = self.composite_ticket(token)
        # Its segments here first, so that none of them is stored after the deletion below.
        prefix = f"{ticket.upload_id}."
        for upload in list(self._uploads.values()):
            if upload.upload_id.startswith(prefix) and upload.state in _STILL_WRITING:
                await upload.abort()
        await self.composites.discard(ticket)

    def _ticket(self, token: bytes) -> UploadTicket:
        try:
            return self.codec.open(token)
        except BadTokenError as exc:
            # Not an authentication failure: a restart with another key looks the same.
            raise ServerError(ErrorCode.TOKEN_NOT_RESUMABLE, _not_resumable(exc)) from exc

    def _check_allowed(self, bucket: str, name: str) -> None:
        if not self._settings.allows(bucket, name):
            raise ServerError(
                ErrorCode.FORBIDDEN, f"writing {bucket}/{name} is not allowed by this proxy"
            )

    async def _start(
        self, upload_id: str, request: OpenRequest, client: str, *, session_uri: str | None
    ) -> Upload:
        settings = self._settings
        if self._per_client[client] >= settings.max_uploads_per_client:
            raise ServerError(
                ErrorCode.TOO_BUSY,
                f"client {client} already has {self._per_client[client]} uploads open here",
            )
        # Claimed before any waiting, so concurrent opens and attaches see them at once.
        self._per_client[client] += 1
        opened = self._opening[upload_id] = trio.Event()
        asked = trio.current_time()
        try:
            window = await UploadWindow.acquire(
                self._budget,
                client,
                settings.writer,
                initial=first_window(settings, request),
                largest=largest_window(settings, request),
                patience=settings.budget_wait,
            )
        except BaseException:
            self._forget_client(client)
            del self._opening[upload_id]
            opened.set()
            raise
        waited = trio.current_time() - asked
        if waited >= _NOTABLE_BUDGET_WAIT:
            # Opens queue for memory: the budget is too small for this load, or held by
            # uploads nobody is sending to (see rup_buffer_reserved_bytes).
            log_event(
                logger, logging.INFO, "budget-waited",
                upload=upload_id, client=client, seconds=f"{waited:.1f}",
            )  # fmt: skip
        upload = Upload(self, upload_id, request, client, window)
        self._claims[upload] = _Claim(window, client)
        try:
            await self._nursery.start(self._run, upload, session_uri)
        except BaseException:
            self.give_back(upload)
            raise
        finally:
            del self._opening[upload_id]
            opened.set()
        return upload

    def _forget_client(self, client: str) -> None:
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]

    async def _run(
        self,
        upload: Upload,
        session_uri: str | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await upload.run(session_uri, task_status=task_status)
        if upload.state is UploadState.RELEASED:
            # Released for idleness (a shutdown cancels this task before it gets here).
            self._keep_session_for_a_while(upload)
        await self._retire(upload)

    def _keep_session_for_a_while(self, upload: Upload) -> None:
        if self._uploads.get(upload.upload_id) is not upload:
            return  # attached again while it was being let go: the session is in use
        try:
            ticket = self.codec.open(upload.token)
        except BadTokenError:
            return  # expired: nobody can resume it; the endpoint expires the session
        if ticket.session_ref:  # a small object waiting for COMPLETE has no session to keep
            self._dormant.remember(ticket, upload.committed_offset)

    async def _generation_to_replace(self, request: OpenRequest) -> int | None:
        """The generation a new upload of ``request`` may replace: 0 when there is none.

        One metadata request; a precondition the client gave that the live object already
        contradicts fails here, before any byte is sent. Credentials that may create
        objects but not read them (403) get no pin: the client's precondition, if any, is
        then checked by GCS alone.
        """
        try:
            # Only a read: a shutdown (or a client gone) need not wait for its answer.
            live = await trio.to_thread.run_sync(
                self._backend.live_generation,
                request.bucket,
                request.name,
                abandon_on_cancel=True,
            )
        except api_exceptions.GoogleAPICallError as exc:
            if exc.code in (401, 403):
                log_event(logger, logging.WARNING, "generation-not-readable", status=exc.code)
                return request.if_generation_match
            raise ServerError(
                ErrorCode.GCS_ERROR,
                f"could not look up {quote(request.name)}: HTTP {exc.code}",
                retryable=_retryable_status(exc.code),
            ) from None
        except requests.RequestException as exc:
            raise ServerError(
                ErrorCode.GCS_ERROR,
                f"could not look up {quote(request.name)}: {type(exc).__name__}",
                retryable=True,
            ) from None
        wanted = request.if_generation_match
        if wanted is not None and wanted != live:
            raise ServerError(
                ErrorCode.PRECONDITION_FAILED,
                f"if_generation_match={wanted}, but the live generation of "
                f"{quote(request.bucket)}/{quote(request.name)} is {live}",
            )
        return live

    def _refuse_token_too_large(self, request: OpenRequest) -> None:
        """INVALID_REQUEST, before anything is created, if the token for ``request`` would
        exceed MAX_TOKEN_SIZE (the most a client may send back in AttachUpload; the
        UPLOAD_OPENED that carries it then fits a control frame too)."""
        probe = self.codec.issue(
            upload_id=secrets.token_urlsafe(12),
            bucket=request.bucket,
            name=request.name,
            session_ref="x" * _SESSION_REF_ALLOWANCE,
            content_type=request.content_type,
            metadata=request.metadata,
            expected_size=request.expected_size,
            if_generation_match=2**63 - 1,
        )
        size = len(self.codec.seal(probe))
        if size > MAX_TOKEN_SIZE:
            raise ServerError(
                ErrorCode.INVALID_REQUEST,
                f"the upload token for this open would be about {size} bytes, above the"
                f" {MAX_TOKEN_SIZE} allowed: use a shorter name, content type or metadata",
            )

    async def _retire(self, upload: Upload) -> None:
        """Keep a finished upload's outcome visible for a while, then forget it."""
        if upload.state in (UploadState.COMPLETED, UploadState.ABORTED, UploadState.FAILED):
            await trio.sleep(self._settings.result_retention)
        if self._uploads.get(upload.upload_id) is upload:
            del self._uploads[upload.upload_id]


#: the states in which an upload may still write to GCS (so a discard must abort it)
_STILL_WRITING = frozenset({UploadState.ACTIVE, UploadState.RELEASED})


def _retryable_status(status: int | None) -> bool:
    return status is None or status >= 500 or status in (408, 429)


def _not_resumable(exc: BadTokenError | SessionReferenceError) -> str:
    if isinstance(exc, BadTokenError):
        return str(exc)
    return "this proxy cannot resume that upload: the token is damaged"


def _request_from(ticket: UploadTicket) -> OpenRequest:
    return OpenRequest(
        bucket=ticket.bucket,
        name=ticket.name,
        content_type=ticket.content_type,
        metadata=ticket.metadata,
        expected_size=ticket.expected_size,
        if_generation_match=ticket.if_generation_match,
    )
