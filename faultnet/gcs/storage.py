"""Where the endpoint's bytes and records live: one interface, in memory or on disk.

:class:`~faultnet.gcs.store.Store` decides everything (names, generations, preconditions,
checksums, which session finalizes into what) and keeps the index of buckets, objects
and sessions in memory. A :class:`Storage` only keeps what the store hands it, and gives
it back after a restart (:meth:`Storage.load`). The implementation is chosen once, when
the store is built: :class:`~faultnet.gcs.memory.MemoryStorage` or
:class:`~faultnet.gcs.disk.DiskStorage`.

The store calls a storage with its own lock held, so implementations need no locking of
their own beyond what a session's bytes need (the caller holds that session's lock).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from faultnet.gcs.model import BucketInfo, FinishedSession, ObjectInfo, SessionParams

__all__ = [
    "Block",
    "LoadedSession",
    "LoadedState",
    "SessionBytes",
    "StagedObject",
    "Storage",
]

#: a piece of an object's or a session's bytes, owned by whoever holds it
Block: TypeAlias = bytes | memoryview


class SessionBytes(Protocol):
    """The bytes one upload session holds, ``[0, size)``, growing only by appending."""

    @property
    def size(self) -> int: ...

    def append(self, view: memoryview) -> None:
        """Store ``view`` at :attr:`size`, taking ownership of it; durable on return."""

    def blocks(self) -> Iterator[Block]:
        """The stored bytes, in order (read back from disk if that is where they are)."""

    def segments(self) -> tuple[memoryview, ...]:
        """The stored bytes as held in memory (empty if they are not held in memory)."""

    def discard(self) -> None:
        """Let go of bytes held in memory (the session is deleted or finalized)."""


class StagedObject(Protocol):
    """An object's bytes, stored but not yet published (see :meth:`Storage.stage_object`)."""

    def discard(self) -> None:
        """Drop the bytes: the object will not be published after all."""


@dataclass(frozen=True)
class LoadedSession:
    """A session found by :meth:`Storage.load`, with the bytes it had stored."""

    upload_id: str
    params: SessionParams
    held: SessionBytes


@dataclass(frozen=True)
class LoadedState:
    """Everything a storage kept from an earlier run (empty for a fresh one)."""

    buckets: Sequence[BucketInfo] = ()
    objects: Sequence[ObjectInfo] = ()
    sessions: Sequence[LoadedSession] = ()
    finished: dict[str, FinishedSession] = field(default_factory=dict)  # by upload id


class Storage(Protocol):
    """Keeps buckets, object generations and sessions for a :class:`Store`."""

    def load(self) -> LoadedState:
        """What an earlier run left (and clean up what it left half done)."""

    def add_bucket(self, bucket: BucketInfo) -> None: ...

    def remove_bucket(self, name: str) -> None: ...

    def stage_object(self, blocks: Iterable[Block]) -> StagedObject:
        """Store ``blocks`` (taking ownership), unpublished: the slow half of a write.

        The store calls this without its lock held, so a large write (a compose of
        gigabytes) holds up nobody; :meth:`write_object` then publishes it quickly.
        """

    def write_object(
        self, info: ObjectInfo, staged: StagedObject, replaced: ObjectInfo | None
    ) -> None:
        """Publish ``staged`` as ``info``, atomically, in place of ``replaced``."""

    def read_object(self, info: ObjectInfo) -> bytes | None:
        """The bytes of ``info``'s generation, or None if that generation is gone."""

    def object_blocks(self, info: ObjectInfo) -> Iterator[Block] | None:
        """``info``'s bytes as they are held (no copy in memory), or None if gone.

        Once this returns an iterator, it yields the whole generation even if the object
        is replaced or deleted meanwhile.
        """

    def remove_object(self, info: ObjectInfo) -> None: ...

    def open_session(self, upload_id: str, params: SessionParams) -> SessionBytes:
        """Record a new session (durably) and return where its bytes go."""

    def publish_session(
        self,
        upload_id: str,
        held: SessionBytes,
        finished: FinishedSession,
        replaced: ObjectInfo | None,
    ) -> None:
        """Turn the session's bytes into ``finished.result``'s generation, atomically.

        Afterwards the session is finished: only ``finished`` is kept.
        """

    def remove_session(self, upload_id: str) -> None:
        """Forget a session, in progress or finished, and free what it held."""
