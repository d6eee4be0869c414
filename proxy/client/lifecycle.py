"""One upload's lifecycle on the client: one enum, one transition table, one recorded failure.

In the manner of :mod:`protocol._state`: :data:`TRANSITIONS` is the whole truth about which
state may follow which, and :meth:`Lifecycle.move` raises :class:`IllegalTransitionError` for
anything else. The connections and the caller's calls (``complete()``, ``abort()``, leaving
:func:`~proxy.client.connect_upload`'s block) drive it; nobody sets a flag behind its back.
"""

from __future__ import annotations

import enum
from typing import Final

from proxy.client.errors import UploadError

__all__ = ["TERMINAL", "TRANSITIONS", "IllegalTransitionError", "Lifecycle", "UploadState"]


class UploadState(enum.Enum):
    NEW = "NEW"
    """No token yet, and no connection is opening the upload."""
    OPENING = "OPENING"
    """One connection is sending OpenUpload; the others wait for its token."""
    SENDING = "SENDING"
    """The token is known: connections attach, send, and the caller may complete or abort."""
    ABORTING = "ABORTING"
    """abort() was called: no new frames, and ABORTED refusals are the expected outcome."""
    COMPLETED = "COMPLETED"
    """The object exists and matched what was sent; later complaints about frames change nothing."""
    ABORTED = "ABORTED"
    """The Abort was answered, or could not be confirmed; nothing more is sent."""
    FAILED = "FAILED"
    """An :class:`UploadError` ended the upload; it is :attr:`Lifecycle.failure`."""
    DETACHED = "DETACHED"
    """The caller left without completing or aborting (cancelled, interrupted): the proxy
    keeps the upload resumable with its token."""


_S = UploadState

TRANSITIONS: Final[dict[UploadState, frozenset[UploadState]]] = {
    _S.NEW: frozenset({_S.OPENING, _S.SENDING, _S.FAILED, _S.DETACHED}),
    # back to NEW: the connection sending OpenUpload was lost before the reply
    _S.OPENING: frozenset({_S.NEW, _S.SENDING, _S.FAILED, _S.DETACHED}),
    # back to NEW: the proxy cannot resume the token, and the source still holds every byte
    _S.SENDING: frozenset({_S.NEW, _S.ABORTING, _S.COMPLETED, _S.FAILED, _S.DETACHED}),
    _S.ABORTING: frozenset({_S.ABORTED, _S.FAILED, _S.DETACHED}),
    _S.COMPLETED: frozenset(),
    _S.ABORTED: frozenset(),
    _S.FAILED: frozenset(),
    _S.DETACHED: frozenset(),
}
"""For each state, the states that may follow it."""

TERMINAL: Final = frozenset(state for state, nexts in TRANSITIONS.items() if not nexts)
"""States in which no connection sends anything any more."""


class IllegalTransitionError(RuntimeError):
    """A bug: the client tried a move its own transition table forbids."""

    def __init__(self, current: UploadState, wanted: UploadState) -> None:
        super().__init__(f"an upload cannot go from {current.name} to {wanted.name}")
        self.current = current
        self.wanted = wanted


class Lifecycle:
    """The current state of one upload, and the error that failed it (if one did)."""

    def __init__(self, initial: UploadState = UploadState.NEW) -> None:
        self._state = initial
        self._failure: UploadError | None = None

    @property
    def state(self) -> UploadState:
        return self._state

    @property
    def failure(self) -> UploadError | None:
        return self._failure

    def at(self, state: UploadState) -> bool:
        """Whether the upload is in ``state`` now (a call, so type checkers re-read it)."""
        return self._state is state

    @property
    def over(self) -> bool:
        """Whether nothing more will be sent (the state is terminal)."""
        return self._state in TERMINAL

    def move(self, wanted: UploadState) -> None:
        """Go to ``wanted``; :class:`IllegalTransitionError` if the table does not allow it."""
        if wanted not in TRANSITIONS[self._state]:
            raise IllegalTransitionError(self._state, wanted)
        self._state = wanted

    def fail(self, error: UploadError) -> bool:
        """Record ``error`` and go to FAILED; False (nothing changes) once the upload is over.

        A completed upload stays completed, and the first failure is the one reported.
        """
        if self.over:
            return False
        self.move(UploadState.FAILED)
        self._failure = error
        return True

    def check(self) -> None:
        """Raise the failure, if there is one."""
        if self._failure is not None:
            raise self._failure
