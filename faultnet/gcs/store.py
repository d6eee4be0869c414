"""Where the endpoint keeps buckets, objects and upload sessions.

Two modes share one API. In memory, everything lives in dicts. On disk (``data_dir``),
an object is one file, ``<data><metadata JSON><8-byte big-endian JSON length>``, written
to ``tmp/``, fsynced and renamed into place, so a reader sees the old object or the new
one, never a half-written one. A session's bytes are appended to ``sessions/<id>.part``
(fsynced per chunk) next to a ``.json`` with its fixed parameters, so a restarted server
picks the session up where its part file ends; finalizing appends the metadata trailer
and renames the part file into place, so no byte is copied.

A finalized session is forgotten except for its result, the new object's metadata: GCS
answers a status query on a finished session with it (200), and a writer whose final
response was lost relies on that. Nothing else of the session, least of all its bytes,
outlives finalization, so a long-running endpoint does not grow with every upload.

This module enforces storage invariants only (sessions grow by appending; preconditions;
checksums on finalize). Which bytes of a request get appended is the business of
:mod:`faultnet.gcs.resumable`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote

import google_crc32c

from faultnet.gcs.digest import RunningDigest, encode_crc32c, encode_md5
from faultnet.gcs.errors import GcsApiError

__all__ = [
    "BucketInfo",
    "ObjectInfo",
    "Preconditions",
    "SessionInfo",
    "Store",
    "UploadSession",
]

_TRAILER_LENGTH = struct.Struct(">Q")


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Preconditions:
    """``ifGenerationMatch`` / ``ifGenerationNotMatch``; 0 means "no live object"."""

    if_generation_match: int | None = None
    if_generation_not_match: int | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Preconditions:
        def number(key: str) -> int | None:
            text = query.get(key)
            if text is None:
                return None
            if not text.isdigit():
                raise GcsApiError(400, f"Invalid value for {key}: {text!r}")
            return int(text)

        return cls(number("ifGenerationMatch"), number("ifGenerationNotMatch"))

    def check(self, current_generation: int) -> None:
        """Raise 412 (GCS's answer) unless the live generation (0: none) satisfies these."""
        match, not_match = self.if_generation_match, self.if_generation_not_match
        if match is not None and match != current_generation:
            raise GcsApiError(
                412,
                "At least one of the pre-conditions you specified did not hold.",
                reason="conditionNotMet",
            )
        if not_match is not None and not_match == current_generation:
            raise GcsApiError(
                412,
                "At least one of the pre-conditions you specified did not hold.",
                reason="conditionNotMet",
            )

    def to_json(self) -> dict[str, int | None]:
        return {
            "ifGenerationMatch": self.if_generation_match,
            "ifGenerationNotMatch": self.if_generation_not_match,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, int | None]) -> Preconditions:
        return cls(data.get("ifGenerationMatch"), data.get("ifGenerationNotMatch"))


@dataclass(frozen=True)
class BucketInfo:
    name: str
    time_created: datetime

    def resource(self) -> dict[str, Any]:
        created = _rfc3339(self.time_created)
        return {
            "kind": "storage#bucket",
            "id": self.name,
            "name": self.name,
            "projectNumber": "0",
            "metageneration": "1",
            "location": "US",
            "storageClass": "STANDARD",
            "etag": "CAE=",
            "timeCreated": created,
            "updated": created,
        }


