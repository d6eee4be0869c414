"""The rules of the endpoint's storage: buckets, object generations and upload sessions.

:class:`Store` keeps the index (which buckets, which live generation of each object,
which sessions) in memory and enforces GCS's invariants: sessions grow by appending,
preconditions hold, checksums match on finalize, generations only increase. Where bytes
and records are kept is a :class:`~faultnet.gcs.storage.Storage`, chosen once when the
store is built: in memory, or on disk under ``data_dir`` (see :mod:`faultnet.gcs.disk`).
Which bytes of a request get appended is the business of :mod:`faultnet.gcs.resumable`.

A finalized session is forgotten except for its result, the new object's metadata: GCS
answers a status query on a finished session with it (200), and a writer whose final
response was lost relies on that. Nothing else of the session, least of all its bytes,
outlives finalization, so a long-running endpoint does not grow with every upload.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import secrets
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import google_crc32c

from faultnet.gcs.digest import RunningDigest, decode_crc32c, encode_crc32c, encode_md5
from faultnet.gcs.disk import DiskStorage
from faultnet.gcs.errors import GcsApiError
from faultnet.gcs.memory import MemoryStorage
from faultnet.gcs.model import (
    BucketInfo,
    ComposeSource,
    FinishedSession,
    ObjectInfo,
    Preconditions,
    SessionInfo,
    SessionParams,
)
from faultnet.gcs.names import (
    check_bucket_name,
    check_content_type,
    check_custom_metadata,
    check_object_name,
)
from faultnet.gcs.storage import Block, SessionBytes, StagedObject, Storage
from protocol import crc32c_combine

__all__ = ["DEFAULT_SESSION_TTL", "MAX_COMPOSE_SOURCES", "Store", "UploadSession"]

#: GCS's limit on the sources of one compose request
MAX_COMPOSE_SOURCES = 32
#: how long a resumable session lives, counted from its start: GCS's one week
DEFAULT_SESSION_TTL = 7 * 24 * 3600.0

_NO_PRECONDITIONS = Preconditions()


class UploadSession:
    """One resumable upload: bytes ``[0, persisted_size)`` are stored, in order.

    Callers hold :attr:`lock` across a read-decide-append sequence. Neither this class
    nor :class:`Store` takes it, so it is never taken twice.
    """

    def __init__(
        self,
        upload_id: str,
        params: SessionParams,
        held: SessionBytes,
        *,
        compute_md5: bool = True,
    ) -> None:
        self.upload_id = upload_id
        self.params = params
        self.lock = threading.Lock()
        self.total_size: int | None = params.declared_size
        self.result: ObjectInfo | None = None
        #: the highest persisted size ever reported to a client (a lying fault goes below)
        self.acknowledged_size = 0
        self.held = held
        #: True once the session is deleted or expired: nothing more may be stored
        self.gone = False
        self._size = held.size
        self.digest = RunningDigest(md5=compute_md5)
        for block in held.blocks():
            self.digest.update(block)

    @property
    def bucket(self) -> str:
        return self.params.bucket

    @property
    def name(self) -> str:
        return self.params.name

    @property
    def persisted_size(self) -> int:
        return self._size

    def append(self, data: bytes | bytearray | memoryview, *, digest: bool = True) -> None:
        """Store ``data`` at :attr:`persisted_size`, taking ownership of it.

        The caller must never change ``data`` afterwards (in memory it is kept as is).
        ``digest=False`` skips hashing: for the final block, whose digest the caller
        already has.
        """
        self.check_live()
        view = memoryview(data)
        if not view.nbytes:
            return
        self.held.append(view)
        if digest:
            self.digest.update(view)
        self._size += view.nbytes

    def check_live(self) -> None:
        """Raise unless bytes may still be stored: 404 once gone, 400 once finalized."""
        if self.gone:
            raise GcsApiError(404, "No such upload session.", reason="notFound")
        if self.result is not None:
            raise GcsApiError(400, "upload already finalized")

    def segments(self) -> tuple[memoryview, ...]:
        """The stored bytes, in order, as held in memory (empty on disk)."""
        return self.held.segments()

    @classmethod
    def finished(cls, upload_id: str, result: ObjectInfo) -> UploadSession:
        """A session that finalized into ``result``, rebuilt from that record alone.

        It holds no bytes and refuses more; every request on it answers with ``result``.
        """
        params = SessionParams(
            bucket=result.bucket,
            name=result.name,
            content_type=result.content_type,
            metadata=result.metadata,
            declared_size=result.size,
            preconditions=Preconditions(),
        )
        session = cls(upload_id, params, _FinishedBytes(result.size), compute_md5=False)
        session.acknowledged_size = result.size
        session.result = result
        return session

    def snapshot(self) -> SessionInfo:
        return SessionInfo(
            self.bucket, self.name, self._size, self.total_size, self.result is not None
        )

    def discard(self) -> None:
        """Drop the bytes held in memory (the session is being deleted or finalized)."""
        self.held.discard()


class _FinishedBytes:
    """What a finished session holds: a size, and no bytes (they are the object's now)."""

    def __init__(self, size: int) -> None:
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def append(self, view: memoryview) -> None:
        raise GcsApiError(400, "upload already finalized")

    def blocks(self) -> Iterator[Block]:
        return iter(())

    def segments(self) -> tuple[memoryview, ...]:
        return ()

    def discard(self) -> None:
        pass


class Store:
    """Buckets, objects and upload sessions, in memory or under ``data_dir``. Thread-safe.

    ``compute_md5=False`` leaves objects without ``md5Hash`` (see :class:`RunningDigest`);
    an upload that asks for an MD5 check is then refused rather than passed unchecked.
    A session, in progress or finished, is forgotten (and its files deleted) once it is
    ``session_ttl`` seconds old: see :meth:`expire_sessions`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        compute_md5: bool = True,
        session_ttl: float = DEFAULT_SESSION_TTL,
    ) -> None:
        if not session_ttl > 0:
            raise ValueError("session_ttl must be > 0")
        self.compute_md5 = compute_md5
        self.session_ttl = session_ttl
        self._storage: Storage = MemoryStorage() if data_dir is None else DiskStorage(data_dir)
        self._lock = threading.Lock()
        self._buckets: dict[str, BucketInfo] = {}
        self._objects: dict[str, dict[str, ObjectInfo]] = {}
        self._sessions: dict[str, UploadSession] = {}  # in progress
        self._finished: dict[str, FinishedSession] = {}  # by upload id
        self._last_generation = 0
        self._load()

    def _load(self) -> None:
        loaded = self._storage.load()
        for bucket in loaded.buckets:
            self._buckets[bucket.name] = bucket
            self._objects[bucket.name] = {}
        for info in loaded.objects:
            self._objects[info.bucket][info.name] = info
            self._last_generation = max(self._last_generation, info.generation)
        for found in loaded.sessions:
            self._sessions[found.upload_id] = UploadSession(
                found.upload_id, found.params, found.held, compute_md5=self.compute_md5
            )
        self._finished.update(loaded.finished)
        self.expire_sessions()

    # -- buckets ------------------------------------------------------------------------

    def create_bucket(self, name: str) -> BucketInfo:
        check_bucket_name(name)
        with self._lock:
            if name in self._buckets:
                raise GcsApiError(409, f"Bucket {name} already exists.", reason="conflict")
            info = BucketInfo(name, datetime.now(UTC))
            self._storage.add_bucket(info)
            self._buckets[name] = info
            self._objects[name] = {}
            return info

    def get_bucket(self, name: str) -> BucketInfo:
        with self._lock:
            return self._bucket(name)

    def _bucket(self, name: str) -> BucketInfo:
        info = self._buckets.get(name)
        if info is None:
            check_bucket_name(name)  # a name no bucket can have is a 400, as on GCS
            raise GcsApiError(404, f"Bucket {name} not found.", reason="notFound")
        return info

    def list_buckets(self) -> list[BucketInfo]:
        with self._lock:
            return sorted(self._buckets.values(), key=lambda b: b.name)

    def delete_bucket(self, name: str) -> None:
        with self._lock:
            self._bucket(name)
            if self._objects[name]:
                raise GcsApiError(409, f"Bucket {name} is not empty.", reason="conflict")
            self._storage.remove_bucket(name)
            del self._buckets[name], self._objects[name]

    # -- objects ------------------------------------------------------------------------

    def _next_generation(self) -> int:
        # GCS generations are microsecond timestamps; keep them strictly increasing.
        self._last_generation = max(self._last_generation + 1, time.time_ns() // 1000)
        return self._last_generation

    def _live(self, bucket: str, name: str) -> ObjectInfo | None:
        self._bucket(bucket)
        info = self._objects[bucket].get(name)
        if info is None:
            check_object_name(name)  # a name no object can have is a 400, as on GCS
        return info

    def _live_generation(self, bucket: str, name: str) -> int:
        info = self._live(bucket, name)
        return 0 if info is None else info.generation

    def close(self) -> None:
        """Wait for the sessions' digest workers, which end once their queues are empty."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.digest.wait()

    def check_preconditions(self, bucket: str, name: str, preconditions: Preconditions) -> None:
        with self._lock:
            preconditions.check(self._live_generation(bucket, name))

    def insert_object(
        self,
        bucket: str,
        name: str,
        data: bytes | bytearray | memoryview,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
        preconditions: Preconditions = _NO_PRECONDITIONS,
        expected_crc32c: str | None = None,
        expected_md5: str | None = None,
    ) -> ObjectInfo:
        """Create a new generation of ``bucket/name`` from ``data`` in one step."""
        _check_new_object(name, content_type, metadata or {})
        content = bytes(data)
        crc32c = encode_crc32c(google_crc32c.value(content))
        md5 = encode_md5(hashlib.md5(content).digest()) if self.compute_md5 else None
        _check_hashes(crc32c, md5, expected_crc32c, expected_md5)
        draft = _draft(bucket, name, len(content), content_type, crc32c, md5, metadata)
        return self._publish(self._storage.stage_object((content,)), preconditions, draft)

    def _publish(
        self, staged: StagedObject, preconditions: Preconditions, draft: ObjectInfo
    ) -> ObjectInfo:
        """Publish staged bytes as ``draft``'s next generation; drop them if that fails."""
        try:
            with self._lock:
                replaced = self._live(draft.bucket, draft.name)
                preconditions.check(0 if replaced is None else replaced.generation)
                info = self._stamp(draft)
                self._storage.write_object(info, staged, replaced)
                self._objects[draft.bucket][draft.name] = info
                return info
        except BaseException:
            staged.discard()
            raise

    def _stamp(self, draft: ObjectInfo) -> ObjectInfo:
        """``draft`` as the next generation, created now. The caller holds the lock."""
        return dataclasses.replace(
            draft, generation=self._next_generation(), time_created=datetime.now(UTC)
        )

    def compose(
        self,
        bucket: str,
        name: str,
        sources: Sequence[ComposeSource],
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
        preconditions: Preconditions = _NO_PRECONDITIONS,
        delete_sources: bool = False,
    ) -> ObjectInfo:
        """Make ``bucket/name`` the concatenation of ``sources`` (objects in ``bucket``).

        As GCS: 1 to 32 sources (400 otherwise), 404 for a missing source or generation,
        412 for a failed precondition; the result's CRC32C is combined from the sources'
        (nothing is hashed again), and a composite object has no MD5. The bytes are
        copied without the store's lock held (on disk; in memory they are shared).
        """
        _check_new_object(name, content_type, metadata or {})
        if not sources:
            raise GcsApiError(400, "At least one source object is required.", reason="required")
        if len(sources) > MAX_COMPOSE_SOURCES:
            raise GcsApiError(
                400,
                f"The number of source components provided ({len(sources)}) exceeds the "
                f"maximum ({MAX_COMPOSE_SOURCES}).",
            )
        with self._lock:
            parts = [self._compose_source(bucket, source) for source in sources]
            preconditions.check(self._live_generation(bucket, name))
        crc = 0
        for part in parts:
            crc = crc32c_combine(crc, decode_crc32c(part.crc32c), part.size)
        blocks = []
        for part in parts:
            held = self._storage.object_blocks(part)
            if held is None:  # deleted or replaced since it was looked up
                raise GcsApiError(404, f"No such object: {bucket}/{part.name}", reason="notFound")
            blocks.append(held)
        size = sum(part.size for part in parts)
        draft = _draft(bucket, name, size, content_type, encode_crc32c(crc), None, metadata)
        components = sum(part.component_count or 1 for part in parts)
        info = self._publish(
            self._storage.stage_object(itertools.chain.from_iterable(blocks)),
            preconditions,
            dataclasses.replace(draft, component_count=components),
        )
        if delete_sources:
            self._delete_composed_sources(parts, keep=name)
        return info

    def _compose_source(self, bucket: str, source: ComposeSource) -> ObjectInfo:
        check_object_name(source.name)
        info = self._live(bucket, source.name)
        if info is None or source.generation not in (None, info.generation):
            shown = "" if source.generation is None else f" (generation {source.generation})"
            raise GcsApiError(
                404, f"No such object: {bucket}/{source.name}{shown}", reason="notFound"
            )
        Preconditions(source.if_generation_match).check(info.generation)
        return info

    def _delete_composed_sources(self, parts: Sequence[ObjectInfo], *, keep: str) -> None:
        """Delete each source still at the generation composed (never the destination)."""
        with self._lock:
            for part in parts:
                live = self._objects[part.bucket].get(part.name)
                if part.name != keep and live is not None and live.generation == part.generation:
                    self._storage.remove_object(live)
                    del self._objects[part.bucket][part.name]

    def lookup(self, bucket: str, name: str, generation: int | None = None) -> ObjectInfo:
        with self._lock:
            info = self._live(bucket, name)
        if info is None or (generation is not None and generation != info.generation):
            raise GcsApiError(404, f"No such object: {bucket}/{name}", reason="notFound")
        return info

    def read(self, info: ObjectInfo) -> bytes:
        """The bytes of ``info``'s generation (404 if it has been replaced or deleted)."""
        data = self._storage.read_object(info)
        if data is None:
            raise GcsApiError(404, f"No such object: {info.bucket}/{info.name}", reason="notFound")
        return data

    def get_object(self, bucket: str, name: str) -> tuple[bytes, dict[str, Any]]:
        """For tests: the live object's bytes and its JSON resource."""
        info = self.lookup(bucket, name)
        return self.read(info), info.resource("")

    def delete_object(
        self,
        bucket: str,
        name: str,
        preconditions: Preconditions = _NO_PRECONDITIONS,
    ) -> None:
        with self._lock:
            info = self._live(bucket, name)
            if info is None:
                raise GcsApiError(404, f"No such object: {bucket}/{name}", reason="notFound")
            preconditions.check(info.generation)
            self._storage.remove_object(info)
            del self._objects[bucket][name]

    def list_objects(self, bucket: str, prefix: str = "") -> list[ObjectInfo]:
        with self._lock:
            self._bucket(bucket)
            found = [i for n, i in self._objects[bucket].items() if n.startswith(prefix)]
        return sorted(found, key=lambda info: info.name)

    # -- sessions -----------------------------------------------------------------------

    def create_session(
        self,
        bucket: str,
        name: str,
        *,
        content_type: str,
        metadata: Mapping[str, str],
        declared_size: int | None,
        preconditions: Preconditions,
    ) -> UploadSession:
        _check_new_object(name, content_type, metadata)
        upload_id = secrets.token_urlsafe(24)
        params = SessionParams(
            bucket, name, content_type, dict(metadata), declared_size, preconditions, time.time()
        )
        with self._lock:
            preconditions.check(self._live_generation(bucket, name))
            held = self._storage.open_session(upload_id, params)
            session = UploadSession(upload_id, params, held, compute_md5=self.compute_md5)
            self._sessions[upload_id] = session
            return session

    def session(self, upload_id: str) -> UploadSession:
        """The session ``upload_id``; a finished one is rebuilt from its result (no bytes)."""
        with self._lock:
            session = self._sessions.get(upload_id)
            finished = self._finished.get(upload_id)
        if session is not None:
            return session
        if finished is not None:
            return UploadSession.finished(upload_id, finished.result)
        raise GcsApiError(404, "No such upload session.", reason="notFound")

    def sessions(self) -> list[SessionInfo]:
        """Every session the endpoint answers for: in progress, then finished."""
        with self._lock:
            sessions = list(self._sessions.values())
            finished = list(self._finished.values())
        return [session.snapshot() for session in sessions] + [
            SessionInfo(f.result.bucket, f.result.name, f.result.size, f.result.size, True)
            for f in finished
        ]

    def delete_session(self, session: UploadSession) -> None:
        """Forget ``session``; later requests for it get 404. Caller holds its lock."""
        session.gone = True
        with self._lock:
            self._sessions.pop(session.upload_id, None)
            self._finished.pop(session.upload_id, None)
            self._storage.remove_session(session.upload_id)
        session.discard()

    def expire_sessions(self) -> int:
        """Forget every session older than :attr:`session_ttl`; returns how many.

        Its files go with it. A session busy with a request right now is left for the
        next sweep rather than waited for: a sweep never blocks behind a slow client.
        """
        deadline = time.time() - self.session_ttl
        with self._lock:
            stale = [s for s in self._sessions.values() if s.params.created <= deadline]
            finished = [i for i, f in self._finished.items() if f.created <= deadline]
            for upload_id in finished:
                del self._finished[upload_id]
                self._storage.remove_session(upload_id)
        expired = len(finished)
        for session in stale:
            if session.lock.acquire(blocking=False):
                try:
                    if session.result is None:
                        self.delete_session(session)
                        expired += 1
                finally:
                    session.lock.release()
        return expired

    def finalize_session(
        self,
        session: UploadSession,
        tail: memoryview,
        *,
        expected_crc32c: str | None = None,
        expected_md5: str | None = None,
    ) -> ObjectInfo:
        """Append ``tail`` and turn the session into the live object, atomically.

        The caller holds the session's lock. A checksum mismatch (400) or a failed
        precondition (412) leaves the session as it was and creates no object.
        """
        params = session.params
        session.check_live()
        with self._lock:
            params.preconditions.check(self._live_generation(params.bucket, params.name))
        crc32c, md5 = session.digest.digests_with(tail)
        _check_hashes(crc32c, md5, expected_crc32c, expected_md5)
        with self._lock:
            replaced = self._live(params.bucket, params.name)
            params.preconditions.check(0 if replaced is None else replaced.generation)
            session.append(tail, digest=False)
            info = self._stamp(
                _draft(
                    params.bucket,
                    params.name,
                    session.persisted_size,
                    params.content_type,
                    crc32c,
                    md5,
                    params.metadata,
                )
            )
            finished = FinishedSession(info, params.created)
            self._storage.publish_session(session.upload_id, session.held, finished, replaced)
            self._objects[params.bucket][params.name] = info
            # Only the result stays; requests already holding ``session`` see it final.
            session.result = info
            self._sessions.pop(session.upload_id, None)
            self._finished[session.upload_id] = finished
        session.discard()
        return info


def _draft(
    bucket: str,
    name: str,
    size: int,
    content_type: str,
    crc32c: str,
    md5: str | None,
    metadata: Mapping[str, str] | None,
) -> ObjectInfo:
    """A new object's metadata, before :meth:`Store._stamp` gives it a generation."""
    return ObjectInfo(
        bucket=bucket,
        name=name,
        generation=0,
        size=size,
        content_type=content_type,
        crc32c=crc32c,
        md5_hash=md5,
        time_created=datetime.fromtimestamp(0, UTC),
        metadata=dict(metadata or {}),
    )


def _check_new_object(name: str, content_type: str, metadata: Mapping[str, str]) -> None:
    check_object_name(name)
    check_content_type(content_type)
    check_custom_metadata(metadata)


def _check_hashes(
    crc32c: str, md5: str | None, expected_crc32c: str | None, expected_md5: str | None
) -> None:
    if expected_crc32c is not None and expected_crc32c != crc32c:
        raise GcsApiError(
            400,
            f"Provided CRC32C {expected_crc32c!r} doesn't match calculated CRC32C {crc32c!r}.",
        )
    if expected_md5 is not None and md5 is None:
        raise GcsApiError(400, "This server does not compute MD5s; it cannot check one.")
    if expected_md5 is not None and expected_md5 != md5:
        raise GcsApiError(
            400, f"Provided MD5 hash {expected_md5!r} doesn't match calculated MD5 {md5!r}."
        )
