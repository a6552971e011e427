"""An acceptor's states and the transitions allowed between them, as a table (sans-I/O).

::

              a worker has room, no client held
    paused ◀──────────────────────────────────▶ accepting
     ▲  │        every worker full, or held       │
     │  │                                         │ out of fds or memory (the burst
     │  └──────────────────────────────────▶ cooling ◀┘  that hit it may have paused)
     └─────────── the paced retry is due ─────────┘

    paused, accepting, cooling ──stop_accepting()──▶ stopped ──close()──▶ closed

    every state ──fork(), in the child's copy──▶ closed

Only ``accepting`` has the listeners' readers registered. ``stopped`` still serves the
workers and the clients in flight (the listeners are closed); ``closed`` has ended the
workers' links. A move the table does not list is a bug in this package:
[`AcceptorStates.move`][] raises ``RuntimeError``.
"""

from __future__ import annotations

import enum

from .._core._states import StateMachine

__all__ = ["TRANSITIONS", "AcceptorState", "AcceptorStates"]


class AcceptorState(enum.Enum):
    """Where an acceptor is in its life."""

    #: Not reading the listeners: no worker has room, clients are held, or nothing to serve.
    PAUSED = "paused"
    #: The listeners' readers are registered.
    ACCEPTING = "accepting"
    #: ``accept()`` failed for lack of fds or memory: readers removed until a paced retry.
    COOLING = "cooling"
    #: ``stop_accepting()``: the listeners are closed; workers finish their clients.
    STOPPED = "stopped"
    #: ``close()`` (or the inert copy in a forked child): the workers' links are ended.
    CLOSED = "closed"


_S = AcceptorState

#: The allowed moves: from each state, the states it may go to next.
TRANSITIONS: dict[AcceptorState, frozenset[AcceptorState]] = {
    _S.PAUSED: frozenset({_S.ACCEPTING, _S.COOLING, _S.STOPPED, _S.CLOSED}),
    _S.ACCEPTING: frozenset({_S.PAUSED, _S.COOLING, _S.STOPPED, _S.CLOSED}),
    _S.COOLING: frozenset({_S.PAUSED, _S.STOPPED, _S.CLOSED}),
    _S.STOPPED: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}


class AcceptorStates(StateMachine[AcceptorState]):
    """The current state of one acceptor; every move is checked against `TRANSITIONS`."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("acceptor", AcceptorState.PAUSED, TRANSITIONS)
