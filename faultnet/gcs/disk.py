"""The on-disk :class:`~faultnet.gcs.storage.Storage`: buckets, objects and sessions in files.

An object is one file, ``<data><metadata JSON><8-byte big-endian JSON length>``, written
to ``tmp/``, fsynced and renamed into place, so a reader sees the old object or the new
one, never a half-written one. A session's bytes are appended to ``sessions/<id>.part``
(fsynced per chunk) next to a ``.json`` with its fixed parameters, so a restarted server
picks the session up where its part file ends; finalizing appends the metadata trailer
and renames the part file into place, so no byte is copied.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, unquote

from faultnet.gcs.model import BucketInfo, ObjectInfo, SessionParams
from faultnet.gcs.storage import Block, LoadedSession, LoadedState, SessionBytes

__all__ = ["DiskSessionBytes", "DiskStorage"]

_TRAILER_LENGTH = struct.Struct(">Q")
_READ_BLOCK = 8 << 20


class DiskSessionBytes:
    """A session's bytes in its part file, which is opened per operation.

    No handle outlives a request, so an abandoned session holds no file descriptor.
    """

    def __init__(self, part_path: Path) -> None:
        self.part_path = part_path
        part_path.touch()
        self._size = part_path.stat().st_size

    @property
    def size(self) -> int:
        return self._size

    def append(self, view: memoryview) -> None:
        with open(self.part_path, "ab") as part:
            part.write(view)
            part.flush()
            os.fsync(part.fileno())
        self._size += view.nbytes

    def blocks(self) -> Iterator[Block]:
        with open(self.part_path, "rb") as part:
            remaining = self._size
            while remaining:
                block = part.read(min(remaining, _READ_BLOCK))
                if not block:
                    break
                remaining -= len(block)
                yield block

    def segments(self) -> tuple[memoryview, ...]:
        return ()

    def discard(self) -> None:
        pass  # nothing is held in memory


class DiskStorage:
    """Everything under ``data_dir``: ``buckets/<bucket>/<object>``, ``sessions/``, ``tmp/``."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        for sub in ("buckets", "sessions", "tmp"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)

    # -- layout -------------------------------------------------------------------------

    def _bucket_dir(self, bucket: str) -> Path:
        return self.data_dir / "buckets" / quote(bucket, safe="")

    def _object_path(self, bucket: str, name: str) -> Path:
        return self._bucket_dir(bucket) / quote(name, safe="")

    def _sessions_dir(self) -> Path:
        return self.data_dir / "sessions"

    def _temp_path(self) -> Path:
        return self.data_dir / "tmp" / secrets.token_hex(8)

    # -- loading ------------------------------------------------------------------------

    def load(self) -> LoadedState:
        buckets: list[BucketInfo] = []
        objects: list[ObjectInfo] = []
        for bucket_dir in sorted((self.data_dir / "buckets").iterdir()):
            created = datetime.fromtimestamp(bucket_dir.stat().st_mtime, UTC)
            buckets.append(BucketInfo(unquote(bucket_dir.name), created))
            for path in bucket_dir.iterdir():
                with open(path, "rb") as file:
                    objects.append(_read_trailer(file))
        for temp in (self.data_dir / "tmp").iterdir():
            temp.unlink()  # leftovers of a crash mid-write; never visible as objects
        sessions = []
        for state_path in sorted(self._sessions_dir().glob("*.json")):
            params = SessionParams.from_json(json.loads(state_path.read_text()))
            held = DiskSessionBytes(state_path.with_suffix(".part"))
            sessions.append(LoadedSession(state_path.stem, params, held))
        return LoadedState(buckets, objects, sessions)

    # -- buckets ------------------------------------------------------------------------

    def add_bucket(self, bucket: BucketInfo) -> None:
        self._bucket_dir(bucket.name).mkdir()

    def remove_bucket(self, name: str) -> None:
        self._bucket_dir(name).rmdir()

    # -- objects ------------------------------------------------------------------------

    def write_object(
        self, info: ObjectInfo, blocks: Sequence[Block], replaced: ObjectInfo | None
    ) -> None:
        temp = self._temp_path()
        with open(temp, "wb") as file:
            for block in blocks:
                file.write(block)
            _write_trailer(file, info)
        _publish(temp, self._object_path(info.bucket, info.name))

    def read_object(self, info: ObjectInfo) -> bytes | None:
        try:
            with open(self._object_path(info.bucket, info.name), "rb") as file:
                if _read_trailer(file).generation == info.generation:
                    file.seek(0)
                    return file.read(info.size)
        except FileNotFoundError:
            pass
        return None

    def remove_object(self, info: ObjectInfo) -> None:
        self._object_path(info.bucket, info.name).unlink()

    # -- sessions -----------------------------------------------------------------------

    def open_session(self, upload_id: str, params: SessionParams) -> SessionBytes:
        temp = self._temp_path()
        with open(temp, "wb") as file:
            file.write(json.dumps(params.to_json()).encode())
            file.flush()
            os.fsync(file.fileno())
        _publish(temp, self._sessions_dir() / f"{upload_id}.json")
        return DiskSessionBytes(self._sessions_dir() / f"{upload_id}.part")

    def publish_session(
        self,
        upload_id: str,
        held: SessionBytes,
        info: ObjectInfo,
        replaced: ObjectInfo | None,
    ) -> None:
        part_path = self._sessions_dir() / f"{upload_id}.part"
        with open(part_path, "ab") as file:
            _write_trailer(file, info)
        _publish(part_path, self._object_path(info.bucket, info.name))
        # The finished session stays answerable (200 + metadata), from memory only.
        (self._sessions_dir() / f"{upload_id}.json").unlink()

    def remove_session(self, upload_id: str) -> None:
        for suffix in (".json", ".part"):
            with contextlib.suppress(FileNotFoundError):
                (self._sessions_dir() / f"{upload_id}{suffix}").unlink()


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
