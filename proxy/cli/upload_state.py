"""Where ``rup upload FILE`` remembers an unfinished upload, so that rerunning it resumes.

One small JSON file per (file, destination) in the per-user state directory
(``$XDG_STATE_HOME/rup/``, by default ``~/.local/state/rup/``): the upload token, the file's
identity (path, size, mtime, inode, device), the destination and the byte ranges the proxy
confirmed. The directory is 0700 and each file 0600, since the token lets its holder write
the object; file names are a hash, so no name or token shows in a listing. A file is written
whole to a temporary name and renamed, so a kill never leaves half of one behind.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = ["FileIdentity", "ResumeRecord", "ResumeStore"]

_FORMAT: Final = 1


@dataclass(frozen=True)
class FileIdentity:
    """What makes a file "the same file" between two runs: a change in any field restarts."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileIdentity:
        status = os.stat(path)
        return cls(
            path=os.path.realpath(path),
            size=status.st_size,
            mtime_ns=status.st_mtime_ns,
            inode=status.st_ino,
            device=status.st_dev,
        )


@dataclass(frozen=True)
class ResumeRecord:
    """One unfinished upload of a file."""

    identity: FileIdentity
    url: str
    token: bytes = field(repr=False)
    #: byte ranges the proxy had acknowledged when this was written (the proxy's own Status
    #: decides what is sent on resume; these say how far the last run got)
    confirmed: tuple[tuple[int, int], ...] = ()

    @property
    def confirmed_bytes(self) -> int:
        return sum(end - start for start, end in self.confirmed)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "url": self.url,
            "token": base64.b64encode(self.token).decode(),
            "file": {
                "path": self.identity.path,
                "size": self.identity.size,
                "mtime_ns": self.identity.mtime_ns,
                "inode": self.identity.inode,
                "device": self.identity.device,
            },
            "confirmed": [list(piece) for piece in self.confirmed],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResumeRecord:
        """The record, or ValueError/KeyError/TypeError if ``data`` is not one."""
        if data.get("format") != _FORMAT:
            raise ValueError(f"unknown state format {data.get('format')!r}")
        file = data["file"]
        identity = FileIdentity(
            path=str(file["path"]),
            size=int(file["size"]),
            mtime_ns=int(file["mtime_ns"]),
            inode=int(file["inode"]),
            device=int(file["device"]),
        )
        confirmed = tuple((int(start), int(end)) for start, end in data["confirmed"])
        token = base64.b64decode(data["token"], validate=True)
        return cls(identity=identity, url=str(data["url"]), token=token, confirmed=confirmed)


class ResumeStore:
    """The state directory: load, save and remove records by (file, destination)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def default(cls) -> ResumeStore:
        """``$XDG_STATE_HOME/rup``, or ``~/.local/state/rup`` when that is unset or relative."""
        base = os.environ.get("XDG_STATE_HOME", "")
        root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
        return cls(root / "rup")

    def _path(self, source: str | os.PathLike[str], url: str) -> Path:
        key = f"{os.path.realpath(source)}\n{url}".encode("utf-8", "surrogateescape")
        return self.directory / f"upload-{hashlib.sha256(key).hexdigest()[:32]}.json"

    def load(self, source: str | os.PathLike[str], url: str) -> ResumeRecord | None:
        """The record for uploading ``source`` to ``url``; None if there is none (or it is
        unreadable, in which case it is removed)."""
        path = self._path(source, url)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            record = ResumeRecord.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            self.remove(source, url)  # damaged: a fresh upload is the only safe course
            return None
        return record if record.url == url else None

    def save(self, record: ResumeRecord) -> None:
        """Write ``record`` (mode 0600, in a 0700 directory), replacing any earlier one."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._path(record.identity.path, record.url)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                json.dump(record.to_json(), file)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise

    def remove(self, source: str | os.PathLike[str], url: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(source, url).unlink()
