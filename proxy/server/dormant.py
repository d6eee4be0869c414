"""Released uploads whose GCS sessions wait for a re-attach, then are cancelled.

An upload nobody is attached to gives its buffer back as soon as it is idle, but its GCS
session stays: the client may come back with its token (after a crash, a network outage,
or a proxy restart) for ``resume_window`` seconds. After that the session is cancelled with
a DELETE, so abandoned uploads leave nothing in GCS (real GCS would keep a session for 7
days; the embedded endpoint would keep its partial file until its own TTL).

Before cancelling, the session is resumed once to read its committed offset. If that moved
since the upload was released here, another proxy sharing the key has taken the upload
over and is writing it: the session is left alone and looked at again one window later.
A session that is gone or finished needs nothing.

What is remembered is small (ids, the session reference, one offset) and bounded by
``limit``: past it, the oldest session is cancelled early. A restarted proxy remembers
nothing; sessions it never sees again are the endpoint's to expire.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from dataclasses import dataclass, field

import trio

from proxy.server.backend import Backend, SessionReferenceError
from proxy.server.logging import get_logger, log_event
from proxy.server.tokens import UploadTicket
from reliablewriter import WriterError, WriterSettings, open_writer

__all__ = ["DormantSessions"]

logger = get_logger(__name__)

#: how many released uploads are remembered at once; beyond it the oldest is cancelled early
_DEFAULT_LIMIT = 100_000


@dataclass(frozen=True, order=True)
class _Dormant:
    deadline: float
    upload_id: str
    ticket: UploadTicket = field(compare=False)
    committed: int = field(compare=False)


class DormantSessions:
    """The GCS sessions of released uploads, each with the time it gets cancelled.

    :meth:`run` (a task in the server's nursery) cancels each session whose window ran
    out; cancelling :meth:`run` (a shutdown) leaves every session as it is, resumable.
    """

    def __init__(
        self,
        backend: Backend,
        window: float,
        writer_settings: WriterSettings,
        *,
        limit: int = _DEFAULT_LIMIT,
    ) -> None:
        self._backend = backend
        self._window = window
        self._writer_settings = writer_settings
        self._limit = limit
        self._heap: list[_Dormant] = []
        #: upload id -> its live record (heap entries not in here are stale)
        self._live: dict[str, _Dormant] = {}
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, upload_id: str) -> bool:
        return upload_id in self._live

    def remember(self, ticket: UploadTicket, committed: int) -> None:
        """Cancel ``ticket``'s session ``window`` seconds from now unless :meth:`forget` comes."""
        self._push(
            _Dormant(trio.current_time() + self._window, ticket.upload_id, ticket, committed)
        )
        if len(self._live) > self._limit:
            oldest = self._pop_live()
            if oldest is not None:
                # Due now: its window is cut short rather than memory left to grow.
                self._push(dataclasses.replace(oldest, deadline=trio.current_time()))
        self._changed.set()

    def _push(self, record: _Dormant) -> None:
        self._live[record.upload_id] = record
        heapq.heappush(self._heap, record)

    def forget(self, upload_id: str) -> None:
        """The upload was attached again: its session is in use, not dormant."""
        self._live.pop(upload_id, None)
        self._drop_stale()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._changed = trio.Event()
            due = self._heap[0].deadline if self._heap else float("inf")
            if due > trio.current_time():
                with trio.move_on_at(due):
                    await self._changed.wait()
                continue
            record = self._pop_live()
            if record is not None:
                await self._cancel_unless_moved(record)

    async def _cancel_unless_moved(self, record: _Dormant) -> None:
        ticket = record.ticket
        try:
            session_uri = self._backend.session_uri(ticket.bucket, ticket.session_ref)
            bucket = await trio.to_thread.run_sync(self._backend.bucket, ticket.bucket)
            async with open_writer(
                bucket,
                ticket.name,
                self._writer_settings,
                content_type=ticket.content_type,
                if_generation_match=ticket.if_generation_match,
                session_uri=session_uri,
            ) as writer:
                if writer.result is not None:
                    return  # finished (here or elsewhere): nothing to cancel
                if writer.committed_offset != record.committed:
                    # Someone (another proxy with the same key) is writing it.
                    self.remember(ticket, writer.committed_offset)
                    return
                await writer.abort()  # leaves a finished object alone
        except (WriterError, SessionReferenceError):
            return  # gone already, or not ours to find: nothing to cancel
        except Exception:
            log_event(logger, logging.WARNING, "session-cancel-failed", upload=record.upload_id)
            return
        log_event(logger, logging.INFO, "upload-expired", upload=record.upload_id)

    def _pop_live(self) -> _Dormant | None:
        """The live record due first, taken off; stale heap entries are dropped on the way."""
        while self._heap:
            record = heapq.heappop(self._heap)
            if self._live.get(record.upload_id) is record:
                del self._live[record.upload_id]
                return record
        return None

    def _drop_stale(self) -> None:
        """Keep the heap from filling with forgotten records (rebuilt when half is stale)."""
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)
