"""The acceptor: accept clients on listening sockets and hand each one to a worker process.

Each accepted client is assigned to a worker at once (least-busy by default) and appended to
that worker's list for this wake; when the wake ends, each worker's list goes out in one batch
(one ``sendmsg`` while the fd cap allows), and the acceptor closes its copies. Workers report
completions (coalesced per loop iteration), which keeps ``in_flight`` per worker exact. When
no worker may take another client, the listeners' readers are removed: the kernel's backlog
holds new clients until a worker frees up.

A worker that leaves (exit, crash, garbage on the link): clients still queued for it on this
side come back (``messages_unsent`` of its transport) and go to another worker; clients the
kernel already delivered into its socket, or that it was serving, are lost with it. They are
counted in [`AcceptorStats.lost`][aioancillary.AcceptorStats.lost] and logged.

The parts: ``_ledger`` keeps the bookkeeping of clients and workers (no sockets), ``_link``
the workers' connections and the hand-off, ``_intake`` reads the listeners (``_listeners``)
and moves between the acceptor's states (``_acceptor_state``); the workers' links reach it
through the named ``_link.AcceptorSide``. This module is the public face.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._asyncio._closing import AsyncClosing
from .._asyncio._server import AncillaryServer
from .._kernel import _fork
from .._kernel._authorize import same_user
from .._kernel._unix import Authorize
from ._acceptor_state import AcceptorState
from ._dispatch import DispatchName, Picker, WorkerInfo, make_policy
from ._intake import Intake
from ._ledger import Ledger, WorkerSlot
from ._link import WorkerLink

__all__ = ["Acceptor", "AcceptorStats"]

logger = logging.getLogger("aioancillary")

#: Seconds the ``async with`` exit waits for the workers to leave before it aborts them.
_CLOSE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class AcceptorStats:
    """Counters of an [`Acceptor`][aioancillary.Acceptor] (a snapshot).

    Attributes:
        accepted: Clients accepted.
        handed: Clients handed to a worker's socket (re-dispatched clients count once more).
        completed: Clients workers reported finished.
        in_flight: Clients handed over and not yet finished, plus those waiting for a worker.
        lost: Clients lost with a worker that left while serving them or before reading them
            from its socket (their connections were closed with the worker's process).
        requeued: Clients taken back from a worker that left before they reached its socket,
            and handed to another.
        workers: Workers registered now.
        accepting: Whether the listeners are being read now.
        failed_listeners: Names of the listeners dropped because ``accept()`` failed on them
            for good (e.g. ``EINVAL``: shut down underneath the acceptor); the others are
            still served.
    """

    accepted: int
    handed: int
    completed: int
    in_flight: int
    lost: int
    requeued: int
    workers: int
    accepting: bool
    failed_listeners: tuple[str, ...] = ()


class Acceptor(AsyncClosing):
    """Accepts clients on listening sockets and hands each to a registered worker process.

    Create it inside a coroutine, add listeners
    ([`add_listener`][aioancillary.Acceptor.add_listener]) and workers
    ([`listen_for_workers`][aioancillary.Acceptor.listen_for_workers] for workers that connect to a
    Unix socket path, or [`add_worker`][aioancillary.Acceptor.add_worker] for a connected socket),
    then serve until [`close`][aioancillary.Acceptor.close]. Workers run
    [`Worker`][aioancillary.Worker] (or a [`WorkerPool`][aioancillary.WorkerPool] starts them).

    Example::

        async with Acceptor() as acceptor:
            acceptor.add_listener(socket.create_server(("127.0.0.1", 8080)))
            await acceptor.listen_for_workers("/run/app/workers.sock", authorize=same_user)
            await acceptor.serve_forever()

    Args:
        dispatch: A [`DispatchName`][aioancillary.DispatchName]: ``"least-busy"`` (default:
            the worker with the fewest clients in flight) or ``"round-robin"``; or a
            [`Picker`][aioancillary.Picker] function (e.g. sticky by client address). Another
            string is a type error, and a ``ValueError`` at run time.
        worker_limit: The most clients one worker may hold at once (handed over and not
            reported finished). When every worker is at its limit the acceptor stops
            accepting; the kernel's backlog holds new clients until one frees up.
        accept_burst: The most clients accepted per listener per wake-up, so that one busy
            listener cannot starve the event loop.
    """

    def __init__(
        self,
        *,
        dispatch: DispatchName | Picker = "least-busy",
        worker_limit: int = 1024,
        accept_burst: int = 64,
    ) -> None:
        if worker_limit < 1 or accept_burst < 1:
            raise ValueError("worker_limit and accept_burst must be at least 1")
        picker: Picker | None = None
        if callable(dispatch):
            picker, dispatch = dispatch, "least-busy"
        self._ledger: Ledger[WorkerLink] = Ledger(make_policy(dispatch), worker_limit)
        self._intake = Intake(self._ledger, picker, accept_burst)
        self._listeners = self._intake.listeners
        self._links = self._intake.links
        self._servers: list[AncillaryServer] = []
        _fork.track(self)

    def _forked(self) -> None:
        # In a child process after fork(): drop this process's copies of the listeners and
        # of the clients held here; the loop and its registrations are the parent's, and so
        # are the workers (their links' transports are inert here, see _fork).
        self._intake.forked()

    def _in_child(self) -> bool:
        # A forked child holds an inert copy: nothing it could wait for will ever happen
        # there (no worker leaves, no completion arrives), so no wait may block it.
        return self._intake.in_child()

    # -- listeners --------------------------------------------------------------------------

    def add_listener(
        self,
        sock: socket.socket,
        *,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Accept clients on the listening ``sock`` (TCP over IPv4 or IPv6, or Unix stream).

        The acceptor owns the socket from now on and closes it in
        [`stop_accepting`][aioancillary.Acceptor.stop_accepting]. Workers get ``name`` and
        ``metadata`` with every client of this listener.

        Args:
            sock: A listening socket (``listen()`` already called).
            name: How workers see this listener (default: its address, e.g. ``127.0.0.1:8080``).
            metadata: A small JSON-serialisable dict sent once to each worker and attached to
                every client of this listener (e.g. ``{"tls": False, "tenant": "a"}``).

        Raises:
            ValueError: another socket family, a socket that is not listening, or the acceptor
                stopped accepting.
            TypeError: ``metadata`` is not JSON-serialisable.
        """
        self._intake.add(sock, name, metadata or {})

    @property
    def listeners(self) -> tuple[socket.socket, ...]:
        """The listening sockets (empty once accepting stopped)."""
        return tuple(listener.sock for listener in self._listeners.items)

    # -- workers ----------------------------------------------------------------------------

    async def listen_for_workers(
        self,
        path: str | os.PathLike[str],
        *,
        authorize: Authorize = same_user,
        mode: int = 0o600,
    ) -> AncillaryServer:
        """Let workers register by connecting to the Unix socket ``path``
        ([`Worker.connect`][aioancillary.Worker.connect]).

        A registered worker gets clients: their sockets and the bytes they send. So each
        worker's credentials (recorded by the kernel at ``connect()``, ``SO_PEERCRED``) are
        checked before anything is sent to it; by default only a process of this process's
        own user may register, whatever the socket's address: a Linux abstract name has no
        permissions at all, and a socket file's mode is only as good as its directory.

        Args:
            path: Where to listen: a socket file, created with permissions ``mode``, or a
                Linux abstract name (``"\0name"``).
            authorize: Called with each worker's credentials before anything is exchanged; a
                worker it refuses is disconnected (counted in the server's ``stats.rejected``).
                Default [`same_user`][aioancillary.same_user]; widen it for workers of other
                users, e.g. ``allow_uids(uid)`` for workers that dropped root.
            mode: Permissions of the socket file (default: owner only).

        Returns:
            The registration server (closed by [`close`][aioancillary.Acceptor.close]).

        Raises:
            TypeError: ``authorize`` is ``None``.
        """
        server = await self._links.listen(path, authorize, mode)
        self._servers.append(server)
        return server

    def add_worker(self, sock: socket.socket, *, pid: int | None = None) -> WorkerInfo:
        """Register the worker at the other end of the connected AF_UNIX ``sock``.

        For workers started with an inherited socket (``socketpair``), as
        [`WorkerPool`][aioancillary.WorkerPool] does. The acceptor owns ``sock`` from now on.

        Args:
            sock: A connected AF_UNIX stream socket whose peer runs [`Worker`][aioancillary.Worker].
            pid: The worker's process id (a socketpair's credentials name its creator).
        """
        return self._links.add(sock, pid)

    @property
    def workers(self) -> tuple[WorkerInfo, ...]:
        """The registered workers, in registration order."""
        return tuple(self._ledger.workers)

    async def wait_workers(self, count: int = 1) -> None:
        """Wait until at least ``count`` workers are registered (bound it with
        ``asyncio.timeout()``). Clients that come earlier wait in the kernel's backlog anyway;
        this is for code that needs the workers up, e.g. to report them.

        Raises:
            ConnectionClosedError: called in a forked child (the acceptor is the parent's).
        """
        await self._links.wait_workers(count)

    def retire_worker(self, worker: WorkerInfo) -> None:
        """Hand ``worker`` no more clients and end its client stream: a graceful stop of one
        worker (a pool shrinking, or a reload replacing its workers).

        The worker still gets the clients already on their way to it, then the end of its
        stream (its iteration or [`Worker.serve`][aioancillary.Worker.serve] ends); it finishes
        what it holds, reporting each client, and leaves. Until it has left, its clients count
        in ``stats().in_flight`` and [`drain`][aioancillary.Acceptor.drain]; it is no longer in
        [`workers`][aioancillary.Acceptor.workers].

        Raises:
            ValueError: ``worker`` is not one of [`workers`][aioancillary.Acceptor.workers]
                (retired already, gone, or another acceptor's).
        """
        if not isinstance(worker, WorkerSlot):
            raise ValueError(f"{worker!r} is not a registered worker of this acceptor")
        self._links.retire(worker)
        if not self._ledger.has_room():
            self._intake.workers_full()  # the backlog holds clients until a worker comes

    # -- stopping ---------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Stop accepting for good and close the listeners; clients already accepted go on.

        New clients are refused by the kernel from now on (the listening sockets are closed).
        Clients already in a listener's backlog are accepted and handed over first, as far as
        the workers have room: closing a listener resets every connection still queued on it
        (``inet_csk_listen_stop``).
        """
        self._intake.stop()

    # A timeout here answers "did they finish in time?" (False) instead of raising: a graceful
    # stop goes on to close the workers either way.
    async def drain(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until no client is in flight (every worker reported its clients finished).

        Call after [`stop_accepting`][aioancillary.Acceptor.stop_accepting] to let in-flight clients
        finish.

        Args:
            timeout: Give up after this many seconds (``None``: wait as long as it takes).

        Returns:
            ``True`` if nothing is in flight, ``False`` if the timeout expired first.
        """
        if self._in_child():
            return True  # in a forked child nothing is in flight: the clients are the parent's
        return await self._links.drain(timeout)

    def close(self) -> None:
        """Stop accepting, close the registration servers and end every worker's link.

        Workers see the end of their client stream (their iterator ends) and may still report
        completions until they close. Clients waiting for a worker are closed. Use
        [`drain`][aioancillary.Acceptor.drain] first for a graceful stop.
        """
        if self._intake.state is AcceptorState.CLOSED:
            return
        self._intake.stop()
        for server in self._servers:
            server.close()
        self._intake.close()

    def abort(self) -> None:
        """Close at once: every worker's link is aborted (see
        [`close`][aioancillary.Acceptor.close])."""
        self.close()
        self._links.abort()

    async def wait_closed(self) -> None:
        """Wait until [`close`][aioancillary.Acceptor.close] was called and every worker has
        left.

        In a process forked from the one that created the acceptor it returns at once: the
        workers and registration servers are the parent's.
        """
        if self._in_child():
            return
        for server in self._servers:
            await server.wait_closed()
        await self._links.wait_gone()

    async def serve_forever(self) -> None:
        """Serve until cancelled; cancelling closes the acceptor (in-flight clients go on)."""
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self.close()

    def stats(self) -> AcceptorStats:
        """A snapshot of the counters."""
        accepting = self._intake.state is AcceptorState.ACCEPTING
        return _stats(self._ledger, accepting, self._listeners.failed)

    async def _close_and_wait(self, cancelled: bool) -> None:
        """``async with``'s exit (AsyncClosing): close, then wait until closed."""
        self.close()
        if self._in_child():
            return  # the child's copy is inert; asyncio.timeout() would not even run there
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self.wait_closed()
        except TimeoutError:
            self.abort()
            await self.wait_closed()

    def __repr__(self) -> str:
        return (
            f"<Acceptor {self._intake.state.value} listeners={len(self._listeners.items)} "
            f"workers={len(self._ledger.workers)}>"
        )


def _stats(ledger: Ledger[WorkerLink], accepting: bool, failed: list[str]) -> AcceptorStats:
    return AcceptorStats(
        accepted=ledger.accepted,
        handed=ledger.handed,
        completed=ledger.completed,
        in_flight=ledger.in_flight,
        lost=ledger.lost,
        requeued=ledger.requeued,
        workers=len(ledger.workers),
        accepting=accepting,
        failed_listeners=tuple(failed),
    )
