"""One request that makes an object, whose answer may be lost: settled by reading the object back.

A multipart upload and a compose have no session to ask what was done. When an attempt gets
no clear answer (no response, a cut one, a timeout, 408/429/5xx), the object may or may not
have been made: sending again without a precondition would make it a second time, and with
one it would be refused (412) by the copy the first attempt made. So after such an attempt
the object is **read back** first: an object of the expected size and CRC32C (and not the
generation a precondition names) is ours, and we are done; otherwise we send again. A 412
after an unclear attempt is read back too, since it may be that attempt's own doing.

:class:`SettledRequest` makes these decisions sans-IO, as :mod:`reliablewriter.resumable`
does for sessions; :func:`settle` does the I/O (one blocking call in a worker thread per
step) and the waiting. Cancelling :func:`settle` midway leaves the object made whole or
not at all; which one, a read back tells.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from .errors import (
    NonRetryableHTTPError,
    RetriesExhaustedError,
    UnexpectedResponseError,
    WriterError,
)
from .results import ObjectInfo
from .settings import RetryPolicy
from .transport import NoAnswer, Refused, Stored, StoreOutcome, TransportFailure

if TYPE_CHECKING:
    import outcome

__all__ = [
    "ExpectedObject",
    "ReadBack",
    "Send",
    "SettledRequest",
    "in_worker_thread",
    "settle",
    "settle_async",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

#: statuses after which the object may have been made: read it back before sending again
_UNCLEAR_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))


@dataclass(frozen=True)
class ExpectedObject:
    """What the request must make: anything else is not ours."""

    name: str
    size: int
    #: GCS's base64 form
    crc32c: str
    #: the request's precondition; generation G (if not 0) is the object being replaced
    if_generation_match: int | None = None

    def is_ours(self, resource: Mapping[str, Any]) -> bool:
        info = ObjectInfo.from_resource(resource)
        replaced = bool(self.if_generation_match) and info.generation == self.if_generation_match
        return not replaced and info.size == self.size and info.crc32c == self.crc32c


@dataclass(frozen=True)
class Send:
    """Send the request; first wait ``delay`` seconds (a retry's backoff)."""

    delay: float = 0.0


@dataclass(frozen=True)
class ReadBack:
    """Look the object up: is what GCS holds ours? First wait ``delay`` seconds."""

    delay: float = 0.0


class _Phase(enum.Enum):
    SENDING = "sending"
    READING_BACK = "reading back"
    DONE = "done"
    FAILED = "failed"


class SettledRequest:
    """The decisions of one object-making request, sans-IO: no socket, no clock of its own.

    Call :meth:`next_step`, do it, and report the result with :meth:`sent` or
    :meth:`read_back`, passing the current time. :attr:`result` (or :attr:`error`) is set
    once it is over. ``action`` names the request in errors ("the compose");
    ``refusal`` turns a final refusal into the error to raise.
    """

    def __init__(
        self,
        expected: ExpectedObject,
        policy: RetryPolicy,
        *,
        now: float,
        action: str,
        refusal: Callable[[Refused], NonRetryableHTTPError],
        maybe_made: bool = False,
    ) -> None:
        self._expected = expected
        self._policy = policy
        self._action = action
        self._refusal = refusal
        self._phase = _Phase.SENDING
        self._attempts = 0
        self._started = now
        #: an attempt may have made the object: a 412 later may be our own copy's doing (an
        #: earlier attempt of this request, or, as the caller says, one made elsewhere)
        self._maybe_made = maybe_made
        #: the read back follows a 412: if the object is not ours, the precondition failed
        self._after_refusal: Refused | None = None
        #: the next read back is the first after a send: it goes at once
        self._fresh_read_back = False
        self.result: ObjectInfo | None = None
        self.error: WriterError | None = None

    @property
    def expected(self) -> ExpectedObject:
        return self._expected

    @property
    def attempts(self) -> int:
        """Failed attempts so far (sends and read backs)."""
        return self._attempts

    def next_step(self) -> Send | ReadBack | None:
        """What to do now; None once :attr:`result` or :attr:`error` is set."""
        delay = self._policy.next_delay(self._attempts) if self._attempts else 0.0
        if self._phase is _Phase.SENDING:
            return Send(delay)
        if self._phase is _Phase.READING_BACK:
            # The first look after a send costs one small request: it goes at once.
            return ReadBack(0.0 if self._fresh_read_back else delay)
        return None

    def sent(self, outcome: StoreOutcome, *, now: float) -> None:
        """What the request returned."""
        assert self._phase is _Phase.SENDING
        if isinstance(outcome, Stored):
            self._accept(outcome.resource, how=f"GCS answered {self._action}")
        elif isinstance(outcome, Refused) and not self._unclear_status(outcome.status):
            if outcome.status == 412 and self._maybe_made:
                self._after_refusal = outcome  # perhaps an earlier attempt did make it: look
                self._read_back_next()
            else:
                self._fail(self._refusal(outcome))
        else:
            self._maybe_made = True
            if not self._gave_up_after(outcome, now=now):
                self._read_back_next()

    def read_back(self, outcome: Mapping[str, Any] | int | NoAnswer, *, now: float) -> None:
        """What looking the object up returned: its resource, a status (404: none), or
        no answer."""
        assert self._phase is _Phase.READING_BACK
        self._fresh_read_back = False
        if isinstance(outcome, NoAnswer):
            self._gave_up_after(outcome, now=now)
            return
        if not isinstance(outcome, int) and self._expected.is_ours(outcome):
            logger.info("%s of %r settled by reading it back", self._action, self._expected.name)
            self._accept(outcome, how="the object read back")
            return
        if isinstance(outcome, int) and outcome != 404:
            self._fail(
                NonRetryableHTTPError(
                    f"cannot read the object back to learn what {self._action} did",
                    status=outcome,
                    reason="refused the metadata request",
                    name=self._expected.name,
                )
            )
        elif self._after_refusal is not None:
            self._fail(self._refusal(self._after_refusal))  # a 412 not of our own doing
        else:
            self._phase = _Phase.SENDING  # not made: sending again cannot make it twice

    # -- the rules ---------------------------------------------------------------------

    def _unclear_status(self, status: int) -> bool:
        return status in _UNCLEAR_STATUSES or self._policy.is_retryable_status(status)

    def _read_back_next(self) -> None:
        self._phase = _Phase.READING_BACK
        self._fresh_read_back = True

    def _accept(self, resource: Mapping[str, Any], *, how: str) -> None:
        info = ObjectInfo.from_resource(resource)
        expected = self._expected
        if not expected.is_ours(resource):
            self._fail(
                UnexpectedResponseError(
                    f"{how}, but it holds {info.size} bytes with crc32c {info.crc32c}, "
                    f"not {expected.size} bytes with crc32c {expected.crc32c}",
                    name=expected.name,
                )
            )
            return
        self.result = info
        self._phase = _Phase.DONE

    def _gave_up_after(self, outcome: Refused | NoAnswer, *, now: float) -> bool:
        """Count a failed attempt; True (and failed) if the policy gives up now."""
        self._attempts += 1
        if not self._policy.gives_up(self._attempts, now - self._started):
            return False
        cause = outcome.cause if isinstance(outcome, NoAnswer) else f"http-{outcome.status}"
        self._fail(
            RetriesExhaustedError(
                f"{self._action} kept failing",
                attempts=self._attempts,
                cause=cause,
                name=self._expected.name,
            )
        )
        return True

    def _fail(self, error: WriterError) -> None:
        self.error = error
        self._phase = _Phase.FAILED


async def settle(
    request: SettledRequest,
    send: Callable[[], StoreOutcome],
    look_up: Callable[[], Mapping[str, Any] | int],
) -> ObjectInfo:
    """Carry ``request``'s decisions out: ``send`` makes the object, ``look_up`` reads it
    back (a resource, or a status: 404 for none; :class:`TransportFailure` for no answer).
    Both block, and run in worker threads. Raises :attr:`SettledRequest.error`."""
    return await settle_async(request, in_worker_thread(send), in_worker_thread(look_up))


async def settle_async(
    request: SettledRequest,
    send: Callable[[], Awaitable[StoreOutcome]],
    look_up: Callable[[], Awaitable[Mapping[str, Any] | int]],
) -> ObjectInfo:
    """:func:`settle`, where ``send`` and ``look_up`` are async. ``send`` must not be
    cancellable once its request may have left (a request once sent is waited for, so what
    it did is never lost). Raises :attr:`SettledRequest.error`."""
    while (step := request.next_step()) is not None:
        await trio.sleep(step.delay)  # also where a cancellation is noticed
        if isinstance(step, Send):
            request.sent(await send(), now=trio.current_time())
            continue
        try:
            found: Mapping[str, Any] | int | NoAnswer = await look_up()
        except TransportFailure as exc:
            found = NoAnswer(exc.cause)
        request.read_back(found, now=trio.current_time())
    if request.error is not None:
        raise request.error
    assert request.result is not None
    return request.result


def in_worker_thread(blocking: Callable[[], _T]) -> Callable[[], Awaitable[_T]]:
    """``blocking`` as an async callable that runs it in a worker thread (see
    :func:`_in_worker_thread`)."""
    return functools.partial(_in_worker_thread, blocking)


async def _in_worker_thread(blocking: Callable[[], _T]) -> _T:
    """``blocking()`` in one of trio's cached worker threads, holding a token of trio's
    default thread limiter: what ``trio.to_thread.run_sync`` does, without its extra passes
    through the scheduler (a checkpoint before, a cancel-shielded one after), which cost a
    small object about as much CPU as the hop itself.

    Not a checkpoint, and not cancellable once the thread is asked (to_thread's default
    too): a request once sent is waited for, so what it did is never lost.
    """
    limiter = trio.to_thread.current_default_thread_limiter()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    try:
        limiter.acquire_on_behalf_of_nowait(task)
    except trio.WouldBlock:
        await limiter.acquire_on_behalf_of(task)

    def deliver(result: outcome.Outcome[_T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    try:
        trio.lowlevel.start_thread_soon(blocking, deliver)
        done: _T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
    finally:
        limiter.release_on_behalf_of(task)
    return done
