"""What the endpoint stores, as values: buckets, object generations, sessions, preconditions.

These are plain frozen records with their JSON forms. Where they live (memory or disk)
is :mod:`faultnet.gcs.storage`'s business; the rules that change them are
:mod:`faultnet.gcs.store`'s.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from faultnet.gcs.errors import GcsApiError

__all__ = [
    "BucketInfo",
    "ComposeSource",
    "FinishedSession",
    "ObjectInfo",
    "Preconditions",
    "SessionInfo",
    "SessionParams",
]


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
    #: how many uploaded objects a composite object is made of; None if not composite
    component_count: int | None = None

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
        if self.component_count is not None:
            resource["componentCount"] = self.component_count
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
            "componentCount": self.component_count,
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
            component_count=data.get("componentCount"),
        )


@dataclass(frozen=True)
class SessionInfo:
    """A snapshot of one upload session, for tests and operators (no upload id shown)."""

    bucket: str
    name: str
    persisted_size: int
    total_size: int | None
    finalized: bool


@dataclass(frozen=True)
class ComposeSource:
    """One source of a compose: a live object, optionally pinned to a generation."""

    name: str
    generation: int | None = None
    if_generation_match: int | None = None


@dataclass(frozen=True)
class SessionParams:
    """What a resumable upload is fixed to when it starts (``created``: epoch seconds)."""

    bucket: str
    name: str
    content_type: str
    metadata: Mapping[str, str]
    declared_size: int | None
    preconditions: Preconditions
    created: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "bucket": self.bucket,
            "name": self.name,
            "contentType": self.content_type,
            "metadata": dict(self.metadata),
            "declaredSize": self.declared_size,
            "preconditions": self.preconditions.to_json(),
            "created": self.created,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SessionParams:
        return cls(
            bucket=data["bucket"],
            name=data["name"],
            content_type=data["contentType"],
            metadata=dict(data["metadata"]),
            declared_size=data["declaredSize"],
            preconditions=Preconditions.from_json(data["preconditions"]),
            created=float(data.get("created", 0.0)),
        )


@dataclass(frozen=True)
class FinishedSession:
    """What is left of a session once it finalized: its result, and when it started."""

    result: ObjectInfo
    created: float

    def to_json(self) -> dict[str, Any]:
        return {"finished": self.result.to_json(), "created": self.created}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FinishedSession:
        return cls(ObjectInfo.from_json(data["finished"]), float(data.get("created", 0.0)))
