"""Scripted faults in the shape of storage-testbench's retry-test API.

A *retry test* is a set of instruction queues, one per JSON API method name
(``storage.objects.insert``, ``storage.objects.get``, ...). A request that carries
``x-retry-test-id`` looks at the head of its method's queue; the instruction is consumed
once it has applied, so each one fires exactly once, in order. An instruction that cannot
apply to a request yet (``return-503-after-512K`` on a chunk that ends before 512 KiB)
stays queued for a later one, as in storage-testbench.

Instructions (storage-testbench's, then rup's own):

``return-NNN``
    Answer NNN at once (the request body is read and dropped). ``return-410`` on an
    upload session also expires the session: it then answers 404, as a lost session does.
``return-reset-connection``
    Reset the connection (TCP RST) before reading the body: nothing is stored.
``return-broken-stream`` / ``return-broken-stream-after-NK``
    Handle the request, then send the response head and only 4 bytes (N KiB) of its body
    and close the connection.
``return-NNN-after-NK``
    Upload sessions: store bytes up to absolute offset N KiB, then answer NNN.
``stall-for-Ss-after-NK``
    Uploads: stall S seconds once the session holds N KiB (absolute offset), then go on.
    Downloads: stall after N KiB of the response body.
``return-broken-stream-final-chunk-after-NB`` (also ``...-after-NK``)
    Applies to the request that completes an upload: the object is created, then only N
    bytes of the response body are sent and the connection is closed.
    (storage-testbench sends a complete but truncated 200; a cut connection is the more
    faithful network fault and leaves a client the same problem to solve.)
``return-308-short-range-NK``
    Upload chunks: store all of the chunk's new bytes but the last N KiB and answer 308
    with the truthful Range. Nothing is lost or misreported: the client must resend from
    the reported offset and must not skip the N KiB. Applies to the final chunk too (then
    the object is not created yet).
``return-range-regression``
    A lying server: answer 308 with a Range 256 KiB lower than (or none if at most 256
    KiB was) the highest offset already acknowledged for the session, without storing the
    request's bytes. A correct client fails loudly rather than resend or skip. Waits for a
    request on a session with something acknowledged.
"""

from __future__ import annotations

import collections
import re
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from faultnet.gcs.errors import GcsApiError

__all__ = [
    "METHODS",
    "BrokenFinalResponse",
    "BrokenStream",
    "FailAfterBytes",
    "Instruction",
    "RangeRegression",
    "ResetConnection",
    "RetryTests",
    "ReturnStatus",
    "ShortRange",
    "StallAfterBytes",
    "parse_instruction",
]

#: the JSON API methods this endpoint routes, i.e. the keys an instruction set may use
METHODS = frozenset(
    {
        "storage.buckets.list",
        "storage.buckets.insert",
        "storage.buckets.get",
        "storage.buckets.delete",
        "storage.objects.list",
        "storage.objects.insert",
        "storage.objects.get",
        "storage.objects.delete",
        "storage.objects.compose",
    }
)

_KIB = 1024


@dataclass(frozen=True)
class Instruction:
    """One scripted fault, parsed."""


@dataclass(frozen=True)
class ReturnStatus(Instruction):
    status: int


@dataclass(frozen=True)
class ResetConnection(Instruction):
    pass


@dataclass(frozen=True)
class BrokenStream(Instruction):
    after_bytes: int


@dataclass(frozen=True)
class FailAfterBytes(Instruction):
    status: int
    offset: int


@dataclass(frozen=True)
class StallAfterBytes(Instruction):
    seconds: float
    offset: int


@dataclass(frozen=True)
class BrokenFinalResponse(Instruction):
    after_bytes: int


@dataclass(frozen=True)
class ShortRange(Instruction):
    short_by: int


@dataclass(frozen=True)
class RangeRegression(Instruction):
    pass


