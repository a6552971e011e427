"""A state and the moves it may make, written down and checked (the idea of h11's ``_state``).

Objects with a life (an acceptor, a reload generation) keep their state in a `StateMachine`
built from an enum and a table of allowed moves instead of flags: a move the table does not
allow raises at once, where the bug is, rather than leaving a state that a later step misreads.
(A connection keeps the same kind of table inline, in ``_asyncio/_inbox``: it is the hot
object, and a second object per connection would cost memory.)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

__all__ = ["StateMachine"]

E = TypeVar("E", bound=enum.Enum)


class StateMachine(Generic[E]):
    """The current state of one object; every move is checked against its table.

    Args:
        what: What is in this state, for the error message ("acceptor", "generation").
        initial: The state it starts in.
        moves: From each state, the states it may go to next (a final state maps to nothing).
    """

    __slots__ = ("_moves", "_state", "_what")

    def __init__(self, what: str, initial: E, moves: Mapping[E, frozenset[E]]) -> None:
        self._what = what
        self._state = initial
        self._moves = moves

    @property
    def state(self) -> E:
        """The current state (change it with `move`)."""
        return self._state

    def move(self, new: E) -> None:
        """Go to ``new``.

        Raises:
            RuntimeError: the table does not allow it from the current state (a bug in this
                package: nothing a caller can do causes it).
        """
        if new not in self._moves[self._state]:
            raise RuntimeError(
                f"{self._what} state {self._state.value!r} cannot become {new.value!r}: a bug "
                "in aioancillary, please report it"
            )
        self._state = new

    def move_from(self, current: E, new: E) -> bool:
        """Go to ``new`` if the state is still ``current`` (an ``await`` may have moved it).

        Returns:
            Whether the state moved.
        """
        if self._state is not current:
            return False
        self.move(new)
        return True

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._state.value}>"
