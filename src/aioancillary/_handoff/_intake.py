"""The acceptor's reading side: when its listeners are read, how much, and what an
``accept()`` error does.

One readiness callback per listener accepts until EAGAIN (at most ``accept_burst`` per wake,
so that one busy listener cannot starve the others, and never more than the workers have room
for) with ``sock._accept()``, which returns the raw fd and the peer address without building a
socket object. Never ``loop.sock_accept``: uvloop's registers and tears down a watcher on the
listener for every call. What it accepts goes to the ledger (``_ledger``), which assigns each
client a worker; the workers' links (``_link``) send them.

The readers are registered only in the ``accepting`` state (``_acceptor_state``). No worker
with room, or clients held for one: ``paused`` (the kernel's backlog holds new clients). Out of
fds or memory: ``cooling`` until a paced retry, logged once per episode. A listener whose
``accept()`` fails for good (``_kernel._accept``: e.g. shut down underneath) is dropped alone.
The workers' links tell this side when to read again, or stop, through ``_link.AcceptorSide``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

from .._kernel import _accel
from .._kernel._accept import AcceptErrorKind, AcceptFailure, ResourcePause, accept_burst
from ._acceptor_state import AcceptorState, AcceptorStates
from ._dispatch import Picker
from ._ledger import Item, Ledger, WorkerSlot
from ._link import WorkerLink, WorkerLinks
from ._listeners import Listener, Listeners

__all__ = ["Intake"]

logger = logging.getLogger("aioancillary")

_PAUSED = AcceptorState.PAUSED
_ACCEPTING = AcceptorState.ACCEPTING
_COOLING = AcceptorState.COOLING
_STOPPED = AcceptorState.STOPPED
_CLOSED = AcceptorState.CLOSED


class Intake:
    """Reads an acceptor's listeners into its ledger; the `_link.AcceptorSide` of its links.

    It owns the listeners (``listeners``), the acceptor's state (``states``) and the workers'
    links (``links``, made here with this object as their `AcceptorSide`).

    Args:
        ledger: The bookkeeping of clients and workers.
        picker: A caller's worker picker, or ``None`` for the ledger's policy.
        burst: The most clients accepted per listener per wake-up.
    """

    def __init__(self, ledger: Ledger[WorkerLink], picker: Picker | None, burst: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._pid = os.getpid()
        self._ledger = ledger
        self._picker = picker
        self._burst = burst
        self.listeners = Listeners()
        self.states = AcceptorStates()
        self.links = WorkerLinks(ledger, self)
        self._resource = ResourcePause(logger, "the acceptor")
        self._resume: asyncio.Handle | None = None  # a resume check scheduled
        self._cooled: asyncio.TimerHandle | None = None  # the paced retry after a resource error

    @property
    def state(self) -> AcceptorState:
        """The acceptor's state."""
        return self.states.state

    def in_child(self) -> bool:
        """True in a process forked from the one that made it (its copy is inert there)."""
        return os.getpid() != self._pid

    def forked(self) -> None:
        """In a forked child: close this process's copies of the listeners; the loop and its
        registrations are the parent's, and so are the workers."""
        if self.states.state is not _CLOSED:
            self.states.move(_CLOSED)
        self.listeners.close()
        self.links.forked()

    # -- listeners ----------------------------------------------------------------------------

    def add(self, sock: socket.socket, name: str | None, metadata: Mapping[str, Any]) -> None:
        """Serve the listening ``sock`` (ours from now on); tell the workers of it.

        Raises:
            ValueError: not a listening stream socket, or accepting stopped.
        """
        if self.states.state in (_STOPPED, _CLOSED):
            raise ValueError("the acceptor stopped accepting; create a new one")
        listener = self.listeners.add(sock, name, metadata)
        self.links.announce(listener.announcement)
        if self.states.state is _ACCEPTING:
            self._loop.add_reader(listener.fd, self._on_acceptable, listener)
        else:
            self.workers_have_room()

    def announcements(self) -> list[bytes]:
        return self.listeners.announcements()

    def _drop(self, listener: Listener, exc: OSError) -> None:
        # accept() on it will never work again (e.g. EINVAL: it no longer listens): keeping
        # its reader would make the loop call it again at once, forever.
        if self.states.state is _ACCEPTING and not self.in_child():
            self._loop.remove_reader(listener.fd)
        self.listeners.drop(listener, exc)

    # -- accepting ----------------------------------------------------------------------------

    def _on_acceptable(self, listener: Listener, sweeping: bool = False) -> int:
        """Accept a burst from ``listener`` (its reader); return how many were accepted."""
        if self.states.state is not _ACCEPTING and not sweeping:
            return 0  # a readiness callback already due when the readers were removed
        ledger = self._ledger
        burst = self._burst
        # Never more than the workers have room for: the rest wait in the kernel's backlog.
        free = ledger.free_places(burst + 1)
        if not free:
            self.workers_full()
            return 0
        limit = free if free <= burst else burst
        picker = self._picker
        accept_into = _accel.accept_into
        if accept_into is not None and picker is None:
            # The C burst: each client comes as its hand-off item, its record encoded from
            # the kernel's address (no address tuple to build and pack again).
            items: list[Item] = []
            failure = accept_into(listener.fd, limit, items, listener.prefix)
            count = len(items)
            if count:
                ledger.assign_items(items)
        else:
            accepted: list[tuple[int, Any]] = []
            failure = accept_burst(listener.accept, limit, accepted, listener.fd)
            count = len(accepted)
            if count:
                if picker is None:
                    ledger.assign(accepted, listener.record)
                else:
                    loop = self._loop
                    ledger.assign(
                        accepted,
                        listener.record,
                        lambda addr: _chosen(loop, ledger, picker, addr, listener.name),
                    )
        if count:
            if picker is None:
                if count == free:  # the policy filled every free place
                    self.workers_full()  # the kernel's backlog holds the next ones
            elif not ledger.has_room():
                self.workers_full()
            if ledger.dirty:
                self.links.flush()
        if failure is not None:
            self._accept_failed(listener, failure)
        elif self._resource.active:
            self._resource.recovered()
        return count

    def _accept_failed(self, listener: Listener, failure: AcceptFailure) -> None:
        if failure.kind is not AcceptErrorKind.RESOURCE:
            self._drop(listener, failure.error)
            return
        # Out of fds or memory: stop for a moment instead of spinning on readiness (the
        # clients wait in the backlog), logged once per episode.
        delay = self._resource.failed(failure.error)
        state = self.states.state
        if state is _ACCEPTING:
            self._remove_readers()
        if state in (_ACCEPTING, _PAUSED):
            self.states.move(_COOLING)
            self._cooled = self._loop.call_later(delay, self._cooling_over)

    def _cooling_over(self) -> None:
        self._cooled = None
        if self.states.state is _COOLING:
            self.states.move(_PAUSED)
            self.workers_have_room()

    def workers_have_room(self) -> None:
        # A worker may have room: resume accepting once per loop iteration at most.
        if self.states.state is _PAUSED and self._resume is None:
            self._resume = self._loop.call_soon(self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self.states.state is not _PAUSED or not self.listeners.items or self.in_child():
            return
        if not self._ledger.wants_clients():
            return
        self.states.move(_ACCEPTING)
        for listener in self.listeners.items:
            self._loop.add_reader(listener.fd, self._on_acceptable, listener)

    def workers_full(self) -> None:
        if self.states.state is _ACCEPTING:
            self.states.move(_PAUSED)
            self._remove_readers()

    def _remove_readers(self) -> None:
        if not self.in_child():
            for listener in self.listeners.items:
                self._loop.remove_reader(listener.fd)

    # -- stopping -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Accept what the listeners' backlogs hold (as far as the workers have room), then
        close the listeners for good (``stopped``). Idempotent."""
        if self.states.state in (_STOPPED, _CLOSED):
            return
        if not self.in_child():
            for listener in list(self.listeners.items):  # a failing one drops itself
                while listener in self.listeners.items and self._on_acceptable(listener, True):
                    pass
        if self.states.state is _ACCEPTING:
            self._remove_readers()
        for handle in (self._resume, self._cooled):
            if handle is not None:
                handle.cancel()
        self._resume = self._cooled = None
        self.states.move(_STOPPED)
        self.listeners.close()

    def close(self) -> None:
        """Stop (see `stop`), then end the workers' links (``closed``). Idempotent."""
        if self.states.state is _CLOSED:
            return
        self.stop()
        self.states.move(_CLOSED)
        self.links.close()


def _chosen(
    loop: asyncio.AbstractEventLoop,
    ledger: Ledger[WorkerLink],
    picker: Picker,
    addr: Any,
    listener: str,
) -> WorkerSlot[WorkerLink] | None:
    """The worker a caller's picker chose for ``addr``; least-busy if it failed or chose
    something that is not one of the workers (reported to the loop's exception handler)."""
    try:
        return ledger.checked_choice(picker(addr, listener, ledger.workers))
    except ValueError as exc:
        loop.call_exception_handler({"message": f"aioancillary Acceptor: {exc}; using least-busy"})
    except Exception as exc:
        loop.call_exception_handler(
            {"message": "aioancillary Acceptor picker failed; using least-busy", "exception": exc}
        )
    return ledger.pick()
