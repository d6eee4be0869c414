"""The in-memory :class:`~faultnet.gcs.storage.Storage`: nothing outlives the process.

An object is the blocks it arrived in, so finalizing a session copies nothing; a session
keeps each request's body (or a copy of a small part of one) rather than one buffer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from faultnet.gcs.model import BucketInfo, FinishedSession, ObjectInfo, SessionParams
from faultnet.gcs.storage import Block, LoadedState, SessionBytes, StagedObject

__all__ = ["MemorySessionBytes", "MemoryStorage"]


class MemorySessionBytes:
    """A session's bytes as the request bodies that brought them."""

    def __init__(self) -> None:
        self._segments: list[memoryview] = []
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    def append(self, view: memoryview) -> None:
        """Keep ``view`` itself, not a copy: chunk ingest costs one copy (kernel to body).

        The caller must never change the bytes afterwards; request bodies are fresh
        buffers, so this holds.
        """
        if view.nbytes * 2 < memoryview(view.obj).nbytes:
            # A small part of a big request buffer (the new tail of a resent chunk):
            # copy it, rather than keep the whole buffer alive for as long as the object.
            view = memoryview(bytes(view))
        self._segments.append(view)
        self._size += view.nbytes

    def blocks(self) -> Iterator[Block]:
        yield from self._segments

    def segments(self) -> tuple[memoryview, ...]:
        return tuple(self._segments)

    def discard(self) -> None:
        self._segments = []


class _StagedBlocks:
    def __init__(self, blocks: Iterable[Block]) -> None:
        self.blocks = tuple(blocks)

    def discard(self) -> None:
        self.blocks = ()


class MemoryStorage:
    """Object generations as tuples of blocks, keyed by (bucket, name, generation)."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, str, int], tuple[Block, ...]] = {}

    def load(self) -> LoadedState:
        return LoadedState()

    def add_bucket(self, bucket: BucketInfo) -> None:
        pass  # the store's index is all there is

    def remove_bucket(self, name: str) -> None:
        pass

    def stage_object(self, blocks: Iterable[Block]) -> StagedObject:
        return _StagedBlocks(blocks)

    def write_object(
        self, info: ObjectInfo, staged: StagedObject, replaced: ObjectInfo | None
    ) -> None:
        if not isinstance(staged, _StagedBlocks):
            raise TypeError("staged by another storage")
        self._data[info.bucket, info.name, info.generation] = staged.blocks
        if replaced is not None:
            self.remove_object(replaced)

    def read_object(self, info: ObjectInfo) -> bytes | None:
        data = self._data.get((info.bucket, info.name, info.generation))
        if data is None:
            return None
        return data[0] if len(data) == 1 and isinstance(data[0], bytes) else b"".join(data)

    def object_blocks(self, info: ObjectInfo) -> Iterator[Block] | None:
        data = self._data.get((info.bucket, info.name, info.generation))
        return None if data is None else iter(data)

    def remove_object(self, info: ObjectInfo) -> None:
        self._data.pop((info.bucket, info.name, info.generation), None)

    def open_session(self, upload_id: str, params: SessionParams) -> SessionBytes:
        return MemorySessionBytes()

    def publish_session(
        self,
        upload_id: str,
        held: SessionBytes,
        finished: FinishedSession,
        replaced: ObjectInfo | None,
    ) -> None:
        self.write_object(finished.result, _StagedBlocks(held.segments()), replaced)

    def remove_session(self, upload_id: str) -> None:
        pass  # the session's bytes go with the session object
