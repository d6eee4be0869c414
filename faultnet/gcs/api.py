"""The GCS JSON API surface: routing, request handlers and where scripted faults apply.

Each request is routed to a JSON API method name (``storage.objects.insert``, ...) and a
handler. The scripted fault waiting for that method (see :mod:`faultnet.gcs.retry_test`)
travels with the request in an :class:`Exchange`; handlers return a :class:`Reply` that
says how the response goes out (whole, paused, cut short, or not at all: reset).

Handlers read the request body themselves, because what a body means (and what a cut-off
one leaves behind) depends on the method. Nothing here touches sockets directly.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from faultnet.gcs.errors import GcsApiError
from faultnet.gcs.http11 import Body, HttpConnection, Request, Response
from faultnet.gcs.model import ComposeSource, ObjectInfo, Preconditions
from faultnet.gcs.resumable import (
    UPLOAD_QUANTUM,
    ChunkOutcome,
    ContentRange,
    apply_chunk,
    range_header,
)
from faultnet.gcs.retry_test import (
    BrokenFinalResponse,
    BrokenStream,
    FailAfterBytes,
    Instruction,
    RangeRegression,
    ResetConnection,
    RetryTests,
    ReturnStatus,
    ShortRange,
    StallAfterBytes,
)
from faultnet.gcs.store import Store, UploadSession

__all__ = ["Exchange", "GcsApi", "Reply"]

_JSON = "application/json; charset=UTF-8"
_I = TypeVar("_I", bound=Instruction)
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?')


@dataclass
class Exchange:
    """One request on its way through the API, with the fault scripted for it, if any."""

    request: Request
    connection: HttpConnection
    base_url: str
    method: str
    test_id: str | None
    instruction: Instruction | None
    retry_tests: RetryTests

    def claim(self, kind: type[_I]) -> _I | None:
        """Consume the waiting instruction if it is a ``kind``; None if not (or taken)."""
        instruction = self.instruction
        if not isinstance(instruction, kind) or self.test_id is None:
            return None
        if not self.retry_tests.consume(self.test_id, self.method, instruction):
            return None
        self.instruction = None
        return instruction


@dataclass(frozen=True)
class Reply:
    """A response and how to deliver it."""

    response: Response
    cut_after: int | None = None  # send this many body bytes, then close
    pause_at: int | None = None  # stall after this many body bytes ...
    pause_seconds: float = 0.0  # ... for this long
    reset: bool = False  # send nothing: RST the connection


def _json_reply(status: int, document: Mapping[str, Any] | list[Any]) -> Reply:
    return Reply(Response(status, json.dumps(document).encode(), content_type=_JSON))


def _empty_reply(status: int, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(Response(status, b"", headers, content_type=None))


def _read_json(exchange: Exchange) -> dict[str, Any]:
    body = _read_whole_body(exchange)
    if not body:
        return {}
    try:
        document = json.loads(bytes(body))
    except ValueError as exc:
        raise GcsApiError(400, "request body is not valid JSON") from exc
    if not isinstance(document, dict):
        raise GcsApiError(400, "request body must be a JSON object")
    return document


def _read_whole_body(exchange: Exchange) -> memoryview:
    body = exchange.connection.read_body()
    if not body.complete:
        raise GcsApiError(400, "request body cut short")
    return body.data


def _parse_goog_hash(header: str | None) -> tuple[str | None, str | None]:
    """(crc32c, md5) from ``x-goog-hash: crc32c=...,md5=...``."""
    crc32c = md5 = None
    for item in (header or "").split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "crc32c":
            crc32c = value
        elif key == "md5":
            md5 = value
    return crc32c, md5


def _hash_header(info: ObjectInfo) -> tuple[str, str]:
    if info.md5_hash is None:
        return ("X-Goog-Hash", f"crc32c={info.crc32c}")
    return ("X-Goog-Hash", f"crc32c={info.crc32c},md5={info.md5_hash}")


class GcsApi:
    """Routes requests and handles them against a :class:`~faultnet.gcs.store.Store`."""

    def __init__(
        self,
        store: Store,
        retry_tests: RetryTests,
        *,
        sleep: Callable[[float], None],
        persist_granularity: int = UPLOAD_QUANTUM,
    ) -> None:
        self.store = store
        self.retry_tests = retry_tests
        self.sleep = sleep
        self.persist_granularity = persist_granularity

    # -- routing ------------------------------------------------------------------------

    def route(self, request: Request) -> tuple[str, Callable[[Exchange], Reply]]:
        """The JSON API method name (empty for the retry-test API) and handler."""
        segments = [unquote(s, errors="surrogateescape") for s in request.path.split("/")[1:]]
        verb = request.method
        if segments[:1] in (["retry_test"], ["retry_tests"]):
            return "", self._retry_test_api
        if segments[:3] == ["storage", "v1", "b"]:
            rest = segments[3:]
            if not rest or rest == [""]:
                return _pick(
                    verb,
                    {
                        "GET": ("storage.buckets.list", self._list_buckets),
                        "POST": ("storage.buckets.insert", self._insert_bucket),
                    },
                )
            if len(rest) == 1:
                return _pick(
                    verb,
                    {
                        "GET": ("storage.buckets.get", self._get_bucket),
                        "DELETE": ("storage.buckets.delete", self._delete_bucket),
                    },
                )
            if rest[1] == "o" and len(rest) == 2:
                return _pick(verb, {"GET": ("storage.objects.list", self._list_objects)})
            if rest[1] == "o" and len(rest) >= 4 and rest[-1] == "compose" and verb == "POST":
                return "storage.objects.compose", self._compose
            if rest[1] == "o":
                return _pick(
                    verb,
                    {
                        "GET": ("storage.objects.get", self._get_object),
                        "DELETE": ("storage.objects.delete", self._delete_object),
                    },
                )
        if segments[:4] == ["download", "storage", "v1", "b"] and segments[5:6] == ["o"]:
            return _pick(verb, {"GET": ("storage.objects.get", self._download)})
        if segments[:4] == ["upload", "storage", "v1", "b"] and segments[5:] == ["o"]:
            if "upload_id" in request.query:
                return _pick(
                    verb,
                    {
                        "PUT": ("storage.objects.insert", self._upload_chunk),
                        "POST": ("storage.objects.insert", self._upload_chunk),
                        "DELETE": ("storage.objects.insert", self._cancel_upload),
                    },
                )
            return _pick(verb, {"POST": ("storage.objects.insert", self._insert_object)})
        return "", _not_found

    def handle(self, exchange: Exchange, handler: Callable[[Exchange], Reply]) -> Reply:
        """Apply the faults every method shares, then run ``handler``."""
        if exchange.claim(ResetConnection):
            return Reply(Response(500), reset=True)
        forced = exchange.claim(ReturnStatus)
        if forced is not None:
            exchange.connection.discard_body()
            upload_id = exchange.request.query.get("upload_id")
            if forced.status == 410 and upload_id is not None:
                self._expire_session(upload_id)
            raise GcsApiError(
                forced.status, f"Retry Test: Caused a {forced.status}", reason="retryTest"
            )
        reply = handler(exchange)
        broken = exchange.claim(BrokenStream)
        if broken is not None:
            return Reply(reply.response, cut_after=broken.after_bytes)
        return reply

    def _expire_session(self, upload_id: str) -> None:
        try:
            session = self.store.session(upload_id)
        except GcsApiError:
            return
        with session.lock:
            self.store.delete_session(session)

    # -- retry-test API -----------------------------------------------------------------

    def _retry_test_api(self, exchange: Exchange) -> Reply:
        request = exchange.request
        segments = request.path.strip("/").split("/")
        if segments == ["retry_tests"] and request.method == "GET":
            return _json_reply(200, {"retry_test": self.retry_tests.list()})
        if segments == ["retry_test"] and request.method == "POST":
            document = _read_json(exchange)
            created = self.retry_tests.create(
                document.get("instructions") or {}, str(document.get("transport", "HTTP"))
            )
            return _json_reply(200, created)
        if len(segments) == 2 and segments[0] == "retry_test":
            if request.method == "GET":
                return _json_reply(200, self.retry_tests.get(segments[1]))
            if request.method == "DELETE":
                self.retry_tests.delete(segments[1])
                return _empty_reply(200)
        raise GcsApiError(404, "no such retry-test resource", reason="notFound")

    # -- buckets ------------------------------------------------------------------------

    def _list_buckets(self, exchange: Exchange) -> Reply:
        items = [bucket.resource() for bucket in self.store.list_buckets()]
        return _json_reply(200, {"kind": "storage#buckets", "items": items})

    def _insert_bucket(self, exchange: Exchange) -> Reply:
        name = _read_json(exchange).get("name")
        if not isinstance(name, str):
            raise GcsApiError(400, "bucket name is required")
        return _json_reply(200, self.store.create_bucket(name).resource())

    def _get_bucket(self, exchange: Exchange) -> Reply:
        return _json_reply(200, self.store.get_bucket(_bucket_of(exchange)).resource())

    def _delete_bucket(self, exchange: Exchange) -> Reply:
        self.store.delete_bucket(_bucket_of(exchange))
        return _empty_reply(204)

    # -- objects ------------------------------------------------------------------------

    def _list_objects(self, exchange: Exchange) -> Reply:
        query = exchange.request.query
        bucket = _bucket_of(exchange)
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        start_after = _decode_page_token(query.get("pageToken"))
        try:
            max_results = int(query.get("maxResults", "1000"))
        except ValueError:
            raise GcsApiError(400, "Invalid maxResults") from None
        items: list[dict[str, Any]] = []
        prefixes: list[str] = []
        last_name = None
        truncated = False
        for info in self.store.list_objects(bucket, prefix):
            if start_after is not None and info.name <= start_after:
                continue
            if len(items) + len(prefixes) >= max_results:
                truncated = True
                break
            if delimiter:
                cut = info.name.find(delimiter, len(prefix))
                if cut >= 0:
                    common = info.name[: cut + len(delimiter)]
                    if common not in prefixes:
                        prefixes.append(common)
                    last_name = info.name
                    continue
            items.append(info.resource(exchange.base_url))
            last_name = info.name
        document: dict[str, Any] = {"kind": "storage#objects", "items": items}
        if prefixes:
            document["prefixes"] = prefixes
        if truncated and last_name is not None:
            document["nextPageToken"] = base64.urlsafe_b64encode(last_name.encode()).decode()
        return _json_reply(200, document)

    def _lookup(self, exchange: Exchange) -> ObjectInfo:
        query = exchange.request.query
        generation_text = query.get("generation")
        generation = None
        if generation_text is not None:
            if not generation_text.isdigit():
                raise GcsApiError(400, f"Invalid generation: {generation_text!r}")
            generation = int(generation_text)
        bucket, name = _object_of(exchange)
        info = self.store.lookup(bucket, name, generation)
        Preconditions.from_query(query).check(info.generation)
        return info

    def _get_object(self, exchange: Exchange) -> Reply:
        if exchange.request.query.get("alt") == "media":
            return self._download(exchange)
        return _json_reply(200, self._lookup(exchange).resource(exchange.base_url))

    def _download(self, exchange: Exchange) -> Reply:
        info = self._lookup(exchange)
        data = memoryview(self.store.read(info))
        headers = [
            _hash_header(info),
            ("X-Goog-Generation", str(info.generation)),
            ("X-Goog-Metageneration", str(info.metageneration)),
            ("X-Goog-Stored-Content-Length", str(info.size)),
            ("X-Goog-Stored-Content-Encoding", "identity"),
            ("Accept-Ranges", "bytes"),
        ]
        status = 200
        wanted = exchange.request.header("range")
        if wanted is not None:
            first, last = _parse_byte_range(wanted, info.size)
            headers.append(("Content-Range", f"bytes {first}-{last}/{info.size}"))
            data = data[first : last + 1]
            status = 206
        response = Response(status, data, tuple(headers), content_type=info.content_type)
        stall = exchange.claim(StallAfterBytes)
        if stall is not None:
            return Reply(response, pause_at=stall.offset, pause_seconds=stall.seconds)
        return Reply(response)

    def _delete_object(self, exchange: Exchange) -> Reply:
        bucket, name = _object_of(exchange)
        self.store.delete_object(bucket, name, Preconditions.from_query(exchange.request.query))
        return _empty_reply(204)

    def _compose(self, exchange: Exchange) -> Reply:
        query = exchange.request.query
        bucket, name = _object_of(exchange, suffix="compose")
        document = _read_json(exchange)
        listed = document.get("sourceObjects")
        if not isinstance(listed, list):
            raise GcsApiError(400, "sourceObjects is required", reason="required")
        sources = [_compose_source(item) for item in listed]
        destination = document.get("destination") or {}
        if not isinstance(destination, dict):
            raise GcsApiError(400, "destination must be an object")
        delete_sources = document.get("deleteSourceObjects", False)
        if not isinstance(delete_sources, bool):
            raise GcsApiError(400, "deleteSourceObjects must be a boolean")
        info = self.store.compose(
            bucket,
            name,
            sources,
            content_type=str(destination.get("contentType") or "application/octet-stream"),
            metadata=_custom_metadata(destination),
            preconditions=Preconditions.from_query(query),
            delete_sources=delete_sources,
        )
        return _json_reply(200, info.resource(exchange.base_url))

    # -- uploads ------------------------------------------------------------------------

    def _insert_object(self, exchange: Exchange) -> Reply:
        request = exchange.request
        upload_type = request.query.get("uploadType", "media")
        bucket = _bucket_of(exchange)
        self.store.get_bucket(bucket)
        preconditions = Preconditions.from_query(request.query)
        if upload_type == "resumable":
            return self._start_resumable(exchange, bucket, preconditions)
        data: bytes | memoryview
        if upload_type == "media":
            data = _read_whole_body(exchange)
            metadata: dict[str, Any] = {}
            content_type = request.header("content-type") or "application/octet-stream"
        elif upload_type == "multipart":
            metadata, content_type, data = _parse_multipart(request, _read_whole_body(exchange))
        else:
            raise GcsApiError(400, f"Invalid uploadType: {upload_type!r}")
        name = request.query.get("name") or metadata.get("name")
        if not isinstance(name, str):
            raise GcsApiError(400, "object name is required")
        crc32c, md5 = _parse_goog_hash(request.header("x-goog-hash"))
        info = self.store.insert_object(
            bucket,
            name,
            data,
            content_type=str(metadata.get("contentType") or content_type),
            metadata=_custom_metadata(metadata),
            preconditions=preconditions,
            expected_crc32c=metadata.get("crc32c", crc32c),
            expected_md5=metadata.get("md5Hash", md5),
        )
        return _json_reply(200, info.resource(exchange.base_url))

    def _start_resumable(
        self, exchange: Exchange, bucket: str, preconditions: Preconditions
    ) -> Reply:
        request = exchange.request
        metadata = _read_json(exchange)
        name = request.query.get("name") or metadata.get("name")
        if not isinstance(name, str):
            raise GcsApiError(400, "object name is required")
        declared_text = request.header("x-upload-content-length")
        if declared_text is not None and not declared_text.strip().isdigit():
            raise GcsApiError(400, "Invalid X-Upload-Content-Length")
        session = self.store.create_session(
            bucket,
            name,
            content_type=str(
                request.header("x-upload-content-type")
                or metadata.get("contentType")
                or "application/octet-stream"
            ),
            metadata=_custom_metadata(metadata),
            declared_size=None if declared_text is None else int(declared_text),
            preconditions=preconditions,
        )
        location = (
            f"{exchange.base_url}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
            f"?uploadType=resumable&upload_id={session.upload_id}"
        )
        return _empty_reply(200, (("Location", location),))

    def _cancel_upload(self, exchange: Exchange) -> Reply:
        exchange.connection.discard_body()
        session = self.store.session(exchange.request.query["upload_id"])
        with session.lock:
            self.store.delete_session(session)
        return _empty_reply(499)

    def _upload_chunk(self, exchange: Exchange) -> Reply:
        request = exchange.request
        session = self.store.session(request.query["upload_id"])
        try:
            declared = exchange.connection.declared_body_length()
            content_range = ContentRange.parse(request.header("content-range"), declared)
        except GcsApiError:
            exchange.connection.discard_body()
            raise
        regression = exchange.instruction
        if isinstance(regression, RangeRegression) and session.acknowledged_size > 0:
            return self._lie_about_range(exchange, session)
        body = self._receive_chunk(exchange, session, content_range)
        crc32c, md5 = _parse_goog_hash(request.header("x-goog-hash"))
        with session.lock:
            already_final = session.result is not None
            keep_at_most, failure = self._chunk_limit(exchange, session, content_range, body)
            outcome = apply_chunk(
                self.store,
                session,
                content_range,
                body.data,
                complete=body.complete,
                persist_granularity=self.persist_granularity,
                keep_at_most=keep_at_most,
                may_finalize=keep_at_most is None,
                expected_crc32c=crc32c,
                expected_md5=md5,
            )
        if failure is not None:
            raise GcsApiError(
                failure, f"Retry Test: fault injected after byte {keep_at_most}", reason="retryTest"
            )
        reply = self._chunk_reply(exchange, outcome)
        if outcome.result is not None and not already_final:
            broken = exchange.claim(BrokenFinalResponse)
            if broken is not None:
                return Reply(reply.response, cut_after=broken.after_bytes)
        return reply

    def _receive_chunk(
        self, exchange: Exchange, session: UploadSession, content_range: ContentRange
    ) -> Body:
        """Read the chunk's body, stalling partway if a fault says so.

        A stall first stores the bytes before the stall point, so that during the stall
        the session visibly holds them, as storage-testbench does.
        """
        stall = exchange.instruction
        first = content_range.first
        if not isinstance(stall, StallAfterBytes) or first is None:
            return exchange.connection.read_body()
        if stall.offset > first + content_range.length:
            return exchange.connection.read_body()

        def pause(received: memoryview) -> None:
            with session.lock:
                persisted = session.persisted_size
                if session.result is None and first + received.nbytes > persisted:
                    session.append(received[persisted - first :])
                    session.acknowledged_size = max(
                        session.acknowledged_size, session.persisted_size
                    )
            if exchange.claim(StallAfterBytes):
                self.sleep(stall.seconds)

        pause_at = max(0, stall.offset - first) if stall.offset > session.persisted_size else 0
        return exchange.connection.read_body(pause_at=pause_at, pause=pause)

    def _chunk_limit(
        self,
        exchange: Exchange,
        session: UploadSession,
        content_range: ContentRange,
        body: Body,
    ) -> tuple[int | None, int | None]:
        """(cap on the stored offset, status to fail with) from a pending fault."""
        instruction = exchange.instruction
        first = content_range.first
        if isinstance(instruction, FailAfterBytes):
            reaches = first is not None and first + body.data.nbytes >= instruction.offset
            if (session.persisted_size >= instruction.offset or reaches) and exchange.claim(
                FailAfterBytes
            ):
                return instruction.offset, instruction.status
        if isinstance(instruction, ShortRange) and first is not None and body.complete:
            end = first + body.data.nbytes
            if end > session.persisted_size and exchange.claim(ShortRange):
                return max(session.persisted_size, end - instruction.short_by), None
        return None, None

    def _lie_about_range(self, exchange: Exchange, session: UploadSession) -> Reply:
        exchange.connection.discard_body()
        if not exchange.claim(RangeRegression):
            raise GcsApiError(503, "Retry Test: fault taken by a concurrent request")
        lie = max(0, session.acknowledged_size - UPLOAD_QUANTUM)
        return _empty_reply(308, range_header(lie))

    def _chunk_reply(self, exchange: Exchange, outcome: ChunkOutcome) -> Reply:
        if outcome.result is not None:
            return _json_reply(200, outcome.result.resource(exchange.base_url))
        return _empty_reply(308, range_header(outcome.persisted_size))


def _pick(
    verb: str, handlers: Mapping[str, tuple[str, Callable[[Exchange], Reply]]]
) -> tuple[str, Callable[[Exchange], Reply]]:
    if verb in handlers:
        return handlers[verb]
    method = next(iter(handlers.values()))[0]
    return method, _method_not_allowed


def _not_found(exchange: Exchange) -> Reply:
    exchange.connection.discard_body()
    raise GcsApiError(404, "Not Found", reason="notFound")


def _method_not_allowed(exchange: Exchange) -> Reply:
    exchange.connection.discard_body()
    raise GcsApiError(405, f"Method {exchange.request.method} not allowed here")


def _segments(exchange: Exchange) -> list[str]:
    return [unquote(s, errors="surrogateescape") for s in exchange.request.path.split("/")[1:]]


def _bucket_of(exchange: Exchange) -> str:
    segments = _segments(exchange)
    return segments[4] if segments[0] in ("download", "upload") else segments[3]


def _object_of(exchange: Exchange, *, suffix: str | None = None) -> tuple[str, str]:
    """(bucket, object name) of an object's path, less a trailing ``/suffix`` if given."""
    segments = _segments(exchange)
    if segments[0] == "download":
        segments = segments[1:]
    if suffix is not None and segments[-1] == suffix:
        segments = segments[:-1]
    name = "/".join(segments[5:])
    if not name:
        raise GcsApiError(400, "object name is required")
    return segments[3], name


