"""A generation's states and the transitions allowed between them, as a table.

::

    starting ──ready()──▶ committing ──predecessor released──▶ serving ◀─────────────┐
                              │                                   │ valid hello     │ failed,
                              ▼ predecessor aborted, timed out    ▼                 │ timed out
                            failed                           handing-over ──────────┘
                                                                  │ successor "ready"
                                                                  ▼
                                                             handed-over

    every state ──close()──▶ closed

Only a valid ``hello`` from an authorized peer moves ``serving`` to ``handing-over``: a peer
that connects and says nothing changes nothing. A move the table does not list is a bug in
this package, never a peer's doing: [`GenerationStates.move`][] raises ``RuntimeError``.
"""

from __future__ import annotations

import enum

__all__ = ["GenerationState", "GenerationStates"]


class GenerationState(enum.Enum):
    """Where a generation is in its life."""

    #: Its fds were fetched (or created); it takes and offers them.
    STARTING = "starting"
    #: ``ready()`` runs: unclaimed fds closed, the predecessor is being told.
    COMMITTING = "committing"
    #: It serves, and offers its fds on the handoff socket to the next generation.
    SERVING = "serving"
    #: A successor said hello: its fds are on their way; it waits for that one's ``ready``.
    HANDING_OVER = "handing-over"
    #: A successor serves; this generation only finishes what it accepted.
    HANDED_OVER = "handed-over"
    #: ``ready()`` failed: the predecessor serves on; this generation must close and exit.
    FAILED = "failed"
    #: ``close()`` was called: it holds no fd.
    CLOSED = "closed"


_S = GenerationState

#: The allowed moves: from each state, the states it may go to next.
TRANSITIONS: dict[GenerationState, frozenset[GenerationState]] = {
    _S.STARTING: frozenset({_S.COMMITTING, _S.CLOSED}),
    _S.COMMITTING: frozenset({_S.SERVING, _S.FAILED, _S.CLOSED}),
    _S.SERVING: frozenset({_S.HANDING_OVER, _S.CLOSED}),
    _S.HANDING_OVER: frozenset({_S.SERVING, _S.HANDED_OVER, _S.CLOSED}),
    _S.HANDED_OVER: frozenset({_S.CLOSED}),
    _S.FAILED: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}


class GenerationStates:
    """The current state of one generation; every move is checked against `TRANSITIONS`."""

    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state = GenerationState.STARTING

    @property
    def state(self) -> GenerationState:
        """The current state."""
        return self._state

    def move(self, new: GenerationState) -> None:
        """Go to ``new``.

        Raises:
            RuntimeError: the table does not allow it (a bug in this package).
        """
        if new not in TRANSITIONS[self._state]:
            raise RuntimeError(
                f"a generation cannot go from {self._state.value} to {new.value}: this is a "
                "bug in aioancillary, please report it"
            )
        self._state = new

    def move_from(self, current: GenerationState, new: GenerationState) -> bool:
        """Go to ``new`` if the state is ``current`` (still: an await may have closed it).

        Returns:
            Whether the state moved.
        """
        if self._state is not current:
            return False
        self.move(new)
        return True

    def __repr__(self) -> str:
        return f"<GenerationStates {self._state.value}>"