_SIZE = r"([0-9]+)([BK])"
_PATTERNS: list[tuple[re.Pattern[str], type[Instruction]]] = [
    (re.compile(r"return-([0-9]{3})"), ReturnStatus),
    (re.compile(r"return-reset-connection"), ResetConnection),
    (re.compile(r"return-broken-stream"), BrokenStream),
    (re.compile(r"return-broken-stream-after-([0-9]+)K"), BrokenStream),
    (re.compile(r"return-([0-9]{3})-after-([0-9]+)K"), FailAfterBytes),
    (re.compile(r"stall-for-([0-9]+)s-after-([0-9]+)K"), StallAfterBytes),
    (re.compile(r"return-broken-stream-final-chunk-after-" + _SIZE), BrokenFinalResponse),
    (re.compile(r"return-308-short-range-([0-9]+)K"), ShortRange),
    (re.compile(r"return-range-regression"), RangeRegression),
]


def parse_instruction(text: str) -> Instruction:
    """Parse one instruction string; ValueError names the ones that are understood."""
    for pattern, kind in _PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        groups = match.groups()
        if kind is ReturnStatus:
            return ReturnStatus(int(groups[0]))
        if kind is BrokenStream:
            return BrokenStream(int(groups[0]) * _KIB if groups else 4)
        if kind is FailAfterBytes:
            return FailAfterBytes(int(groups[0]), int(groups[1]) * _KIB)
        if kind is StallAfterBytes:
            return StallAfterBytes(float(groups[0]), int(groups[1]) * _KIB)
        if kind is BrokenFinalResponse:
            return BrokenFinalResponse(int(groups[0]) * (_KIB if groups[1] == "K" else 1))
        if kind is ShortRange:
            return ShortRange(int(groups[0]) * _KIB)
        return kind()
    raise ValueError(f"unknown fault instruction {text!r}; see faultnet.gcs.retry_test")


@dataclass
class _RetryTest:
    id: str
    transport: str
    queues: dict[str, collections.deque[tuple[str, Instruction]]]

    @property
    def completed(self) -> bool:
        return not any(self.queues.values())

    def resource(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "instructions": {
                method: [text for text, _ in queue] for method, queue in self.queues.items()
            },
            "completed": self.completed,
            "transport": self.transport,
        }


class RetryTests:
    """The registry of retry tests. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tests: dict[str, _RetryTest] = {}

    def create(
        self, instructions: Mapping[str, Sequence[str]], transport: str = "HTTP"
    ) -> dict[str, Any]:
        """Register a retry test; raises GcsApiError(400) for anything not understood."""
        if transport.upper() not in ("HTTP", "JSON"):
            raise GcsApiError(400, f"transport {transport!r} is not supported (HTTP only)")
        if not isinstance(instructions, Mapping) or not instructions:
            raise GcsApiError(400, "instructions is not defined")
        queues: dict[str, collections.deque[tuple[str, Instruction]]] = {}
        for method, texts in instructions.items():
            if method not in METHODS:
                raise GcsApiError(400, f"The requested method <{method}> is not supported")
            if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
                raise GcsApiError(400, f"instructions for {method} must be a list of strings")
            try:
                queues[method] = collections.deque((t, parse_instruction(t)) for t in texts)
            except ValueError as exc:
                raise GcsApiError(400, str(exc)) from exc
        test = _RetryTest(secrets.token_hex(16), transport.upper(), queues)
        with self._lock:
            self._tests[test.id] = test
            return test.resource()

    def get(self, test_id: str) -> dict[str, Any]:
        with self._lock:
            return self._test(test_id).resource()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [test.resource() for test in self._tests.values()]

    def delete(self, test_id: str) -> None:
        with self._lock:
            self._test(test_id)
            del self._tests[test_id]

    def _test(self, test_id: str) -> _RetryTest:
        try:
            return self._tests[test_id]
        except KeyError:
            raise GcsApiError(404, f"Retry Test {test_id} not found", reason="notFound") from None

    def peek(self, test_id: str | None, method: str) -> Instruction | None:
        """The instruction waiting for ``method`` in ``test_id``, if any (unknown id: 404)."""
        if test_id is None:
            return None
        with self._lock:
            queue = self._test(test_id).queues.get(method)
            return queue[0][1] if queue else None

    def consume(self, test_id: str, method: str, instruction: Instruction) -> bool:
        """Dequeue ``instruction`` as it applies; False if a concurrent request took it."""
        with self._lock:
            test = self._tests.get(test_id)
            queue = test.queues.get(method) if test is not None else None
            if queue and queue[0][1] is instruction:
                queue.popleft()
                return True
            return False
