"""The sans-IO core: chunk planning and what each GCS answer means."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reliablewriter import (
    CHUNK_QUANTUM,
    NonRetryableHTTPError,
    RetryPolicy,
    ServerRegressionError,
    UnexpectedResponseError,
)
from reliablewriter.resumable import (
    ChunkPlan,
    Finished,
    HttpResponse,
    Persisted,
    ResumableState,
    RetryLater,
    SessionGone,
    plan_chunk,
)

Q = CHUNK_QUANTUM


def state(committed: int = 0, sent_to: int | None = None) -> ResumableState:
    core = ResumableState(name="obj", policy=RetryPolicy(), committed=committed)
    if sent_to is not None:
        core.sending(ChunkPlan(committed, sent_to))
    return core


def response(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> HttpResponse:
    return HttpResponse(status, headers or {}, body)


# --- planning ----------------------------------------------------------------------


def test_waits_for_a_minimum_chunk() -> None:
    assert (
        plan_chunk(committed=0, available_end=Q - 1, total=None, min_size=Q, max_size=4 * Q) is None
    )


def test_non_final_chunks_are_quantum_multiples_capped_at_max() -> None:
    plan = plan_chunk(
        committed=Q, available_end=Q + 3 * Q + 17, total=None, min_size=Q, max_size=8 * Q
    )
    assert plan == ChunkPlan(Q, 4 * Q)
    big = plan_chunk(committed=0, available_end=100 * Q, total=None, min_size=Q, max_size=8 * Q)
    assert big == ChunkPlan(0, 8 * Q)


def test_small_object_goes_in_one_final_request() -> None:
    plan = plan_chunk(committed=0, available_end=1000, total=1000, min_size=Q, max_size=4 * Q)
    assert plan == ChunkPlan(0, 1000, 1000)
    assert plan.content_range() == "bytes 0-999/1000"


def test_empty_object_and_empty_final_chunk() -> None:
    empty = plan_chunk(committed=0, available_end=0, total=0, min_size=Q, max_size=Q)
    assert empty == ChunkPlan(0, 0, 0)
    assert empty.content_range() == "bytes */0"
    tail = plan_chunk(committed=2 * Q, available_end=2 * Q, total=2 * Q, min_size=Q, max_size=Q)
    assert tail is not None
    assert tail.final
    assert tail.content_range() == f"bytes */{2 * Q}"


def test_a_long_tail_is_split_into_max_chunks_before_the_final_one() -> None:
    plan = plan_chunk(
        committed=0, available_end=5 * Q + 5, total=5 * Q + 5, min_size=Q, max_size=2 * Q
    )
    assert plan == ChunkPlan(0, 2 * Q)
    assert plan.content_range() == f"bytes 0-{2 * Q - 1}/*"


@settings(deadline=None)
@given(
    committed_quanta=st.integers(0, 20),
    available=st.integers(0, 40 * Q),
    min_quanta=st.integers(1, 4),
    extra_quanta=st.integers(0, 8),
    finished=st.booleans(),
)
def test_every_plan_obeys_the_chunk_rules(
    committed_quanta: int, available: int, min_quanta: int, extra_quanta: int, finished: bool
) -> None:
    committed = committed_quanta * Q
    min_size, max_size = min_quanta * Q, (min_quanta + extra_quanta) * Q
    end = committed + available
    plan = plan_chunk(
        committed=committed,
        available_end=end,
        total=end if finished else None,
        min_size=min_size,
        max_size=max_size,
    )
    if plan is None:
        assert not finished
        assert available < min_size
        return
    assert plan.start == committed
    assert plan.end <= end
    assert plan.size <= max_size
    if not plan.final:
        assert plan.size % Q == 0
        assert plan.size >= min_size
    else:
        assert plan.end == end


# --- responses ---------------------------------------------------------------------


def test_308_with_range_moves_the_committed_offset() -> None:
    core = state(sent_to=2 * Q)
    assert core.receive(
        response(308, {"range": f"bytes=0-{2 * Q - 1}"}), ChunkPlan(0, 2 * Q)
    ) == Persisted(2 * Q)
    assert core.committed == 2 * Q


def test_308_with_a_short_range_resumes_from_the_server_offset() -> None:
    core = state(sent_to=4 * Q)
    outcome = core.receive(response(308, {"range": f"bytes=0-{Q - 1}"}), ChunkPlan(0, 4 * Q))
    assert outcome == Persisted(Q)
    assert plan_chunk(
        committed=core.committed, available_end=4 * Q, total=None, min_size=Q, max_size=4 * Q
    ) == ChunkPlan(Q, 4 * Q)


def test_308_without_range_means_nothing_is_stored() -> None:
    assert state(sent_to=Q).receive(response(308), ChunkPlan(0, Q)) == Persisted(0)


def test_fewer_bytes_than_acknowledged_is_a_regression() -> None:
    core = state(sent_to=2 * Q)
    core.receive(response(308, {"range": f"bytes=0-{2 * Q - 1}"}), ChunkPlan(0, 2 * Q))
    with pytest.raises(
        ServerRegressionError, match=f"acknowledged {2 * Q} bytes earlier and now reports {Q}"
    ) as info:
        core.receive(response(308, {"range": f"bytes=0-{Q - 1}"}), None)
    assert info.value.acknowledged == 2 * Q
    assert info.value.reported == Q
    with pytest.raises(ServerRegressionError):
        core.receive(response(308), None)


def test_claiming_bytes_never_sent_is_refused() -> None:
    with pytest.raises(UnexpectedResponseError, match="only 262144 were ever sent"):
        state(sent_to=Q).receive(response(308, {"range": f"bytes=0-{2 * Q - 1}"}), None)


@pytest.mark.parametrize("header", ["bytes=5-9", "byt", "bytes=", "b\x86tes=0-9", "bytes=0-"])
def test_a_malformed_range_is_a_failed_attempt(header: str) -> None:
    core = state(sent_to=2 * Q)
    core.receive(response(308, {"range": f"bytes=0-{Q - 1}"}), None)
    assert core.receive(response(308, {"range": header}), None) == RetryLater("malformed-range")
    assert core.committed == Q


def test_200_carries_the_object() -> None:
    body = json.dumps({"name": "obj", "size": "3"}).encode()
    outcome = state(sent_to=3).receive(response(200, body=body), ChunkPlan(0, 3, 3))
    assert outcome == Finished({"name": "obj", "size": "3"})


def test_a_cut_short_200_is_retried_through_a_status_query() -> None:
    outcome = state(sent_to=3).receive(response(200, body=b'{"name": "o'), ChunkPlan(0, 3, 3))
    assert outcome == RetryLater("truncated-response")


def test_200_on_a_non_final_chunk_is_unexpected() -> None:
    with pytest.raises(UnexpectedResponseError, match="non-final"):
        state(sent_to=Q).receive(response(200, body=b"{}"), ChunkPlan(0, Q))


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(status: int) -> None:
    assert state().receive(response(status), None) == RetryLater(f"http-{status}")


@pytest.mark.parametrize("status", [404, 410])
def test_404_and_410_mean_the_session_is_gone(status: int) -> None:
    assert state().receive(response(status), None) == SessionGone(status)


@pytest.mark.parametrize("status", [400, 401, 403, 412])
def test_client_errors_are_final_and_say_why(status: int) -> None:
    body = json.dumps(
        {"error": {"code": status, "message": "conditionNotMet: generation"}}
    ).encode()
    with pytest.raises(NonRetryableHTTPError, match="conditionNotMet") as info:
        state().receive(response(status, body=body), None)
    assert info.value.status == status
    assert f"HTTP {status}" in str(info.value)


def test_sending_must_start_at_the_committed_offset() -> None:
    with pytest.raises(ValueError, match="committed offset"):
        state(committed=Q).sending(ChunkPlan(0, Q))
