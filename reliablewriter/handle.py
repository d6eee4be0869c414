"""``ResumeHandle``: what another process needs to continue an upload.

Like gsutil's tracker files and the Go Writer's session takeover: the session URI plus
the offset GCS has committed. Whoever resumes opens a writer with
``session_uri=handle.session_uri`` (``open_writer``, ``open_async_writer``, or
``open_blob(..., resume=handle)``), which asks GCS for the committed offset again (the
handle's may be stale by whatever was acknowledged after it was taken), and resends
from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .writer import ReliableWriter

__all__ = ["ResumeHandle"]


@dataclass(frozen=True)
class ResumeHandle:
    """An unfinished upload of ``bucket/name``, resumable from ``committed_offset``.

    ``session_uri`` is a secret (it grants writing the object): it is left out of the
    repr, and :meth:`to_json` text must be stored like a credential.
    """

    bucket: str
    name: str
    committed_offset: int
    session_uri: str = field(repr=False)

    @classmethod
    def of(cls, bucket: str, writer: ReliableWriter) -> ResumeHandle:
        """The handle of ``writer``'s session now (raises if it has no session yet)."""
        return cls(
            bucket=bucket,
            name=writer.name,
            committed_offset=writer.committed_offset,
            session_uri=writer.session_uri,
        )

    def to_json(self) -> str:
        """The handle as JSON text, for another process (see :meth:`from_json`)."""
        return json.dumps(
            {
                "bucket": self.bucket,
                "name": self.name,
                "committed_offset": self.committed_offset,
                "session_uri": self.session_uri,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ResumeHandle:
        """Read a handle written by :meth:`to_json`; raises ValueError if malformed."""
        try:
            fields = json.loads(text)
            handle = cls(
                bucket=str(fields["bucket"]),
                name=str(fields["name"]),
                committed_offset=int(fields["committed_offset"]),
                session_uri=str(fields["session_uri"]),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError("not a resume handle") from exc
        if handle.committed_offset < 0:
            raise ValueError("a resume handle's committed offset is never negative")
        return handle
