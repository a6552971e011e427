"""The acceptor's bookkeeping without sockets: every client in exactly one place, no worker
over its limit, the listeners read exactly when a worker has room (hypothesis), and the
acceptor's state table."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aioancillary import ProtocolError
from aioancillary._handoff._acceptor_state import TRANSITIONS, AcceptorState, AcceptorStates
from aioancillary._handoff._dispatch import LeastBusy, RoundRobin
from aioancillary._handoff._ledger import Item, Ledger, WorkerSlot

Slot = WorkerSlot[str]


def _record(addr: Any) -> bytes:
    return b"r" + str(addr).encode()


class LedgerMachine(RuleBasedStateMachine):
    """Drives a ledger the way the acceptor does, and tracks every client (by its fd number)
    in a model: at a worker (handed, not finished), held, finished, lost or closed."""

    def __init__(self) -> None:
        super().__init__()
        self.fds = itertools.count(3)
        self.names = itertools.count()
        self.ledger: Ledger[str] = Ledger(LeastBusy(), 1)
        self.at: dict[int, list[int]] = {}  # slot index -> fds handed, not finished
        self.gone: dict[int, Slot] = {}  # slots that left, by index
        self.finished = 0
        self.lost = 0
        self.closed = 0

    @initialize(policy=st.sampled_from([LeastBusy, RoundRobin]), limit=st.integers(1, 4))
    def start(self, policy: type[LeastBusy | RoundRobin], limit: int) -> None:
        self.ledger = Ledger(policy(), limit)

    # -- helpers --------------------------------------------------------------------------------

    def _flush(self, outcomes: st.DataObject) -> None:
        """What the acceptor's flush does: each dirty worker's link takes a prefix."""
        dirty, self.ledger.dirty = self.ledger.dirty, []
        for slot in dirty:
            items, slot.pending = slot.pending, []
            taken = outcomes.draw(
                st.sampled_from([len(items), len(items), 0, len(items) // 2]), label="taken"
            )
            sent = self.ledger.sent(slot, items, taken)
            assert sent == items[:taken]
            self.at[slot.index] += [fd for _record, fd in sent]
            if taken < len(items):
                assert slot.cap == 0  # it rests until reopened

    def _live(self) -> list[Slot]:
        return list(self.ledger.workers)

    def _present(self) -> list[Slot]:
        """Workers that have not left: live ones and retiring ones."""
        return [*self.ledger.workers, *self.ledger.retiring]

    # -- rules ----------------------------------------------------------------------------------

    @rule()
    def join(self) -> None:
        index = next(self.names)
        slot = self.ledger.join(f"link{index}", index, pid=None)
        self.at[index] = []
        assert slot.cap == slot.limit == self.ledger.limit

    @rule(most=st.integers(1, 8), outcomes=st.data())
    def wake(self, most: int, outcomes: st.DataObject) -> None:
        """A listener's wake-up: accept what the workers have room for, assign, flush."""
        room = self.ledger.free_places(most)
        free = sum(max(0, s.cap - s.in_flight) for s in self._live())
        assert room == min(most, free)
        accepted = [(next(self.fds), ("127.0.0.1", n)) for n in range(room)]
        self.ledger.assign(accepted, _record)
        # With room for each of them, none is held by the policy.
        assert sum(len(s.pending) for s in self._live()) == room
        for slot in self._live():
            assert slot.in_flight <= slot.limit
        self._flush(outcomes)

    @precondition(lambda self: bool(self.ledger.held))
    @rule(outcomes=st.data())
    def hand_held(self, outcomes: st.DataObject) -> None:
        self.ledger.hand_held()
        # Held clients go out first: either none is left, or no worker has room.
        assert not self.ledger.held or not self.ledger.has_room()
        self._flush(outcomes)

    @precondition(lambda self: bool(self.ledger.workers or self.ledger.retiring))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self._present()), label="worker")
        handed = self.at[slot.index]
        if not handed:
            with pytest.raises(ProtocolError):
                self.ledger.completed_by(slot, 1)  # a report for more than it holds
            return
        count = data.draw(st.integers(1, len(handed)), label="count")
        self.ledger.completed_by(slot, count)
        del handed[:count]
        self.finished += count

    @rule(data=st.data())
    def take_back(self, data: st.DataObject) -> None:
        """Its transport returns clients it never sent (the newest ones), live or left."""
        candidates = [s for s in self._present() if self.at[s.index]] + [
            s for s in self.gone.values() if self.at[s.index]
        ]
        if not candidates:
            return
        slot = data.draw(st.sampled_from(candidates), label="worker")
        handed = self.at[slot.index]
        count = data.draw(st.integers(1, len(handed)), label="count")
        back, self.at[slot.index] = handed[-count:], handed[:-count]
        if slot.index in self.gone:
            self.lost -= count  # counted lost when it left
        self.ledger.taken_back(slot, [(b"r", fd) for fd in back])

    @precondition(lambda self: bool(self.ledger.workers or self.ledger.retiring))
    @rule(data=st.data(), dropped_first=st.booleans())
    def leave(self, data: st.DataObject, dropped_first: bool) -> None:
        slot = data.draw(st.sampled_from(self._present()), label="worker")
        if dropped_first:
            self.ledger.drop(slot)
            assert slot.cap == 0
            assert self.ledger.pick() is not slot
        lost = self.ledger.left(slot)
        assert lost == len(self.at[slot.index])
        assert self.ledger.left(slot) == 0  # once per worker
        self.lost += lost
        self.gone[slot.index] = slot

    @precondition(lambda self: bool(self.ledger.workers))
    @rule(data=st.data())
    def retire(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self._live()), label="worker")
        self.ledger.retire(slot)
        assert slot not in self.ledger.workers
        assert slot.cap == 0
        with pytest.raises(ValueError, match="not a registered worker"):
            self.ledger.retire(slot)
        with pytest.raises(ValueError, match="not one of the workers"):
            self.ledger.checked_choice(slot)

    @precondition(lambda self: bool(self.ledger.workers or self.ledger.retiring))
    @rule(data=st.data(), full=st.booleans())
    def socket_full_or_drained(self, data: st.DataObject, full: bool) -> None:
        slot = data.draw(st.sampled_from(self._present()), label="worker")
        if full:
            self.ledger.full(slot)
            assert slot.cap == 0
        else:
            self.ledger.room_again(slot)
            assert slot.cap == (0 if slot.gone or slot.retired else slot.limit)

    @precondition(lambda self: bool(self.ledger.workers or self.ledger.retiring))
    @rule(data=st.data())
    def reopen(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self._present()), label="worker")
        if self.ledger.reopen(slot):
            assert slot.cap == slot.limit
        else:
            assert slot.paused or slot.gone or slot.retired

    @rule()
    def close_held(self) -> None:
        items = self.ledger.close_held()
        self.closed += len(items)
        assert not self.ledger.held

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def every_client_is_in_exactly_one_place(self) -> None:
        ledger = self.ledger
        held = [fd for _record, fd in ledger.held]
        at_workers = [fd for s in self._present() for fd in self.at[s.index]]
        everywhere = held + at_workers
        assert len(everywhere) == len(set(everywhere))
        assert ledger.accepted == (
            sum(s.in_flight for s in self._present())
            + len(ledger.held)
            + ledger.completed
            + ledger.lost
            + ledger.closed
        )
        assert (ledger.completed, ledger.lost, ledger.closed) == (
            self.finished,
            self.lost,
            self.closed,
        )
        for slot in self._present():
            assert not slot.pending  # sent within the wake-up that assigned them
            assert slot.in_flight == len(self.at[slot.index])
            assert slot.handed - slot.completed >= slot.in_flight
        assert ledger.in_flight == sum(s.in_flight for s in self._present()) + len(ledger.held)

    @invariant()
    def no_worker_over_its_limit(self) -> None:
        for slot in self._present():
            assert 0 <= slot.in_flight <= slot.limit
            assert slot.cap in (0, slot.limit)
        for slot in self.ledger.retiring:
            assert slot.cap == 0  # a retiring worker is never given a client

    @invariant()
    def listeners_are_read_exactly_when_a_worker_has_room(self) -> None:
        ledger = self.ledger
        room = any(s.in_flight < s.cap for s in self._live())
        assert ledger.has_room() == room
        assert ledger.wants_clients() == (room and not ledger.held)
        assert (ledger.free_places(64) > 0) == room


