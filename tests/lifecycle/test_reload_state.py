"""A generation's states: the transition table itself (no sockets), and real generations
walking it during handoffs that succeed and fail."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest
from helpers import wait_until, within
from helpers.reload import NEVER, closing, first_generation, raw_successor, retry_busy
from hypothesis import given
from hypothesis import strategies as st

from aioancillary._lifecycle._reload import Generation, HandoffError, start_generation
from aioancillary._lifecycle._reload_state import TRANSITIONS, GenerationState, GenerationStates

S = GenerationState


def machine_in(state: GenerationState) -> GenerationStates:
    machine = GenerationStates()
    machine._state = state
    return machine


# -- the table ----------------------------------------------------------------------------------


@pytest.mark.parametrize("start", list(S))
@pytest.mark.parametrize("new", list(S))
def test_exactly_the_listed_moves_are_allowed(start: GenerationState, new: GenerationState) -> None:
    machine = machine_in(start)
    if new in TRANSITIONS[start]:
        machine.move(new)
        assert machine.state is new
    else:
        with pytest.raises(
            RuntimeError, match=f"generation state '{start.value}' cannot become '{new.value}'"
        ):
            machine.move(new)
        assert machine.state is start  # a refused move changes nothing


def _reachable(start: GenerationState) -> set[GenerationState]:
    seen = {start}
    todo = deque([start])
    while todo:
        for new in TRANSITIONS[todo.popleft()] - seen:
            seen.add(new)
            todo.append(new)
    return seen


def test_every_state_is_reachable_and_every_state_can_close() -> None:
    assert set(TRANSITIONS) == set(S)
    assert _reachable(S.STARTING) == set(S)
    for state in S:
        assert S.CLOSED in _reachable(state)
    assert TRANSITIONS[S.CLOSED] == frozenset()  # closed is final
    for state in S:  # a generation never goes back to starting, and only close() ends it
        assert S.STARTING not in TRANSITIONS[state]
        assert S.CLOSED in TRANSITIONS[state] or state is S.CLOSED


@given(st.lists(st.tuples(st.sampled_from(list(S)), st.sampled_from(list(S))), max_size=30))
def test_any_sequence_of_moves_follows_the_table(
    moves: list[tuple[GenerationState, GenerationState]],
) -> None:
    """``move_from(expected, new)``: no move unless the state is ``expected``; then checked."""
    machine = GenerationStates()
    for expected, new in moves:
        before = machine.state
        if expected is not before:
            assert not machine.move_from(expected, new)
            assert machine.state is before
        elif new in TRANSITIONS[before]:
            assert machine.move_from(expected, new)
            assert machine.state is new
        else:
            with pytest.raises(RuntimeError):
                machine.move_from(expected, new)
            assert machine.state is before


# -- real generations walk it -------------------------------------------------------------------


@pytest.fixture
def moves(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[GenerationState]]:
    """Every state each generation went through, by id() of its state object."""
    seen: dict[int, list[GenerationState]] = {}
    original = GenerationStates.move

    def recording(self: GenerationStates, new: GenerationState) -> None:
        original(self, new)
        seen.setdefault(id(self), [S.STARTING]).append(new)

    monkeypatch.setattr(GenerationStates, "move", recording)
    return seen


def walked(moves: dict[int, list[GenerationState]], gen: Generation) -> list[GenerationState]:
    return moves[id(gen._states)]


async def test_a_handoff_walks_the_documented_path(
    tmp_path: Path, moves: dict[int, list[GenerationState]]
) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    async with closing(g1):
        g2 = await within(start_generation(path))
        async with closing(g2):
            g2.take_socket("web").close()
            g2.take_fd("state").close()
            await within(g2.ready())
            await within(g1.handed_over())
            assert "handed-over" in repr(g1)
    assert walked(moves, g1) == [
        S.STARTING,
        S.COMMITTING,
        S.SERVING,
        S.HANDING_OVER,
        S.HANDED_OVER,
        S.CLOSED,
    ]
    assert walked(moves, g2) == [S.STARTING, S.COMMITTING, S.SERVING, S.CLOSED]


async def test_a_failed_handoff_goes_back_to_serving_and_the_successor_fails(
    tmp_path: Path, moves: dict[int, list[GenerationState]]
) -> None:
    path = tmp_path / "handoff.sock"
    # The step that must time out (the successor's "ready") waits on a successor that sends
    # it only once it has seen the abort.
    g1 = await first_generation(path, timeout=NEVER, ready_timeout=0.2)
    async with closing(g1):
        conn, _body, msg = await raw_successor(path)  # takes the fds, then gives up
        msg.close()
        conn.close()
        await within(conn.wait_closed())
        g2 = await retry_busy(path)
        async with closing(g2):
            g2.take_socket("web").close()
            await within(_aborted(g1))
            with pytest.raises(HandoffError, match="gave up this handoff"):
                await within(g2.ready())
    assert walked(moves, g1) == [
        S.STARTING,
        S.COMMITTING,
        S.SERVING,
        S.HANDING_OVER,  # the raw successor
        S.SERVING,
        S.HANDING_OVER,  # g2
        S.SERVING,
        S.CLOSED,
    ]
    assert walked(moves, g2) == [S.STARTING, S.COMMITTING, S.FAILED, S.CLOSED]


async def _aborted(gen: Generation) -> None:
    """Until ``gen`` has given up its handoff (it is serving again)."""
    await wait_until(lambda: gen._states.state is S.SERVING)


async def test_closing_mid_handoff_closes(
    tmp_path: Path, moves: dict[int, list[GenerationState]]
) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    conn, _body, msg = await raw_successor(path)
    msg.close()
    async with conn:
        await within(g1.close())  # the successor holds the fds, has not said ready
        assert walked(moves, g1)[-2:] == [S.HANDING_OVER, S.CLOSED]
        with pytest.raises(Exception, match="closed"):
            await within(conn.recv())  # EOF, never "released"
