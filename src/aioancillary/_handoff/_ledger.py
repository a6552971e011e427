"""The acceptor's bookkeeping of clients and workers, without sockets (sans-I/O).

Every accepted client is, at any time, in exactly one place, and the counters say which:

* **pending** at a worker: assigned in this wake-up, not yet given to its link (the acceptor
  sends every worker's pending clients before the wake-up ends);
* **in flight** at a worker: handed to its link and not reported finished
  (``WorkerSlot.in_flight`` counts the pending ones too); a worker *retiring* (it gets no more
  clients and finishes those it holds) still counts its own;
* **held** here: no worker had room, the worker's socket refused it, or it was taken back
  from a worker that left before it was sent; held clients go out first when room appears;
* **completed**: the worker reported it finished;
* **lost**: its worker left while serving it, or before reading it from its socket;
* **closed**: the acceptor closed while it was held.

So ``accepted == in flight (all workers, retiring ones too) + held + completed + lost +
closed`` always
(``tests/handoff/test_ledger.py`` checks it, with hypothesis). A worker never gets more than
its ``cap`` from the built-in policies: its limit while it can take clients, 0 while its
socket is full, after a refused hand-off, or while it leaves. The acceptor reads its
listeners exactly when `Ledger.wants_clients` is true: some worker has room and no client
is held.

A client is an `Item`: its record for the worker (see ``_wire``) and its fd, which the
ledger never touches: the acceptor sends and closes fds.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .._core._errors import ProtocolError
from ._dispatch import DispatchPolicy

__all__ = ["Item", "Ledger", "WorkerSlot"]

#: One accepted client on its way to a worker: its record (``_wire``) and its fd.
Item = tuple[bytes, int]

L = TypeVar("L")


class WorkerSlot(Generic[L]):
    """One registered worker as the bookkeeping sees it (a [`WorkerInfo`][aioancillary.WorkerInfo]).

    ``link`` is the acceptor's object for the worker's connection: the ledger only carries it.
    """

    __slots__ = (
        "cap",
        "completed",
        "gone",
        "handed",
        "in_flight",
        "index",
        "limit",
        "link",
        "paused",
        "pending",
        "pid",
        "refusing",
        "retired",
    )

    def __init__(self, link: L, index: int, limit: int, pid: int | None) -> None:
        self.link = link
        self.index = index
        self.pid = pid
        self.limit = limit
        self.cap = limit
        self.in_flight = 0  # pending + handed and not reported finished
        self.handed = 0
        self.completed = 0
        self.pending: list[Item] = []  # assigned in this wake-up, not yet given to the link
        self.gone = False  # left (or is being dropped): never picked again
        self.paused = False  # its socket is full: nothing until it reads
        self.refusing = False  # its last hand-off failed: resting until a retry
        self.retired = False  # retiring: no more clients, it finishes those it holds

    def __repr__(self) -> str:
        return (
            f"<worker #{self.index} pid={self.pid} in_flight={self.in_flight}/{self.limit}"
            f"{' gone' if self.gone else ''}>"
        )


class Ledger(Generic[L]):
    """Clients and workers of one acceptor: who holds what, who gets the next client.

    Args:
        policy: Picks a worker with room (``_dispatch``).
        limit: Each worker's limit (``worker_limit``).
    """

    __slots__ = (
        "_pick",
        "accepted",
        "closed",
        "completed",
        "dirty",
        "handed",
        "held",
        "limit",
        "lost",
        "requeued",
        "retiring",
        "workers",
    )

    def __init__(self, policy: DispatchPolicy, limit: int) -> None:
        self._pick = policy.pick
        self.limit = limit
        #: The live workers, in registration order.
        self.workers: list[WorkerSlot[L]] = []
        #: Workers retiring: never picked, their clients still counted until they leave.
        self.retiring: list[WorkerSlot[L]] = []
        #: Clients waiting here for a worker with room, oldest first.
        self.held: collections.deque[Item] = collections.deque()
        #: Workers with pending clients, in the order they got their first one. The caller
        #: takes the list (and leaves an empty one) when it sends their clients.
        self.dirty: list[WorkerSlot[L]] = []
        self.accepted = self.handed = self.completed = 0
        self.lost = self.requeued = self.closed = 0

    # -- workers ------------------------------------------------------------------------------

    def join(self, link: L, index: int, pid: int | None) -> WorkerSlot[L]:
        """Register a worker (its link is up): it may be picked from now on."""
        slot = WorkerSlot(link, index, self.limit, pid)
        self.workers.append(slot)
        return slot

    def full(self, slot: WorkerSlot[L]) -> None:
        """Its socket is full (the link paused writing): give it nothing until `room_again`."""
        slot.paused = True
        slot.cap = 0

    def room_again(self, slot: WorkerSlot[L]) -> None:
        """Its socket drained (the link resumed writing)."""
        slot.paused = False
        if not slot.gone and not slot.retired:
            slot.cap = slot.limit
            slot.refusing = False

    def reopen(self, slot: WorkerSlot[L]) -> bool:
        """After a refused hand-off's rest: whether it may take clients again."""
        if slot.gone or slot.retired or slot.paused:
            return False
        slot.cap = slot.limit
        return True

    def retire(self, slot: WorkerSlot[L]) -> None:
        """Give it no more clients; it finishes those it holds, then leaves (`left`).

        Raises:
            ValueError: not one of the live workers.
        """
        if slot not in self.workers:
            raise ValueError(f"{slot!r} is not a registered worker of this acceptor")
        self.workers.remove(slot)
        self.retiring.append(slot)
        slot.retired = True
        slot.cap = 0

    def drop(self, slot: WorkerSlot[L]) -> None:
        """It is being dropped (it broke the protocol): pick it no more; `left` follows."""
        slot.gone = True
        slot.cap = 0

    def left(self, slot: WorkerSlot[L]) -> int:
        """It left: its pending clients are held again; those it held are lost (returned).

        Once per worker: a second call returns 0 and changes nothing.
        """
        if slot in self.workers:
            self.workers.remove(slot)
        elif slot in self.retiring:
            self.retiring.remove(slot)
        else:
            return 0
        slot.gone = True
        slot.cap = 0
        if slot.pending:
            items, slot.pending = slot.pending, []
            slot.in_flight -= len(items)
            self.held.extend(items)
        lost = slot.in_flight
        self.lost += lost
        slot.in_flight = 0
        return lost

    # -- clients ------------------------------------------------------------------------------

    def free_places(self, most: int) -> int:
        """How many more clients the workers may take now, counted up to ``most`` (the count
        stops there: ``most`` means "that many or more")."""
        room = 0
        for slot in self.workers:
            free = slot.cap - slot.in_flight
            if free > 0:
                room += free
                if room >= most:
                    return most
        return room

    def has_room(self) -> bool:
        """Whether some worker may take another client."""
        return any(slot.in_flight < slot.cap for slot in self.workers)

    def wants_clients(self) -> bool:
        """Whether to read the listeners: some worker has room and nobody waits here."""
        return not self.held and self.has_room()

    def assign(
        self,
        accepted: list[tuple[int, Any]],
        record: Callable[[Any], bytes],
        choose: Callable[[Any], WorkerSlot[L] | None] | None = None,
    ) -> None:
        """Give each ``(fd, address)`` just accepted to a worker (pending), or hold it.

        Args:
            accepted: The clients of one accept burst.
            record: Packs an address into the client's record (the listener's packer).
            choose: The caller's choice for an address, if any (else the policy picks).
        """
        workers = self.workers
        pick = self._pick
        dirty = self.dirty
        self.accepted += len(accepted)
        for fd, addr in accepted:
            item = (record(addr), fd)
            slot = pick(workers) if choose is None else choose(addr)
            if slot is None:
                self.held.append(item)  # no worker has room
                continue
            if not slot.pending:
                dirty.append(slot)
            slot.pending.append(item)
            slot.in_flight += 1

    def assign_items(self, items: list[Item]) -> None:
        """Give each client just accepted, as its `Item` already, to the policy's pick
        (pending), or hold it (`assign` without a caller's choice, for records made by the C
        accept burst)."""
        workers = self.workers
        pick = self._pick
        dirty = self.dirty
        self.accepted += len(items)
        for item in items:
            slot = pick(workers)
            if slot is None:
                self.held.append(item)  # no worker has room
                continue
            if not slot.pending:
                dirty.append(slot)
            slot.pending.append(item)
            slot.in_flight += 1

    def checked_choice(self, chosen: object) -> WorkerSlot[L] | None:
        """A picker's answer if it is one of the live workers, else the policy's pick."""
        if chosen is not None and (
            not isinstance(chosen, WorkerSlot) or chosen.gone or chosen not in self.workers
        ):
            raise ValueError(f"the picker returned {chosen!r}, not one of the workers it was given")
        if chosen is None:
            return self._pick(self.workers)
        return chosen

    def pick(self) -> WorkerSlot[L] | None:
        """The policy's pick among the live workers (None: no room)."""
        return self._pick(self.workers)

    def hand_held(self) -> None:
        """Give held clients, oldest first, to workers with room (pending)."""
        held = self.held
        pick = self._pick
        workers = self.workers
        dirty = self.dirty
        while held:
            slot = pick(workers)
            if slot is None:
                return
            if not slot.pending:
                dirty.append(slot)
            slot.pending.append(held.popleft())
            slot.in_flight += 1

    def sent(self, slot: WorkerSlot[L], items: list[Item], taken: int) -> list[Item]:
        """``taken`` of ``items`` (``slot``'s pending, a prefix) reached its link; return them.

        The rest is held again and the worker rests (``cap`` 0) until `reopen`.
        """
        if taken:
            slot.handed += taken
            self.handed += taken
        if taken == len(items):
            return items
        rest = items[taken:]
        slot.in_flight -= len(rest)
        self.held.extend(rest)
        slot.cap = 0
        return items[:taken]

    def completed_by(self, slot: WorkerSlot[L], count: int) -> None:
        """The worker reported ``count`` more clients finished.

        Raises:
            ProtocolError: more than it holds (the caller drops that worker).
        """
        if count > slot.in_flight:
            raise ProtocolError(
                f"it reported {count} client(s) finished with only {slot.in_flight} in flight"
            )
        slot.in_flight -= count
        slot.completed += count
        self.completed += count

    def taken_back(self, slot: WorkerSlot[L], items: list[Item]) -> None:
        """Clients handed to ``slot``'s link that never reached the worker: hold them again."""
        count = len(items)
        if not count:
            return
        if slot.gone and slot not in self.workers and slot not in self.retiring:
            self.lost -= count  # counted lost when it left: they were not
        else:
            slot.in_flight -= count
        slot.handed -= count
        self.handed -= count
        self.requeued += count
        self.held.extend(items)

    def close_held(self) -> list[Item]:
        """The held clients, to be closed unserved (the acceptor closes)."""
        items = list(self.held)
        self.held.clear()
        self.closed += len(items)
        return items

    @property
    def in_flight(self) -> int:
        """Clients at workers and not finished, plus those held here."""
        in_flight = sum(slot.in_flight for slot in self.workers) + len(self.held)
        return in_flight + sum(slot.in_flight for slot in self.retiring)
