"""The state table shared by the acceptor and reload generations (no sockets)."""

from __future__ import annotations

import enum

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aioancillary._core._states import StateMachine


class Light(enum.Enum):
    RED = "red"
    GREEN = "green"
    AMBER = "amber"
    OFF = "off"


MOVES = {
    Light.RED: frozenset({Light.GREEN, Light.OFF}),
    Light.GREEN: frozenset({Light.AMBER, Light.OFF}),
    Light.AMBER: frozenset({Light.RED, Light.OFF}),
    Light.OFF: frozenset[Light](),
}


@given(st.lists(st.sampled_from(list(Light)), max_size=30))
def test_exactly_the_table_s_moves_happen(moves: list[Light]) -> None:
    machine = StateMachine("light", Light.RED, MOVES)
    for new in moves:
        before = machine.state
        if new in MOVES[before]:
            machine.move(new)
            assert machine.state is new
        else:
            with pytest.raises(RuntimeError, match=f"light state '{before.value}' cannot become"):
                machine.move(new)
            assert machine.state is before  # a refused move changes nothing


def state_of(machine: StateMachine[Light]) -> Light:
    """The state read afresh (mypy would carry an assert's narrowing across a move)."""
    return machine.state


def test_move_from_moves_only_from_the_state_named() -> None:
    machine = StateMachine("light", Light.RED, MOVES)
    assert not machine.move_from(Light.GREEN, Light.AMBER)  # moved on meanwhile: nothing
    assert state_of(machine) is Light.RED
    assert machine.move_from(Light.RED, Light.GREEN)
    assert state_of(machine) is Light.GREEN
    with pytest.raises(RuntimeError):
        machine.move_from(Light.GREEN, Light.RED)  # the right state, a move not in the table
    assert repr(machine) == "<StateMachine green>"
