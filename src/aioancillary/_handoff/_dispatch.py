"""Dispatch policies of the [`Acceptor`][aioancillary.Acceptor]: which worker gets the next client
(sans-I/O).

A policy sees the live workers as objects with ``in_flight`` (clients handed over and not yet
reported finished) and ``cap`` (how many it may hold now: its limit, or 0 while it cannot take
more, e.g. its socket is full) and returns one with ``in_flight < cap``, or ``None`` when every
worker is at its limit (the acceptor then stops accepting: the kernel's backlog holds the rest).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar, get_args

__all__ = [
    "DispatchName",
    "DispatchPolicy",
    "LeastBusy",
    "Picker",
    "RoundRobin",
    "WorkerInfo",
    "make_policy",
]


class WorkerInfo(Protocol):
    """What the acceptor knows of one registered worker (read-only).

    [`Acceptor.workers`][aioancillary.Acceptor.workers] lists them, and a
    [`Picker`][aioancillary.Picker] chooses among them.
    """

    @property
    def index(self) -> int:
        """Registration order (0 for the first worker ever registered, never reused)."""
        ...

    @property
    def pid(self) -> int | None:
        """The worker's process id, or ``None`` where unknown."""
        ...

    @property
    def in_flight(self) -> int:
        """Clients handed to it and not yet reported finished."""
        ...

    @property
    def limit(self) -> int:
        """The most clients it may hold at once."""
        ...

    @property
    def cap(self) -> int:
        """``limit`` while it can take more; 0 while its socket is full or it is leaving."""
        ...

    @property
    def handed(self) -> int:
        """Clients handed to it so far (those taken back after it left are not counted)."""
        ...

    @property
    def completed(self) -> int:
        """Clients it reported finished so far."""
        ...


W = TypeVar("W", bound=WorkerInfo)

#: The built-in dispatch policies, by name: ``"least-busy"`` (the worker with the fewest
#: clients in flight) and ``"round-robin"``. A type checker refuses any other string given
#: as ``dispatch=``; at run time it is a ``ValueError``.
DispatchName = Literal["least-busy", "round-robin"]

#: A caller's dispatch function: ``picker(peer_address, listener_name, workers)`` returns one
#: of ``workers`` (all live workers, in registration order), or ``None`` to let least-busy
#: choose. It may return a worker at its limit (the client then waits in that worker's queue
#: beyond its limit); check ``worker.in_flight < worker.cap`` to avoid that.
Picker = Callable[[Any, str, Sequence[WorkerInfo]], WorkerInfo | None]


class LeastBusy:
    """The worker with the fewest clients in flight; ties go round the workers in turn."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, workers: Sequence[W]) -> W | None:
        n = len(workers)
        if n == 1:  # the common small case, without the scan
            only = workers[0]
            return only if only.in_flight < only.cap else None
        start = self._next = self._next + 1 if self._next + 1 < n else 0
        best = None
        best_load = 1 << 62
        for i in range(start, start + n):
            worker = workers[i - n if i >= n else i]
            load = worker.in_flight
            if load < best_load and load < worker.cap:
                best = worker
                best_load = load
                if not load:
                    break  # idle: nothing beats it
        return best


class RoundRobin:
    """Each worker in turn, skipping those at their limit."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, workers: Sequence[W]) -> W | None:
        n = len(workers)
        start = self._next if self._next < n else 0
        for i in range(start, start + n):
            worker = workers[i - n if i >= n else i]
            if worker.in_flight < worker.cap:
                self._next = i + 1 - n if i + 1 >= n else i + 1
                return worker
        return None


class DispatchPolicy(Protocol):
    """A sans-I/O dispatch policy: ``pick(workers)``."""

    def pick(self, workers: Sequence[W]) -> W | None: ...


def make_policy(dispatch: str) -> DispatchPolicy:
    """The policy named ``"least-busy"`` or ``"round-robin"`` (a ``str``: names may come from
    configuration, unchecked by a type checker).

    Raises:
        ValueError: another name.
    """
    if dispatch == "least-busy":
        return LeastBusy()
    if dispatch == "round-robin":
        return RoundRobin()
    names = ", ".join(repr(name) for name in get_args(DispatchName))
    raise ValueError(f"unknown dispatch policy {dispatch!r}: use {names} or a picker function")