def _compose_source(item: object) -> ComposeSource:
    """One entry of a compose request's ``sourceObjects``."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise GcsApiError(400, "each source object needs a name", reason="required")
    preconditions = item.get("objectPreconditions") or {}
    if not isinstance(preconditions, dict):
        raise GcsApiError(400, "objectPreconditions must be an object")
    return ComposeSource(
        item["name"],
        _generation_field(item.get("generation"), "generation"),
        _generation_field(preconditions.get("ifGenerationMatch"), "ifGenerationMatch"),
    )


def _generation_field(value: object, key: str) -> int | None:
    """A generation given as a JSON number or a decimal string (JSON API int64s are both)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise GcsApiError(400, f"Invalid value for {key}: {value!r}")


def _decode_page_token(token: str | None) -> str | None:
    if not token:
        return None
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:
        raise GcsApiError(400, "Invalid pageToken") from None


def _parse_byte_range(header: str, size: int) -> tuple[int, int]:
    """Inclusive (first, last) of a single ``Range: bytes=...``; 416 if unsatisfiable."""
    match = re.fullmatch(r"bytes=([0-9]*)-([0-9]*)", header.strip())
    if match is None or match.groups() == ("", ""):
        raise GcsApiError(400, f"Invalid Range header: {header!r}")
    first_text, last_text = match.groups()
    if not first_text:
        first, last = max(0, size - int(last_text)), size - 1
    else:
        first = int(first_text)
        last = min(size - 1, int(last_text)) if last_text else size - 1
    if first >= size or first > last:
        raise GcsApiError(
            416, "The requested range cannot be satisfied.", reason="requestedRangeNotSatisfiable"
        )
    return first, last