TestLedger = LedgerMachine.TestCase
TestLedger.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


@given(st.lists(st.integers(0, 4), min_size=1, max_size=6))
def test_a_pickers_choice_must_be_a_live_worker(loads: list[int]) -> None:
    ledger: Ledger[str] = Ledger(LeastBusy(), 4)
    slots = [ledger.join(f"l{i}", i, None) for i in range(len(loads))]
    for slot, load in zip(slots, loads, strict=True):
        slot.in_flight = load
    for slot in slots:
        assert ledger.checked_choice(slot) is slot  # even at its limit: the picker's call
    # None: the policy picks (a worker with room, if any).
    choice = ledger.checked_choice(None)
    if ledger.has_room():
        assert choice in slots
        assert choice is not None
        assert choice.in_flight < choice.cap
    else:
        assert choice is None
    for stranger in ("not a worker", WorkerSlot("x", 99, 4, None)):
        with pytest.raises(ValueError, match="not one of the workers"):
            ledger.checked_choice(stranger)
    ledger.drop(slots[0])
    with pytest.raises(ValueError, match="not one of the workers"):
        ledger.checked_choice(slots[0])


def test_held_clients_are_assigned_when_no_worker_has_room() -> None:
    ledger: Ledger[str] = Ledger(LeastBusy(), 1)
    items: list[Item] = []
    ledger.assign([(5, "a")], _record)  # no worker at all
    assert [fd for _r, fd in ledger.held] == [5]
    assert not ledger.wants_clients()
    slot = ledger.join("l", 0, None)
    ledger.hand_held()
    assert ledger.dirty == [slot]
    ledger.dirty = []
    items, slot.pending = slot.pending, []
    assert ledger.sent(slot, items, 1) == items
    assert not ledger.held
    assert not ledger.wants_clients()  # its one place is taken
    ledger.completed_by(slot, 1)
    assert ledger.wants_clients()