@dataclass(frozen=True)
class ObjectInfo:
    """One object generation's metadata."""

    bucket: str
    name: str
    generation: int
    size: int
    content_type: str
    crc32c: str
    md5_hash: str | None  # None if the server does not compute MD5s
    time_created: datetime
    metadata: Mapping[str, str] = field(default_factory=dict)
    metageneration: int = 1

    def resource(self, base_url: str) -> dict[str, Any]:
        """The JSON API representation; links point at ``base_url`` (as the client saw us)."""
        quoted = quote(self.name, safe="")
        created = _rfc3339(self.time_created)
        resource: dict[str, Any] = {
            "kind": "storage#object",
            "id": f"{self.bucket}/{self.name}/{self.generation}",
            "selfLink": f"{base_url}/storage/v1/b/{self.bucket}/o/{quoted}",
            "mediaLink": (
                f"{base_url}/download/storage/v1/b/{self.bucket}/o/{quoted}"
                f"?generation={self.generation}&alt=media"
            ),
            "name": self.name,
            "bucket": self.bucket,
            "generation": str(self.generation),
            "metageneration": str(self.metageneration),
            "contentType": self.content_type,
            "storageClass": "STANDARD",
            "size": str(self.size),
            "crc32c": self.crc32c,
            "etag": base64.b64encode(str(self.generation).encode()).decode(),
            "timeCreated": created,
            "updated": created,
            "timeStorageClassUpdated": created,
        }
        if self.md5_hash is not None:
            resource["md5Hash"] = self.md5_hash
        if self.metadata:
            resource["metadata"] = dict(self.metadata)
        return resource

    def to_json(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "name": self.name,
            "generation": self.generation,
            "size": self.size,
            "contentType": self.content_type,
            "crc32c": self.crc32c,
            "md5Hash": self.md5_hash,
            "timeCreated": self.time_created.isoformat(),
            "metadata": dict(self.metadata),
            "metageneration": self.metageneration,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ObjectInfo:
        return cls(
            bucket=data["bucket"],
            name=data["name"],
            generation=int(data["generation"]),
            size=int(data["size"]),
            content_type=data["contentType"],
            crc32c=data["crc32c"],
            md5_hash=data.get("md5Hash"),
            time_created=datetime.fromisoformat(data["timeCreated"]),
            metadata=dict(data.get("metadata", {})),
            metageneration=int(data.get("metageneration", 1)),
        )


@dataclass(frozen=True)
class SessionInfo:
    """A snapshot of one upload session, for tests and operators (no upload id shown)."""

    bucket: str
    name: str
    persisted_size: int
    total_size: int | None
    finalized: bool


class UploadSession:
    """One resumable upload: bytes ``[0, persisted_size)`` are stored, in order.

    Callers hold :attr:`lock` across a read-decide-append sequence. Neither this class
    nor :class:`Store` takes it, so it is never taken twice.
    """

    def __init__(
        self,
        upload_id: str,
        *,
        bucket: str,
        name: str,
        content_type: str,
        metadata: Mapping[str, str],
        declared_size: int | None,
        preconditions: Preconditions,
        part_path: Path | None,
        compute_md5: bool = True,
    ) -> None:
        self.upload_id = upload_id
        self.bucket = bucket
        self.name = name
        self.content_type = content_type
        self.metadata = dict(metadata)
        self.declared_size = declared_size
        self.preconditions = preconditions
        self.lock = threading.Lock()
        self.total_size: int | None = declared_size
        self.result: ObjectInfo | None = None
        #: the highest persisted size ever reported to a client (a lying fault goes below)
        self.acknowledged_size = 0
        self._segments: list[memoryview] = []
        self._size = 0
        self.digest = RunningDigest(md5=compute_md5)
        # On disk the part file is opened per operation: no handle outlives a request.
        self._part_path = part_path
        if part_path is not None:
            part_path.touch()
            self._size = part_path.stat().st_size
            for block in self._iter_blocks():
                self.digest.update(block)

    @property
    def persisted_size(self) -> int:
        return self._size

    def append(self, data: bytes | bytearray | memoryview, *, digest: bool = True) -> None:
        """Store ``data`` at :attr:`persisted_size`, taking ownership of it.

        In memory the session keeps ``data`` itself, not a copy, so chunk ingest costs one
        copy (kernel to request buffer). The caller must never change ``data`` afterwards;
        request bodies are fresh buffers, so this holds. ``digest=False`` skips hashing:
        for the final block, whose digest the caller already has.
        """
        if self.result is not None:
            raise GcsApiError(400, "upload already finalized")
        view = memoryview(data)
        if not view.nbytes:
            return
        if self._part_path is not None:
            with open(self._part_path, "ab") as part:
                part.write(view)
                part.flush()
                os.fsync(part.fileno())
        else:
            if view.nbytes * 2 < memoryview(view.obj).nbytes:
                # A small part of a big request buffer (the new tail of a resent chunk):
                # copy it, rather than keep the whole buffer alive for as long as the object.
                view = memoryview(bytes(view))
            self._segments.append(view)
        if digest:
            self.digest.update(view)
        self._size += view.nbytes

    def segments(self) -> tuple[memoryview, ...]:
        """The stored bytes, in order, as held in memory (empty on disk)."""
        return tuple(self._segments)

    def _iter_blocks(self) -> Iterator[bytes | memoryview]:
        if self._part_path is None:
            yield from self._segments
            return
        with open(self._part_path, "rb") as part:
            remaining = self._size
            while remaining:
                block = part.read(min(remaining, 8 << 20))
                if not block:
                    break
                remaining -= len(block)
                yield block

    @classmethod
    def finished(cls, upload_id: str, result: ObjectInfo) -> UploadSession:
        """A session that finalized into ``result``, rebuilt from that record alone.

        It holds no bytes and refuses more; every request on it answers with ``result``.
        """
        session = cls(
            upload_id,
            bucket=result.bucket,
            name=result.name,
            content_type=result.content_type,
            metadata=result.metadata,
            declared_size=result.size,
            preconditions=Preconditions(),
            part_path=None,
            compute_md5=False,
        )
        session._size = session.acknowledged_size = result.size
        session.result = result
        return session

    def snapshot(self) -> SessionInfo:
        return SessionInfo(
            self.bucket, self.name, self._size, self.total_size, self.result is not None
        )

    def discard(self) -> None:
        """Drop the bytes held in memory (the session is being deleted or finalized)."""
        self._segments = []


class Store:
    """Buckets, objects and upload sessions, in memory or under ``data_dir``. Thread-safe.

    ``compute_md5=False`` leaves objects without ``md5Hash`` (see :class:`RunningDigest`);
    an upload that asks for an MD5 check is then refused rather than passed unchecked.
    """

    def __init__(
        self, data_dir: str | os.PathLike[str] | None = None, *, compute_md5: bool = True
    ) -> None:
        self.compute_md5 = compute_md5
        self._lock = threading.Lock()
        self._buckets: dict[str, BucketInfo] = {}
        self._objects: dict[str, dict[str, ObjectInfo]] = {}
        # In memory an object is the blocks it arrived in: finalizing copies nothing.
        self._data: dict[tuple[str, str], tuple[bytes | memoryview, ...]] = {}
        self._sessions: dict[str, UploadSession] = {}  # in progress
        self._finished: dict[str, ObjectInfo] = {}  # upload id -> what it finalized into
        self._last_generation = 0
        self.data_dir = Path(data_dir) if data_dir is not None else None
        if self.data_dir is not None:
            for sub in ("buckets", "sessions", "tmp"):
                (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
            self._load()

    # -- disk layout --------------------------------------------------------------------

    def _bucket_dir(self, bucket: str) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "buckets" / quote(bucket, safe="")

    def _object_path(self, bucket: str, name: str) -> Path:
        return self._bucket_dir(bucket) / quote(name, safe="")

    def _load(self) -> None:
        assert self.data_dir is not None
        for bucket_dir in sorted((self.data_dir / "buckets").iterdir()):
            bucket = unquote(bucket_dir.name)
            created = datetime.fromtimestamp(bucket_dir.stat().st_mtime, UTC)
            self._buckets[bucket] = BucketInfo(bucket, created)
            objects = self._objects.setdefault(bucket, {})
            for path in bucket_dir.iterdir():
                with open(path, "rb") as file:
                    info = _read_trailer(file)
                objects[info.name] = info
                self._last_generation = max(self._last_generation, info.generation)
        for temp in (self.data_dir / "tmp").iterdir():
            temp.unlink()  # leftovers of a crash mid-write; never visible as objects
        for state_path in (self.data_dir / "sessions").glob("*.json"):
            state = json.loads(state_path.read_text())
            upload_id = state_path.stem
            self._sessions[upload_id] = UploadSession(
                upload_id,
                bucket=state["bucket"],
                name=state["name"],
                content_type=state["contentType"],
                metadata=state["metadata"],
                declared_size=state["declaredSize"],
                preconditions=Preconditions.from_json(state["preconditions"]),
                part_path=state_path.with_suffix(".part"),
                compute_md5=self.compute_md5,
            )

    # -- buckets ------------------------------------------------------------------------

    def create_bucket(self, name: str) -> BucketInfo:
        if not name or "/" in name or len(name) > 222:
            raise GcsApiError(400, f"Invalid bucket name: {name!r}")
        with self._lock:
            if name in self._buckets:
                raise GcsApiError(409, f"Bucket {name} already exists.", reason="conflict")
            if self.data_dir is not None:
                self._bucket_dir(name).mkdir()
            info = BucketInfo(name, datetime.now(UTC))
            self._buckets[name] = info
            self._objects[name] = {}
            return info

    def get_bucket(self, name: str) -> BucketInfo:
        with self._lock:
            return self._bucket(name)

    def _bucket(self, name: str) -> BucketInfo:
        try:
            return self._buckets[name]
        except KeyError:
            raise GcsApiError(404, f"Bucket {name} not found.", reason="notFound") from None

    def list_buckets(self) -> list[BucketInfo]:
        with self._lock:
            return sorted(self._buckets.values(), key=lambda b: b.name)

    def delete_bucket(self, name: str) -> None:
        with self._lock:
            self._bucket(name)
            if self._objects[name]:
                raise GcsApiError(409, f"Bucket {name} is not empty.", reason="conflict")
            del self._buckets[name], self._objects[name]
            if self.data_dir is not None:
                self._bucket_dir(name).rmdir()

    # -- objects ------------------------------------------------------------------------

    def _next_generation(self) -> int:
        # GCS generations are microsecond timestamps; keep them strictly increasing.
        self._last_generation = max(self._last_generation + 1, time.time_ns() // 1000)
        return self._last_generation

    def _live_generation(self, bucket: str, name: str) -> int:
        self._bucket(bucket)
        info = self._objects[bucket].get(name)
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
        preconditions: Preconditions = Preconditions(),
        expected_crc32c: str | None = None,
        expected_md5: str | None = None,
    ) -> ObjectInfo:
        """Create a new generation of ``bucket/name`` from ``data`` in one step."""
        _check_name(name)
        content = bytes(data)
        crc32c = encode_crc32c(google_crc32c.value(content))
        md5 = encode_md5(hashlib.md5(content).digest()) if self.compute_md5 else None
        _check_hashes(crc32c, md5, expected_crc32c, expected_md5)
        with self._lock:
            preconditions.check(self._live_generation(bucket, name))
            info = self._new_info(bucket, name, len(content), content_type, crc32c, md5, metadata)
            if self.data_dir is None:
                self._data[bucket, name] = (content,)
            else:
                temp = self._temp_path()
                with open(temp, "wb") as file:
                    file.write(content)
                    _write_trailer(file, info)
                _publish(temp, self._object_path(bucket, name))
            self._objects[bucket][name] = info
            return info

    def _new_info(
        self,
        bucket: str,
        name: str,
        size: int,
        content_type: str,
        crc32c: str,
        md5: str | None,
        metadata: Mapping[str, str] | None,
    ) -> ObjectInfo:
        return ObjectInfo(
            bucket=bucket,
            name=name,
            generation=self._next_generation(),
            size=size,
            content_type=content_type,
            crc32c=crc32c,
            md5_hash=md5,
            time_created=datetime.now(UTC),
            metadata=dict(metadata or {}),
        )

    def _temp_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "tmp" / secrets.token_hex(8)

    def lookup(self, bucket: str, name: str, generation: int | None = None) -> ObjectInfo:
        with self._lock:
            self._bucket(bucket)
            info = self._objects[bucket].get(name)
        if info is None or (generation is not None and generation != info.generation):
            raise GcsApiError(404, f"No such object: {bucket}/{name}", reason="notFound")
        return info

    def read(self, info: ObjectInfo) -> bytes:
        """The bytes of ``info``'s generation (404 if it has been replaced or deleted)."""
        if self.data_dir is None:
            with self._lock:
                current = self._objects.get(info.bucket, {}).get(info.name)
                data = self._data.get((info.bucket, info.name))
            if current is None or data is None or current.generation != info.generation:
                raise GcsApiError(
                    404, f"No such object: {info.bucket}/{info.name}", reason="notFound"
                )
            return data[0] if len(data) == 1 and isinstance(data[0], bytes) else b"".join(data)
        try:
            with open(self._object_path(info.bucket, info.name), "rb") as file:
                if _read_trailer(file).generation == info.generation:
                    file.seek(0)
                    return file.read(info.size)
        except FileNotFoundError:
            pass
        raise GcsApiError(404, f"No such object: {info.bucket}/{info.name}", reason="notFound")

    def get_object(self, bucket: str, name: str) -> tuple[bytes, dict[str, Any]]:
        """For tests: the live object's bytes and its JSON resource."""
        info = self.lookup(bucket, name)
        return self.read(info), info.resource("")

    def delete_object(
        self,
        bucket: str,
        name: str,
        preconditions: Preconditions = Preconditions(),
    ) -> None:
        with self._lock:
            generation = self._live_generation(bucket, name)
            if generation == 0:
                raise GcsApiError(404, f"No such object: {bucket}/{name}", reason="notFound")
            preconditions.check(generation)
            del self._objects[bucket][name]
            self._data.pop((bucket, name), None)
            if self.data_dir is not None:
                self._object_path(bucket, name).unlink()

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
        _check_name(name)
        upload_id = secrets.token_urlsafe(24)
        with self._lock:
            preconditions.check(self._live_generation(bucket, name))
            part_path = None
            if self.data_dir is not None:
                state = {
                    "bucket": bucket,
                    "name": name,
                    "contentType": content_type,
                    "metadata": dict(metadata),
                    "declaredSize": declared_size,
                    "preconditions": preconditions.to_json(),
                }
                sessions = self.data_dir / "sessions"
                part_path = sessions / f"{upload_id}.part"
                temp = self._temp_path()
                with open(temp, "wb") as file:
                    file.write(json.dumps(state).encode())
                    file.flush()
                    os.fsync(file.fileno())
                _publish(temp, sessions / f"{upload_id}.json")
            session = UploadSession(
                upload_id,
                bucket=bucket,
                name=name,
                content_type=content_type,
                metadata=metadata,
                declared_size=declared_size,
                preconditions=preconditions,
                part_path=part_path,
                compute_md5=self.compute_md5,
            )
            self._sessions[upload_id] = session
            return session

    def session(self, upload_id: str) -> UploadSession:
        """The session ``upload_id``; a finished one is rebuilt from its result (no bytes)."""
        with self._lock:
            session = self._sessions.get(upload_id)
            result = self._finished.get(upload_id)
        if session is not None:
            return session
        if result is not None:
            return UploadSession.finished(upload_id, result)
        raise GcsApiError(404, "No such upload session.", reason="notFound")

    def sessions(self) -> list[SessionInfo]:
        """Every session the endpoint answers for: in progress, then finished."""
        with self._lock:
            sessions = list(self._sessions.values())
            finished = list(self._finished.values())
        return [session.snapshot() for session in sessions] + [
            SessionInfo(info.bucket, info.name, info.size, info.size, finalized=True)
            for info in finished
        ]

    def delete_session(self, session: UploadSession) -> None:
        """Forget ``session``; later requests for it get 404. Caller holds its lock."""
        with self._lock:
            self._sessions.pop(session.upload_id, None)
            self._finished.pop(session.upload_id, None)
        session.discard()
        if self.data_dir is not None:
            sessions = self.data_dir / "sessions"
            for suffix in (".json", ".part"):
                with contextlib.suppress(FileNotFoundError):
                    (sessions / f"{session.upload_id}{suffix}").unlink()

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
        with self._lock:
            session.preconditions.check(self._live_generation(session.bucket, session.name))
        crc32c, md5 = session.digest.digests_with(tail)
        _check_hashes(crc32c, md5, expected_crc32c, expected_md5)
        with self._lock:
            session.preconditions.check(self._live_generation(session.bucket, session.name))
            session.append(tail, digest=False)
            info = self._new_info(
                session.bucket,
                session.name,
                session.persisted_size,
                session.content_type,
                crc32c,
                md5,
                session.metadata,
            )
            if self.data_dir is None:
                self._data[session.bucket, session.name] = session.segments()
            else:
                self._commit_part_file(session, info)
            self._objects[session.bucket][session.name] = info
            # Only the result stays; requests already holding ``session`` see it final.
            session.result = info
            self._sessions.pop(session.upload_id, None)
            self._finished[session.upload_id] = info
        session.discard()
        return info

    def _commit_part_file(self, session: UploadSession, info: ObjectInfo) -> None:
        assert self.data_dir is not None
        sessions = self.data_dir / "sessions"
        part_path = sessions / f"{session.upload_id}.part"
        session.discard()
        with open(part_path, "ab") as file:
            _write_trailer(file, info)
        _publish(part_path, self._object_path(info.bucket, info.name))
        # The finished session stays answerable (200 + metadata), from memory only.
        (sessions / f"{session.upload_id}.json").unlink()


def _check_name(name: str) -> None:
    if not name or len(name.encode()) > 1024 or "\n" in name or "\r" in name:
        raise GcsApiError(400, "Invalid object name.")


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


def _publish(source: Path, destination: Path) -> None:
    """Rename ``source`` (already fsynced) over ``destination`` and make the rename durable."""
    os.replace(source, destination)
    directory = os.open(destination.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _write_trailer(file: BinaryIO, info: ObjectInfo) -> None:
    trailer = json.dumps(info.to_json()).encode()
    file.write(trailer)
    file.write(_TRAILER_LENGTH.pack(len(trailer)))
    file.flush()
    os.fsync(file.fileno())


def _read_trailer(file: BinaryIO) -> ObjectInfo:
    file.seek(-_TRAILER_LENGTH.size, os.SEEK_END)
    (length,) = _TRAILER_LENGTH.unpack(file.read(_TRAILER_LENGTH.size))
    file.seek(-_TRAILER_LENGTH.size - length, os.SEEK_END)
    return ObjectInfo.from_json(json.loads(file.read(length)))