def _custom_metadata(resource: Mapping[str, Any]) -> dict[str, str]:
    custom = resource.get("metadata") or {}
    if not isinstance(custom, dict):
        raise GcsApiError(400, "metadata must be an object")
    return {str(key): str(value) for key, value in custom.items()}


def _parse_multipart(request: Request, body: memoryview) -> tuple[dict[str, Any], str, bytes]:
    """(resource JSON, media content type, media bytes) of a multipart/related upload."""
    match = _BOUNDARY.search(request.header("content-type") or "")
    if match is None:
        raise GcsApiError(400, "multipart upload without a boundary")
    delimiter = b"--" + match.group(1).encode("latin-1")
    parts = bytes(body).split(delimiter)
    # ['', part, part, '--' + epilogue]: preamble, two parts, closing delimiter
    if len(parts) != 4 or not parts[3].startswith(b"--"):
        raise GcsApiError(400, "multipart upload must have exactly two parts")
    decoded = []
    for part in parts[1:3]:
        head, sep, content = part.partition(b"\r\n\r\n")
        if not sep or not content.endswith(b"\r\n"):
            raise GcsApiError(400, "malformed multipart part")
        content_type = "application/octet-stream"
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-type":
                content_type = value.strip()
        decoded.append((content_type, content[:-2]))
    try:
        resource = json.loads(decoded[0][1])
    except ValueError as exc:
        raise GcsApiError(400, "multipart metadata is not valid JSON") from exc
    if not isinstance(resource, dict):
        raise GcsApiError(400, "multipart metadata must be a JSON object")
    return resource, decoded[1][0], decoded[1][1]
