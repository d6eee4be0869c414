"""The on-disk :class:`~faultnet.gcs.storage.Storage`: buckets, objects and sessions in files.

Layout under ``data_dir`` (directories 0700, files 0600)::

    buckets/<B>/bucket.json         the bucket's name and creation time
    buckets/<B>/<O>.json            object metadata: the live generation's ObjectInfo
    buckets/<B>/<O>.<generation>    that generation's bytes, and nothing else
    sessions/<S>.json               a session's parameters, or its result once finished
    sessions/<S>.part               the bytes a session in progress holds
    tmp/                            files being written; emptied at start

``B``, ``O`` and ``S`` are hashes of the bucket name, the object name and the upload id.
Names of any length or spelling (``..``, 1,024 bytes, anything GCS accepts) never reach
a path, and no path holds an upload id (a session URI is a bearer credential).

Every record is written to ``tmp/``, fsynced and renamed into place (then the directory
is fsynced), so it is the old record or the new one, never half of either. An object's
metadata file is its commit point: a data file no metadata names is garbage.

Finalizing a session, each step durable before the next, is crash-safe: a kill between
any two leaves a state that :meth:`DiskStorage.load` completes or rolls back.

1. ``tail-appended``: the last bytes are in the part file (the store did this).
2. ``data-linked``: the part file is hard-linked as the new data file (nothing copied).
   A crash here leaves an unnamed data file (removed at load); the session goes on.
3. ``object-published``: the metadata file names the new generation. This is the
   commit. The metadata records which session made it, so a load that finds that
   session still in progress finishes it instead.
4. ``old-data-removed``: the replaced generation's data file is gone.
5. ``session-finished``: the session's record becomes its result (so a status query
   after a restart still answers 200 with the object), and its part file is removed.

For the crash tests, ``RUP_GCS_CRASH_AT=<step>`` in the environment makes the process
SIGKILL itself right after that step (see :data:`CRASH_STEPS`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import signal
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from faultnet.gcs.model import BucketInfo, FinishedSession, ObjectInfo, SessionParams
from faultnet.gcs.storage import Block, LoadedSession, LoadedState, SessionBytes, StagedObject

__all__ = ["CRASH_AT_ENV", "CRASH_STEPS", "DiskSessionBytes", "DiskStorage"]

#: the environment variable that names the finalize step after which the process dies
CRASH_AT_ENV = "RUP_GCS_CRASH_AT"
CRASH_STEPS = (
    "tail-appended",
    "data-linked",
    "object-published",
    "old-data-removed",
    "session-finished",
)

_READ_BLOCK = 8 << 20
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_BUCKET_RECORD = "bucket.json"


def _digest(text: str) -> str:
    """A fixed-length file name for ``text`` (128 bits: no collision in practice)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class DiskSessionBytes:
    """A session's bytes in its part file, which is opened per operation.

    No handle outlives a request, so an abandoned session holds no file descriptor.
    """

    def __init__(self, part_path: Path) -> None:
        self.part_path = part_path
        os.close(os.open(part_path, os.O_WRONLY | os.O_CREAT, _FILE_MODE))
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


