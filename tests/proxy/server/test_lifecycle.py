"""An upload's lifecycle: one enum, one transition table, and every other move refused."""

from __future__ import annotations

import itertools

import pytest

from proxy.server.uploads import (
    UPLOAD_TRANSITIONS,
    IllegalTransitionError,
    UploadLifecycle,
    UploadState,
)


def _lifecycle_in(state: UploadState) -> UploadLifecycle:
    """A lifecycle brought to ``state`` through legal moves only (a shortest path)."""
    paths: dict[UploadState, list[UploadState]] = {UploadState.ACTIVE: []}
    frontier = [UploadState.ACTIVE]
    while frontier:
        current = frontier.pop(0)
        for following in sorted(UPLOAD_TRANSITIONS[current], key=lambda s: s.value):
            if following not in paths:
                paths[following] = [*paths[current], following]
                frontier.append(following)
    lifecycle = UploadLifecycle("u")
    for step in paths[state]:
        lifecycle.move_to(step)
    assert lifecycle.state is state
    return lifecycle


def test_every_state_has_a_row_and_is_reachable() -> None:
    assert set(UPLOAD_TRANSITIONS) == set(UploadState)
    for state in UploadState:
        _lifecycle_in(state)


@pytest.mark.parametrize(("current", "target"), list(itertools.product(UploadState, UploadState)))
def test_the_table_decides_every_move(current: UploadState, target: UploadState) -> None:
    lifecycle = _lifecycle_in(current)
    allowed = target in UPLOAD_TRANSITIONS[current]

    assert lifecycle.can_move_to(target) is allowed
    if allowed:
        lifecycle.move_to(target)
        assert lifecycle.state is target
    else:
        with pytest.raises(IllegalTransitionError) as refused:
            lifecycle.move_to(target)
        assert lifecycle.state is current  # a refused move changes nothing
        assert refused.value.current is current
        assert refused.value.target is target


def test_finished_states_are_final() -> None:
    assert UPLOAD_TRANSITIONS[UploadState.COMPLETED] == frozenset()
    assert UPLOAD_TRANSITIONS[UploadState.ABORTED] == frozenset()
    assert UploadState.ACTIVE not in set().union(*UPLOAD_TRANSITIONS.values())
