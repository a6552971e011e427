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

from .._core._states import StateMachine

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


class GenerationStates(StateMachine[GenerationState]):
    """The current state of one generation; every move is checked against `TRANSITIONS`."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("generation", GenerationState.STARTING, TRANSITIONS)