class _StagedFile:
    """A fsynced file in ``tmp/``, waiting to be renamed into place."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class DiskStorage:
    """Everything under ``data_dir``, laid out and committed as the module describes.

    ``crash_at`` (default: from ``RUP_GCS_CRASH_AT``) names a finalize step after which
    the process kills itself with SIGKILL; only crash tests set it.
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, crash_at: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self._crash_at = crash_at if crash_at is not None else os.environ.get(CRASH_AT_ENV)
        if self._crash_at is not None and self._crash_at not in CRASH_STEPS:
            raise ValueError(f"{CRASH_AT_ENV} must be one of {', '.join(CRASH_STEPS)}")
        self.data_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        for sub in ("buckets", "sessions", "tmp"):
            (self.data_dir / sub).mkdir(mode=_DIR_MODE, exist_ok=True)

    # -- layout -------------------------------------------------------------------------

    def _bucket_dir(self, bucket: str) -> Path:
        return self.data_dir / "buckets" / _digest(bucket)

    def _meta_path(self, bucket: str, name: str) -> Path:
        return self._bucket_dir(bucket) / f"{_digest(name)}.json"

    def _data_path(self, info: ObjectInfo) -> Path:
        return self._bucket_dir(info.bucket) / f"{_digest(info.name)}.{info.generation}"

    def _session_path(self, upload_id: str, suffix: str) -> Path:
        return self.data_dir / "sessions" / f"{_digest(upload_id)}{suffix}"

    def _crash_point(self, step: str) -> None:
        if step == self._crash_at:
            os.kill(os.getpid(), signal.SIGKILL)

    # -- loading ------------------------------------------------------------------------

    def load(self) -> LoadedState:
        for temp in (self.data_dir / "tmp").iterdir():
            temp.unlink()  # leftovers of a crash mid-write; never visible as anything
        buckets: list[BucketInfo] = []
        objects: list[ObjectInfo] = []
        made_by: dict[str, ObjectInfo] = {}  # session file stem -> object it published
        for bucket_dir in sorted((self.data_dir / "buckets").iterdir()):
            if not (bucket_dir / _BUCKET_RECORD).exists():
                # Killed between the directory and its record (creating or deleting the
                # bucket): the bucket does not exist, and the directory is empty.
                bucket_dir.rmdir()
                continue
            record = _read_json(bucket_dir / _BUCKET_RECORD)
            buckets.append(
                BucketInfo(record["name"], datetime.fromisoformat(record["timeCreated"]))
            )
            live_data: set[str] = set()
            for meta_path in bucket_dir.glob("*.json"):
                if meta_path.name == _BUCKET_RECORD:
                    continue
                meta = _read_json(meta_path)
                info = ObjectInfo.from_json(meta["object"])
                objects.append(info)
                live_data.add(f"{meta_path.stem}.{info.generation}")
                if meta.get("session"):
                    made_by[meta["session"]] = info
            for path in bucket_dir.iterdir():
                if path.suffix != ".json" and path.name not in live_data:
                    path.unlink()  # a generation never published, or one replaced
        sessions, finished = self._load_sessions(made_by)
        return LoadedState(buckets, objects, sessions, finished)

    def _load_sessions(
        self, made_by: dict[str, ObjectInfo]
    ) -> tuple[list[LoadedSession], dict[str, FinishedSession]]:
        sessions: list[LoadedSession] = []
        finished: dict[str, FinishedSession] = {}
        directory = self.data_dir / "sessions"
        known: set[str] = set()
        for state_path in sorted(directory.glob("*.json")):
            state = _read_json(state_path)
            upload_id = state["uploadId"]
            known.add(state_path.stem)
            if "finished" in state:
                record = FinishedSession.from_json(state)
            elif state_path.stem in made_by:
                # Killed after publishing, before recording it: the session is done.
                params = SessionParams.from_json(state["params"])
                record = FinishedSession(made_by[state_path.stem], params.created)
                self._record_finished(upload_id, record)
            else:
                params = SessionParams.from_json(state["params"])
                held = DiskSessionBytes(state_path.with_suffix(".part"))
                sessions.append(LoadedSession(upload_id, params, held))
                continue
            finished[upload_id] = record
            with contextlib.suppress(FileNotFoundError):
                state_path.with_suffix(".part").unlink()
        for part in directory.glob("*.part"):
            if part.stem not in known:
                part.unlink()  # no session owns it (deleted or expired, then a kill)
        return sessions, finished

    # -- buckets ------------------------------------------------------------------------

    def add_bucket(self, bucket: BucketInfo) -> None:
        directory = self._bucket_dir(bucket.name)
        directory.mkdir(mode=_DIR_MODE)
        record = {"name": bucket.name, "timeCreated": bucket.time_created.isoformat()}
        self._write_atomically(directory / _BUCKET_RECORD, record)

    def remove_bucket(self, name: str) -> None:
        directory = self._bucket_dir(name)
        (directory / _BUCKET_RECORD).unlink()
        directory.rmdir()

    # -- objects ------------------------------------------------------------------------

    def stage_object(self, blocks: Iterable[Block]) -> StagedObject:
        staged = _StagedFile(self._temp_path())
        try:
            with _create(staged.path) as file:
                for block in blocks:
                    file.write(block)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            staged.discard()
            raise
        return staged

    def write_object(
        self, info: ObjectInfo, staged: StagedObject, replaced: ObjectInfo | None
    ) -> None:
        if not isinstance(staged, _StagedFile):
            raise TypeError("staged by another storage")
        _rename_durably(staged.path, self._data_path(info))
        self._publish(info, session=None, replaced=replaced)

    def _publish(
        self,
        info: ObjectInfo,
        *,
        session: str | None,
        replaced: ObjectInfo | None,
        crash_points: bool = False,
    ) -> None:
        """Commit ``info`` (its data file is in place), then drop the replaced generation."""
        meta = {"object": info.to_json(), "session": session}
        self._write_atomically(self._meta_path(info.bucket, info.name), meta)
        if crash_points:
            self._crash_point("object-published")
        if replaced is not None:
            with contextlib.suppress(FileNotFoundError):
                self._data_path(replaced).unlink()
        if crash_points:
            self._crash_point("old-data-removed")

    def read_object(self, info: ObjectInfo) -> bytes | None:
        try:
            with open(self._data_path(info), "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None

    def object_blocks(self, info: ObjectInfo) -> Iterator[Block] | None:
        try:
            file = open(self._data_path(info), "rb")  # noqa: SIM115 - closed by _read_blocks
        except FileNotFoundError:
            return None
        return _read_blocks(file)

    def remove_object(self, info: ObjectInfo) -> None:
        # The metadata first: once it is gone the object is, whatever a kill leaves.
        self._meta_path(info.bucket, info.name).unlink()
        _fsync_directory(self._bucket_dir(info.bucket))
        with contextlib.suppress(FileNotFoundError):
            self._data_path(info).unlink()

    # -- sessions -----------------------------------------------------------------------

    def open_session(self, upload_id: str, params: SessionParams) -> SessionBytes:
        state = {"uploadId": upload_id, "params": params.to_json()}
        self._write_atomically(self._session_path(upload_id, ".json"), state)
        return DiskSessionBytes(self._session_path(upload_id, ".part"))

    def publish_session(
        self,
        upload_id: str,
        held: SessionBytes,
        finished: FinishedSession,
        replaced: ObjectInfo | None,
    ) -> None:
        info = finished.result
        self._crash_point("tail-appended")
        part = self._session_path(upload_id, ".part")
        data = self._data_path(info)
        os.link(part, data)
        _fsync_directory(data.parent)
        self._crash_point("data-linked")
        self._publish(info, session=part.stem, replaced=replaced, crash_points=True)
        self._record_finished(upload_id, finished)
        self._crash_point("session-finished")
        part.unlink()

    def _record_finished(self, upload_id: str, finished: FinishedSession) -> None:
        record = {"uploadId": upload_id, **finished.to_json()}
        self._write_atomically(self._session_path(upload_id, ".json"), record)

    def remove_session(self, upload_id: str) -> None:
        # The record first: a part file without one is removed at the next start.
        for suffix in (".json", ".part"):
            with contextlib.suppress(FileNotFoundError):
                self._session_path(upload_id, suffix).unlink()

    # -- files --------------------------------------------------------------------------

    def _temp_path(self) -> Path:
        return self.data_dir / "tmp" / secrets.token_hex(8)

    def _write_atomically(self, path: Path, document: dict[str, Any]) -> None:
        temp = self._temp_path()
        with _create(temp) as file:
            file.write(json.dumps(document).encode())
            file.flush()
            os.fsync(file.fileno())
        _rename_durably(temp, path)


def _read_blocks(file: io.BufferedReader) -> Iterator[Block]:
    """The rest of ``file`` in blocks; an open file stays readable if it is unlinked."""
    with file:
        while block := file.read(_READ_BLOCK):
            yield block


def _create(path: Path) -> io.BufferedWriter:
    """A new file at ``path``, mode 0600 whatever the umask, open for binary writing."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE), "wb")


def _read_json(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_bytes())
    return document


def _rename_durably(source: Path, destination: Path) -> None:
    """Rename ``source`` (already fsynced) over ``destination`` and make the rename durable."""
    os.replace(source, destination)
    _fsync_directory(destination.parent)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