# -- the acceptor's states ------------------------------------------------------------------------


def test_the_state_table_covers_every_state_and_closed_is_final() -> None:
    assert set(TRANSITIONS) == set(AcceptorState)
    assert TRANSITIONS[AcceptorState.CLOSED] == frozenset()
    for state, targets in TRANSITIONS.items():
        assert state not in targets
        if state is not AcceptorState.CLOSED:
            assert AcceptorState.CLOSED in targets  # close() and fork reach it from anywhere
    # Only a paused or accepting acceptor starts cooling; a stopped one never reads again.
    cooling_from = {s for s, targets in TRANSITIONS.items() if AcceptorState.COOLING in targets}
    assert cooling_from == {AcceptorState.PAUSED, AcceptorState.ACCEPTING}
    assert TRANSITIONS[AcceptorState.STOPPED] == {AcceptorState.CLOSED}


@given(st.lists(st.sampled_from(list(AcceptorState)), max_size=12))
def test_moves_outside_the_table_are_refused(moves: list[AcceptorState]) -> None:
    states = AcceptorStates()
    assert states.state is AcceptorState.PAUSED
    for new in moves:
        before = states.state
        if new in TRANSITIONS[before]:
            states.move(new)
            assert states.state is new
        else:
            with pytest.raises(RuntimeError, match="cannot become"):
                states.move(new)
            assert states.state is before
