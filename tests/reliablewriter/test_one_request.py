"""One-request uploads: one multipart request per object, and never a second copy by mistake.

Faults are real: the strict endpoint's scripted instructions and faultnet's HTTP transport.
Requests are counted by an adapter that only counts, so that "one request" and "sent only
once" are measured, not assumed.
"""

from __future__ import annotations

import secrets
import socket
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import google_crc32c
import pytest
import requests
import requests.adapters
import trio

from reliablewriter import (
    ChecksumMismatchError,
    NonRetryableHTTPError,
    RetriesExhaustedError,
    RetryPolicy,
)
from reliablewriter.checksum import crc32c_to_b64
from reliablewriter.one_request import (
    ObjectRequest,
    multipart_body,
    settled_upload,
    upload_in_one_request,
)
from reliablewriter.settled import ReadBack, Send, SettledRequest
from reliablewriter.transport import NoAnswer, Refused, Stored, post_whole_object

from .conftest import KiB, Target, payload

Faulty = Callable[[str], Target]

POLICY = RetryPolicy(max_attempts=6, deadline=20.0, initial_delay=0.01, max_delay=0.05)


class CountingAdapter(requests.adapters.HTTPAdapter):
    """Records the method and path of every request sent; changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str]] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        path = urllib.parse.urlsplit(str(request.url)).path
        self.sent.append((str(request.method), path))
        return super().send(request, *args, **kwargs)

    def uploads(self) -> int:
        return sum(1 for method, path in self.sent if path.startswith("/upload/"))


def counted(target: Target) -> CountingAdapter:
    adapter = CountingAdapter()
    target.http.mount("http://", adapter)
    return adapter


async def store(target: Target, data: bytes, **options: Any) -> Any:
    return await upload_in_one_request(
        target.bucket, ObjectRequest("small.bin", data, **options), policy=POLICY
    )


async def test_a_small_object_is_stored_with_one_request(target: Target) -> None:
    data = payload(4 * KiB)
    adapter = counted(target)
    info = await store(
        target, data, content_type="text/plain", metadata={"k": "v"}, if_generation_match=0
    )
    assert adapter.sent == [("POST", f"/upload/storage/v1/b/{target.bucket_name}/o")]
    assert info.size == len(data)
    assert info.crc32c == crc32c_to_b64(google_crc32c.value(data))
    assert info.content_type == "text/plain"
    assert info.metadata == {"k": "v"}
    assert target.read("small.bin") == data


async def test_bytes_that_look_like_multipart_framing_are_stored_as_they_are(
    target: Target,
) -> None:
    # The body's boundary is random and never one found in the bytes; the strict endpoint
    # splits the body at every boundary, so bytes taken for one would not be stored intact.
    data = b"\r\n--rup-\r\n--\r\ncontent-type: application/json\r\n\r\n{}" * 512
    info = await store(target, data, metadata={"k": "v"})
    assert info.size == len(data)
    assert info.metadata == {"k": "v"}
    assert target.read("small.bin") == data


async def test_an_empty_object_is_stored(target: Target) -> None:
    info = await store(target, b"")
    assert info.size == 0
    assert target.read("small.bin") == b""


async def test_a_crc32c_that_is_not_the_bytes_sends_nothing(target: Target) -> None:
    data = payload(KiB)
    adapter = counted(target)
    with pytest.raises(ChecksumMismatchError):
        await store(target, data, crc32c=google_crc32c.value(data) ^ 1)
    assert adapter.sent == []
    assert target.object_names() == []


@pytest.mark.parametrize("instruction", ["return-503", "return-429", "return-reset-connection"])
async def test_a_request_that_stored_nothing_is_sent_again(
    target: Target, instruction: str
) -> None:
    data = payload(8 * KiB)
    adapter = counted(target)
    target.script(instruction)
    info = await store(target, data)
    assert target.script_done()
    assert adapter.uploads() == 2  # the failed one and the one that stored
    assert info.size == len(data)
    assert target.read("small.bin") == data


@pytest.mark.parametrize("precondition", [None, 0])
async def test_a_lost_answer_is_settled_by_reading_back_never_by_sending_again(
    target: Target, precondition: int | None
) -> None:
    # The endpoint stores the object, then cuts the response after 4 bytes of its body.
    data = payload(8 * KiB)
    adapter = counted(target)
    target.script("return-broken-stream")
    info = await store(target, data, if_generation_match=precondition)
    assert target.script_done()
    assert adapter.uploads() == 1  # stored once: the read back found it ours
    assert ("GET", f"/storage/v1/b/{target.bucket_name}/o/small.bin") in adapter.sent
    assert info.size == len(data)
    assert target.read("small.bin") == data


async def test_a_response_reset_on_the_wire_is_settled_by_reading_back(
    faulty_target: Faulty,
) -> None:
    # Seed 14 resets the responses of the first two connections after 100 bytes: the
    # upload's (the object is stored, its JSON lost) and the first read back's.
    target = faulty_target("seed=14; reset_peer:down(after=100)~0.5")
    data = payload(16 * KiB)
    info = await store(target, data)
    assert target.counters.faults_applied("reset_peer") == 2
    assert info.size == len(data)
    assert target.read("small.bin") == data


async def test_a_cancelled_upload_waits_for_the_request_it_sent(faulty_target: Faulty) -> None:
    # Every response comes 0.5 s late; the caller gives up after 0.1 s, with the request
    # sent and the object stored. The answer is still waited for and returned, so the
    # caller knows the object exists instead of being left to guess.
    target = faulty_target("latency:down(ms=500)")
    data = payload(4 * KiB)
    started = trio.current_time()
    with trio.move_on_after(0.1) as scope:
        info = await store(target, data)
    assert scope.cancel_called
    assert trio.current_time() - started >= 0.5
    assert target.counters.faults_applied("latency") >= 1
    assert info.size == len(data)
    assert info.generation == target.bucket.get_blob("small.bin").generation
    assert target.read("small.bin") == data


async def test_a_precondition_that_does_not_hold_is_refused_once(target: Target) -> None:
    await store(target, b"first")
    adapter = counted(target)
    with pytest.raises(NonRetryableHTTPError) as refused:
        await store(target, b"second", if_generation_match=0)
    assert refused.value.status == 412
    assert adapter.uploads() == 1
    assert target.read("small.bin") == b"first"


async def test_retries_end_under_the_policy(faulty_target: Faulty) -> None:
    target = faulty_target("reset_peer:up(after=0)")  # no request ever arrives whole
    with pytest.raises(RetriesExhaustedError) as exhausted:
        await store(target, payload(KiB))
    assert exhausted.value.attempts == POLICY.max_attempts
    assert target.object_names() == []


# -- what one POST came to, from answers written on a raw socket --------------------------


def _answer_once(answer: bytes) -> tuple[str, threading.Thread]:
    """A one-shot HTTP server on loopback: reads one request whole, writes ``answer``, closes.
    Returns its URL and its thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10.0)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.settimeout(10.0)
            received = b""
            while b"\r\n\r\n" not in received:
                received += conn.recv(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    host, port = listener.getsockname()[:2]
    return f"http://{host}:{port}/upload", thread


#: answers, and what a POST answered so came to
ONE_POST_ANSWERS: list[tuple[bytes, object]] = [
    (
        b'HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{"size": "3"}\n',
        Stored({"size": "3"}),
    ),
    (  # a success whose object cannot be read: settled by reading it back
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        NoAnswer("bad-response"),
    ),
    (  # no length and not chunked: cut, whatever it claims
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{}",
        NoAnswer("truncated-response"),
    ),
    (
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 37\r\n\r\n"
        b'{"error":{"message":"no, not today"}}',
        Refused(403, "no, not today"),
    ),
]


@pytest.mark.parametrize(("answer", "outcome"), ONE_POST_ANSWERS)
def test_what_one_post_came_to(answer: bytes, outcome: object) -> None:
    url, server = _answer_once(answer)
    with requests.Session() as http:
        http.trust_env = False
        got = post_whole_object(http, url, b"body", "multipart/related", (5.0, 5.0))
    server.join(timeout=10)
    assert got == outcome


# -- the decisions alone (sans-IO) ----------------------------------------------------------


def _machine(data: bytes = b"abc", **options: Any) -> SettledRequest:
    return settled_upload(ObjectRequest("o", data, **options), POLICY, now=0.0)


def _resource(data: bytes, generation: int = 7) -> Mapping[str, Any]:
    crc = crc32c_to_b64(google_crc32c.value(data))
    return {"name": "o", "bucket": "b", "size": str(len(data)), "crc32c": crc,
            "generation": str(generation)}  # fmt: skip


def test_a_412_after_an_unclear_attempt_reads_back_before_it_is_believed() -> None:
    upload = _machine(if_generation_match=0)
    assert upload.next_step() == Send(0.0)
    upload.sent(NoAnswer("timeout"), now=1.0)
    assert isinstance(upload.next_step(), ReadBack)
    upload.read_back(404, now=1.5)  # not there (yet): send again
    assert isinstance(upload.next_step(), Send)
    upload.sent(Refused(412, "conditionNotMet"), now=2.0)  # the first one landed late
    assert upload.next_step() == ReadBack(0.0)
    upload.read_back(_resource(b"abc"), now=2.1)
    assert upload.result is not None
    assert upload.result.generation == 7
    assert upload.next_step() is None


def test_a_412_on_the_first_attempt_is_final() -> None:
    upload = _machine(if_generation_match=0)
    upload.sent(Refused(412, "conditionNotMet"), now=0.0)
    assert isinstance(upload.error, NonRetryableHTTPError)
    assert upload.error.status == 412
    assert upload.next_step() is None


def test_the_generation_a_precondition_names_is_never_taken_for_ours() -> None:
    upload = _machine(if_generation_match=7)
    upload.sent(NoAnswer("connection"), now=0.0)
    upload.read_back(_resource(b"abc", generation=7), now=0.1)  # same bytes, old object
    assert upload.result is None
    assert isinstance(upload.next_step(), Send)


def test_an_object_of_other_bytes_is_not_ours() -> None:
    upload = _machine()
    upload.sent(Refused(503, "backendError"), now=0.0)
    upload.read_back(_resource(b"xyz"), now=0.1)
    assert upload.result is None
    assert isinstance(upload.next_step(), Send)


def test_a_stored_answer_describing_other_bytes_is_an_error() -> None:
    upload = _machine()
    upload.sent(Stored(_resource(b"xyz")), now=0.0)
    assert upload.error is not None
    assert upload.result is None


def test_the_objects_bytes_are_parts_of_the_body_uncopied() -> None:
    first, second = payload(3 * KiB), payload(5 * KiB)
    body = multipart_body(ObjectRequest("o", [first, memoryview(second)[1:]]), "AAAAAA==")
    objects = [part for part in body.parts if isinstance(part, memoryview)]
    assert [part.obj for part in objects] == [first, second]
    assert body.size == len(body.joined())


async def test_a_boundary_found_in_the_bytes_even_across_pieces_is_never_used(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = "0123456789abcdef0123456789abcdef"
    draws = iter([planted, "f" * 32])
    monkeypatch.setattr(secrets, "token_hex", lambda _: next(draws))
    marker = f"\r\n--rup-{planted}--\r\n".encode()
    pieces = [payload(KiB) + marker[:9], marker[9:] + payload(KiB)]  # straddling the pieces
    body = multipart_body(ObjectRequest("o", pieces), "AAAAAA==")
    assert planted not in body.content_type
    assert "f" * 32 in body.content_type
    draws = iter([planted, "e" * 32])
    info = await upload_in_one_request(
        target.bucket, ObjectRequest("small.bin", pieces), policy=POLICY
    )
    assert info.size == sum(map(len, pieces))
    assert target.read("small.bin") == b"".join(pieces)


async def test_a_crc32c_given_as_verified_is_not_recomputed_and_gcs_still_checks_it(
    target: Target,
) -> None:
    data = payload(4 * KiB)
    right = google_crc32c.value(data)
    info = await store(target, data, verified_crc32c=right, crc32c=right)
    assert info.crc32c == crc32c_to_b64(right)
    # A client's claim is compared with the verified CRC32C: nothing is sent.
    adapter = counted(target)
    with pytest.raises(ChecksumMismatchError):
        await store(target, data, verified_crc32c=right, crc32c=right ^ 1)
    assert adapter.sent == []
    # Bytes changed after they were verified: GCS compares them with the CRC32C sent along,
    # and refuses the object.
    with pytest.raises(NonRetryableHTTPError) as refused:
        await upload_in_one_request(
            target.bucket,
            ObjectRequest("changed.bin", data, verified_crc32c=right ^ 1),
            policy=POLICY,
        )
    assert refused.value.status == 400
    assert "changed.bin" not in target.object_names()
