"""The client upload's lifecycle: the transition table is walked pair by pair."""

from __future__ import annotations

import itertools

import pytest

from protocol import ErrorCode
from proxy.client import UploadError, UploadState
from proxy.client.lifecycle import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransitionError,
    Lifecycle,
)


@pytest.mark.parametrize(("current", "wanted"), list(itertools.product(UploadState, UploadState)))
def test_every_pair_is_allowed_exactly_when_the_table_says(
    current: UploadState, wanted: UploadState
) -> None:
    lifecycle = Lifecycle(current)
    if wanted in TRANSITIONS[current]:
        lifecycle.move(wanted)
        assert lifecycle.state is wanted
    else:
        with pytest.raises(IllegalTransitionError) as caught:
            lifecycle.move(wanted)
        assert (caught.value.current, caught.value.wanted) == (current, wanted)
        assert lifecycle.state is current  # a refused move changes nothing


def test_every_state_is_reachable_from_new_and_every_path_ends() -> None:
    seen, frontier = {UploadState.NEW}, [UploadState.NEW]
    while frontier:
        for following in TRANSITIONS[frontier.pop()]:
            if following not in seen:
                seen.add(following)
                frontier.append(following)
    assert seen == set(UploadState)
    assert {
        UploadState.COMPLETED,
        UploadState.ABORTED,
        UploadState.FAILED,
        UploadState.DETACHED,
    } == TERMINAL


def test_the_first_failure_is_kept_and_a_completed_upload_cannot_fail() -> None:
    lifecycle = Lifecycle(UploadState.SENDING)
    first = UploadError(ErrorCode.FORBIDDEN, "first")
    assert lifecycle.fail(first)
    assert not lifecycle.fail(UploadError(None, "second"))
    assert lifecycle.failure is first
    with pytest.raises(UploadError, match="first"):
        lifecycle.check()
    completed = Lifecycle(UploadState.SENDING)
    completed.move(UploadState.COMPLETED)
    assert not completed.fail(first)
    assert completed.state is UploadState.COMPLETED
    completed.check()  # no failure recorded
