"""The fd holder's store without sockets: bounds, names, expiry, claims (hypothesis).

The store holds plain ints here. The state machine checks, after every step, that each fd
ever handed to the store is in exactly one place: in an entry, or given back to the caller to
close (refused, deleted, expired, removed after a claim); never both, never twice, never lost.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from aioancillary._fdholder._store import MAX_ENTRIES_CAP, Store, StoreError, check_name

T = TypeVar("T")


def attempt(call: Callable[[], T]) -> tuple[T | None, str | None]:
    """``(result, None)``, or ``(None, code)`` when the store refuses."""
    try:
        return call(), None
    except StoreError as exc:
        return None, exc.code


NAMES = st.sampled_from(["a", "b", "c", "web", "state files"])
OWNERS = st.sampled_from(["client-1", "client-2"])


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store: Store[int] = Store(max_entries=3, max_fds=6, max_fds_per_entry=4)
        self.now = 0.0
        self.numbers = itertools.count()
        self.given_back: list[int] = []  # fds the store returned or refused: the caller closes
        self.handed: list[int] = []  # every fd ever offered to the store

    def _fds(self, count: int) -> list[int]:
        fds = [next(self.numbers) for _ in range(count)]
        self.handed += fds
        return fds

    @rule(name=NAMES, count=st.integers(0, 5), timeout=st.none() | st.floats(0.5, 10.0))
    def add(self, name: str, count: int, timeout: float | None) -> None:
        fds = self._fds(count)
        before = (len(self.store), self.store.fd_count)
        entry, code = attempt(lambda: self.store.add(name, fds, timeout, self.now))
        if entry is None:
            assert code in {"fds", "exists", "full"}
            assert (len(self.store), self.store.fd_count) == before
            self.given_back += fds  # refused: the caller still owns them
            return
        assert entry.fds == tuple(fds)
        assert entry.deadline == (None if timeout is None else self.now + timeout)

    @rule(name=NAMES, owner=st.none() | OWNERS)
    def delete(self, name: str, owner: str | None) -> None:
        entry, code = attempt(lambda: self.store.delete(name, owner))
        if entry is None:
            assert code in {"not-found", "busy"}
            if code == "busy":
                assert self.store.get(name).claim not in (None, owner)
            return
        assert name not in self.store
        self.given_back += entry.fds

    @rule(name=NAMES, owner=OWNERS)
    def claim(self, name: str, owner: str) -> None:
        entry, code = attempt(lambda: self.store.claim(name, owner))
        if entry is None:
            assert code in {"not-found", "busy"}
            return
        assert entry.claim == owner

    @rule(name=NAMES, owner=OWNERS)
    def remove_claimed(self, name: str, owner: str) -> None:
        claimed = name in self.store and self.store.get(name).claim == owner
        entry = self.store.remove_claimed(name, owner)
        assert (entry is not None) == claimed
        if entry is not None:
            self.given_back += entry.fds

    @rule(owner=OWNERS)
    def release(self, owner: str) -> None:
        self.store.release(owner)
        assert all(entry.claim != owner for entry in self.store)

    @rule(seconds=st.floats(0.0, 4.0))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        for entry in self.store.expire(self.now):
            assert entry.deadline is not None
            assert entry.deadline <= self.now
            self.given_back += entry.fds

    @precondition(lambda self: len(self.store) > 0)
    @rule()
    def take_all(self) -> None:
        for entry in self.store.take_all():
            self.given_back += entry.fds
        assert self.store.fd_count == 0

    @invariant()
    def every_fd_in_exactly_one_place(self) -> None:
        held = [fd for entry in self.store for fd in entry.fds]
        assert sorted(held + self.given_back) == sorted(self.handed)

    @invariant()
    def bounds_hold(self) -> None:
        assert len(self.store) <= 3
        assert self.store.fd_count == sum(len(entry.fds) for entry in self.store) <= 6
        assert all(1 <= len(entry.fds) <= 4 for entry in self.store)

    @invariant()
    def nothing_overdue_after_expiry(self) -> None:
        deadline = self.store.next_deadline()
        live = [e.deadline for e in self.store if e.deadline is not None]
        assert deadline == (min(live) if live else None)

    @invariant()
    def listing_matches(self) -> None:
        listing = self.store.listing(self.now)
        assert [item.name for item in listing] == sorted(entry.name for entry in self.store)
        for item in listing:
            assert item.expires_in is None or item.expires_in >= 0


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


@given(st.text(max_size=300))
def test_check_name_is_systemd_fdname_and_not_empty(name: str) -> None:
    valid = 0 < len(name) <= 255 and all(" " <= ch <= "~" and ch != ":" for ch in name)
    result, code = attempt(lambda: check_name(name))
    if valid:
        assert result == name
    else:
        assert code == "name", name


@pytest.mark.parametrize("name", [None, 3, b"web", ["web"]])
def test_a_name_that_is_not_a_string_is_a_malformed_request(name: object) -> None:
    with pytest.raises(StoreError) as caught:
        check_name(name)
    assert caught.value.code == "request"


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan"), True, "5", [5]])
def test_bad_timeouts_are_refused(timeout: object) -> None:
    store: Store[int] = Store(max_entries=1, max_fds=1)
    with pytest.raises(StoreError) as caught:
        store.add("a", [1], timeout, 0.0)
    assert caught.value.code == "request"
    assert len(store) == 0


def test_refusals_say_what_bound_and_how_to_fix() -> None:
    store: Store[int] = Store(max_entries=1, max_fds=2)
    store.add("a", [1], None, 0.0)
    with pytest.raises(StoreError, match=r"max_entries=1.*raise the bound"):
        store.add("b", [2], None, 0.0)
    with pytest.raises(StoreError, match="already stored; delete it first"):
        store.add("a", [2], None, 0.0)
    store = Store(max_entries=5, max_fds=2)
    with pytest.raises(StoreError, match=r"holds 0 of at most 2 \(max_fds\)"):
        store.add("a", [1, 2, 3], None, 0.0)


def test_bounds_are_checked_when_the_store_is_made() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        Store(max_entries=MAX_ENTRIES_CAP + 1, max_fds=1)
    with pytest.raises(ValueError, match="max_fds"):
        Store(max_entries=1, max_fds=0)
