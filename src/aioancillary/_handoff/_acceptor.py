"""The acceptor: accept clients on listening sockets and hand each one to a worker process.

One readiness callback per listener accepts until EAGAIN (at most ``accept_burst`` per wake,
so that one busy listener cannot starve the others) with ``sock._accept()``, which returns the
raw fd and the peer address without building a socket object. Never ``loop.sock_accept``:
uvloop's registers and tears down a watcher on the listener for every call.

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
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from .._asyncio._protocol import AncillaryProtocol
from .._asyncio._server import AncillaryServer, create_unix_server
from .._asyncio._transport import AncillaryTransport
from .._core._errors import AncillaryError, ConnectionClosedError, ProtocolError
from .._core._fd import close_raw
from .._core._message import AncillaryMessage, take_raw_fds
from .._core._platform import SCM_MAX_FD
from .._kernel import _fork
from .._kernel._accept import AcceptErrorKind, AcceptFailure, ResourcePause, accept_burst
from .._kernel._authorize import same_user
from .._kernel._unix import Authorize
from . import _wire as wire
from ._dispatch import DispatchName, DispatchPolicy, Picker, WorkerInfo, make_policy

__all__ = ["Acceptor", "AcceptorStats"]

logger = logging.getLogger("aioancillary")

#: One accepted client on its way to a worker: its record (see _handoff_wire) and its fd
#: (ours until a worker's socket has it).
_Item = tuple[bytes, int]

#: Seconds before a worker whose socket refused a hand-off (not because it left) gets more.
_RETRY_DELAY = 0.1
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


class _Listener:
    __slots__ = ("accept", "announcement", "fd", "index", "name", "record", "sock")

    def __init__(
        self, sock: socket.socket, index: int, name: str, metadata: Mapping[str, Any]
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.index = index
        self.name = name
        self.record = wire.record_packer(index, sock.family)
        self.announcement = wire.listener_message(index, sock, name, metadata)
        # socket._accept() returns (fd, address): no socket object is built for a client
        # that only passes through.
        self.accept = sock._accept  # type: ignore[attr-defined]


class _WorkerLink(AncillaryProtocol):
    """The acceptor's side of one worker's connection (implements
    [`WorkerInfo`][aioancillary.WorkerInfo])."""

    __slots__ = (
        "_acceptor",
        "cap",
        "completed",
        "gone",
        "handed",
        "in_flight",
        "index",
        "limit",
        "paused",
        "pending",
        "pid",
        "refusing",
        "retired",
        "transport",
    )

    def __init__(self, acceptor: Acceptor, index: int, limit: int, pid: int | None) -> None:
        self._acceptor = acceptor
        self.index = index
        self.pid = pid
        self.limit = limit
        self.cap = 0  # no client before connection_made
        self.in_flight = 0
        self.handed = 0
        self.completed = 0
        self.pending: list[_Item] = []  # assigned in this wake, not yet sent
        self.transport: AncillaryTransport | None = None
        self.gone = False
        self.paused = False  # its socket is full (pause_writing)
        self.refusing = False  # its last hand-off failed (logged once until one succeeds)
        self.retired = False  # Acceptor.retire_worker: no more clients, stream ended

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, AncillaryTransport)
        self.transport = transport
        if self.pid is None:
            creds = transport.get_extra_info("peercred")
            self.pid = creds.pid if creds is not None and creds.pid > 0 else None
        self.cap = self.limit
        self._acceptor._on_worker_ready(self)

    def messages_received(self, messages: list[AncillaryMessage]) -> None:
        total = 0
        for msg in messages:
            with msg:
                try:
                    if msg.fd_count:
                        raise ProtocolError(
                            f"a worker sent {msg.fd_count} fd(s); workers send none (closed)"
                        )
                    total += wire.parse_done(msg.data)
                except ProtocolError as exc:
                    self._acceptor._drop_worker(self, exc)
                    for rest in messages:
                        rest.close()
                    return
        if total:
            self._acceptor._on_completed(self, total)

    def messages_unsent(self, messages: list[AncillaryMessage]) -> None:
        # Queued in the transport, none of their bytes (hence fds) reached the worker.
        self._acceptor._take_back(self, messages)

    def eof_received(self) -> bool:
        return False  # the worker stopped talking: it is leaving

    def pause_writing(self) -> None:
        self.paused = True
        self.cap = 0  # its socket is full: send it nothing more until it reads

    def resume_writing(self) -> None:
        self.paused = False
        if not self.gone and not self.retired:
            self.cap = self.limit
            self._acceptor._on_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._acceptor._on_worker_lost(self, exc)

    def __repr__(self) -> str:
        return (
            f"<worker #{self.index} pid={self.pid} in_flight={self.in_flight}/{self.limit}"
            f"{' gone' if self.gone else ''}>"
        )


def _send_clients(
    transport: AncillaryTransport, items: list[_Item]
) -> tuple[int, AncillaryError | OSError | None]:
    """Hand ``items`` to the worker's transport; return how many it took (a prefix) and the
    error that stopped it, if any.

    One ``C`` message carries the clients, with their fds, in one ``sendmsg`` (more than
    ``SCM_MAX_FD`` clients take several). The fds are borrowed: the caller closes its copies
    of those taken (the kernel, or the transport's queued duplicates, hold the clients now)
    and keeps the rest, to hand them to another worker. A failed ``sendmsg`` sent nothing,
    so what a failure leaves is exactly what was not taken.
    """
    taken = 0
    try:
        while taken < len(items):
            chunk = items[taken : taken + SCM_MAX_FD] if taken or len(items) > SCM_MAX_FD else items
            # This wake's clients are one message already: send it now, not after the
            # transport's end-of-iteration flush (which would also duplicate every fd).
            transport.end_burst()
            transport.write_fds(
                wire.client_message([record for record, _fd in chunk]), [fd for _r, fd in chunk]
            )
            taken += len(chunk)
    except (AncillaryError, OSError) as exc:
        return taken, exc
    return taken, None


def _close_fds(items: list[_Item]) -> None:
    # The clients of one wake are mostly consecutive fd numbers (accept hands out the lowest
    # free ones): close_raw closes such runs with one close_range(2) each.
    close_raw([fd for _record, fd in items])


class Acceptor:
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
        self._loop = asyncio.get_running_loop()
        self._picker: Picker | None = None
        if callable(dispatch):
            self._picker = dispatch
            dispatch = "least-busy"
        self._policy: DispatchPolicy = make_policy(dispatch)
        self._limit = worker_limit
        self._burst = accept_burst
        self._listeners: list[_Listener] = []
        self._listener_ids = 0  # wire ids are never reused: workers keep what they were told
        self._failed_listeners: list[str] = []
        self._resource = ResourcePause(logger, "the acceptor")
        self._cooling = False  # after a resource failure, until the paced retry
        self._workers: list[_WorkerLink] = []
        self._retiring: list[_WorkerLink] = []  # retire_worker(): finishing, not dispatched to
        self._next_index = 0
        self._dirty: list[_WorkerLink] = []
        self._held: collections.deque[_Item] = collections.deque()  # waiting for a worker
        self._accepting = False  # listeners' readers registered
        self._stopped = False  # stop_accepting() or close(): never accept again
        self._closed = False
        self._resume_scheduled = False
        self._servers: list[AncillaryServer] = []
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._worker_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._all_gone: asyncio.Future[None] = self._loop.create_future()
        self._all_gone.set_result(None)
        self._accepted = self._handed = self._completed = self._lost = self._requeued = 0
        self._pid = _fork.track(self)

    def _forked(self) -> None:
        # In a child process after fork(): drop this process's copies of the listeners and
        # of the clients waiting here; the loop and its registrations are the parent's, and
        # so are the workers (their links' transports are inert here, see _fork).
        self._stopped = self._closed = True
        self._accepting = False
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.sock.close()
        held, self._held = list(self._held), collections.deque()
        _close_fds(held)
        self._workers = []

    def _in_child(self) -> bool:
        # A forked child holds an inert copy: nothing it could wait for will ever happen
        # there (no worker leaves, no completion arrives), so no wait may block it.
        return os.getpid() != self._pid

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
        if self._stopped:
            raise ValueError("the acceptor stopped accepting; create a new one")
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ValueError(f"{sock!r} is not a listening stream socket: call listen() first")
        listener = _Listener(sock, self._listener_ids, name or _address_name(sock), metadata or {})
        self._listener_ids += 1
        sock.setblocking(False)
        self._listeners.append(listener)
        for link in self._workers:
            self._announce(link, listener)
        if self._accepting:
            self._loop.add_reader(listener.fd, self._on_acceptable, listener)
        else:
            self._on_room()

    @property
    def listeners(self) -> tuple[socket.socket, ...]:
        """The listening sockets (empty once accepting stopped)."""
        return tuple(listener.sock for listener in self._listeners)

    def _announce(self, link: _WorkerLink, listener: _Listener) -> None:
        if link.transport is not None and not link.gone:
            link.transport.write(listener.announcement)

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
        if authorize is None:
            raise TypeError(
                "listen_for_workers(authorize=None) would hand clients to any process that "
                "can connect: pass a policy (the default, same_user, admits workers of this "
                "user; allow_uids(...) or root_or_same_user widen it)"
            )
        server = await _registration_server(self, path, authorize, mode)
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
        if self._closed:
            sock.close()
            raise ConnectionClosedError("the acceptor is closed")
        link = self._new_link(pid)
        AncillaryTransport(self._loop, sock, link)
        return link

    def _new_link(self, pid: int | None = None) -> _WorkerLink:
        link = _WorkerLink(self, self._next_index, self._limit, pid)
        self._next_index += 1
        return link

    @property
    def workers(self) -> tuple[WorkerInfo, ...]:
        """The registered workers, in registration order."""
        return tuple(self._workers)

    def _on_worker_ready(self, link: _WorkerLink) -> None:
        transport = link.transport
        assert transport is not None
        if self._closed:
            transport.close()
            return
        transport.write(wire.welcome_message())
        for listener in self._listeners:
            self._announce(link, listener)
        self._workers.append(link)
        if self._worker_waiters:
            self._wake_worker_waiters()
        if self._all_gone.done():
            self._all_gone = self._loop.create_future()
        logger.debug("worker %r registered", link)
        self._on_room()

    async def wait_workers(self, count: int = 1) -> None:
        """Wait until at least ``count`` workers are registered (bound it with
        ``asyncio.timeout()``). Clients that come earlier wait in the kernel's backlog anyway;
        this is for code that needs the workers up, e.g. to report them.
        """
        if len(self._workers) >= count:
            return
        if self._in_child():
            raise ConnectionClosedError(
                f"this acceptor belongs to process {self._pid}: a forked child cannot use it "
                "(create one in the child)"
            )
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._worker_waiters.append((count, waiter))
        try:
            await waiter
        finally:
            if (count, waiter) in self._worker_waiters:
                self._worker_waiters.remove((count, waiter))

    def _wake_worker_waiters(self) -> None:
        registered = len(self._workers)
        for count, waiter in self._worker_waiters:
            if count <= registered and not waiter.done():
                waiter.set_result(None)

    def retire_worker(self, worker: WorkerInfo) -> None:
        """Hand ``worker`` no more clients and end its client stream: a graceful stop of one
        worker (a pool shrinking, or a reload replacing its workers).

        The worker still gets the clients already on their way to it, then the end of its
        stream (its iteration or [`Worker.serve`][aioancillary.Worker.serve] ends); it finishes what
        it holds, reporting each client, and leaves. Until it has left, its clients count in
        ``stats().in_flight`` and [`drain`][aioancillary.Acceptor.drain]; it is no longer in
        [`workers`][aioancillary.Acceptor.workers].

        Raises:
            ValueError: ``worker`` is not one of [`workers`][aioancillary.Acceptor.workers] (retired
                already, gone, or another acceptor's).
        """
        link = worker
        if not isinstance(link, _WorkerLink) or link not in self._workers:
            raise ValueError(f"{worker!r} is not a registered worker of this acceptor")
        self._workers.remove(link)
        self._retiring.append(link)
        link.retired = True
        link.cap = 0
        if link.transport is not None:
            link.transport.write_eof()  # after what is queued: its iteration ends there
        logger.debug("worker %r retired", link)
        if not self._has_room():
            self._pause_accepting()  # the kernel's backlog holds clients until a worker comes

    def _drop_worker(self, link: _WorkerLink, exc: Exception) -> None:
        logger.error(
            "dropping worker #%d (pid %s): %s; its queued clients go to other workers",
            link.index,
            link.pid,
            exc,
        )
        link.cap = 0
        if link.transport is not None:
            link.transport.abort()

    def _on_worker_lost(self, link: _WorkerLink, exc: Exception | None) -> None:
        if link.gone:
            return
        link.gone = True
        link.cap = 0
        if link in self._workers:
            self._workers.remove(link)
        elif link in self._retiring:
            self._retiring.remove(link)
        if link.pending:
            items, link.pending = link.pending, []
            link.in_flight -= len(items)
            self._hold(items)
        lost = link.in_flight
        if lost:
            self._lost += lost
            logger.warning(
                "worker #%d (pid %s) left with %d client(s) in flight: those connections are "
                "lost (%s)",
                link.index,
                link.pid,
                lost,
                exc or "connection closed",
            )
        link.in_flight = 0
        if not self._workers and not self._retiring and not self._all_gone.done():
            self._all_gone.set_result(None)
        self._dispatch_held()
        self._check_drained()

    def _take_back(self, link: _WorkerLink, messages: list[AncillaryMessage]) -> None:
        items: list[_Item] = []
        for msg in messages:
            with msg:
                if not msg.fd_count or msg.data[:1] != b"C":
                    continue  # a welcome or listener announcement: nothing to re-dispatch
                records = wire.client_records(msg.data)  # we wrote it: well-formed
                fds = take_raw_fds(msg)
                items += [
                    (lid.to_bytes(2, "big") + len(addr).to_bytes(1, "big") + addr, fd)
                    for (lid, addr), fd in zip(records, fds, strict=True)
                ]
        if not items:
            return
        if link.gone:
            self._lost -= len(items)  # counted lost already: they were not
        else:
            link.in_flight -= len(items)
        link.handed -= len(items)
        self._handed -= len(items)
        self._requeued += len(items)
        self._hold(items)
        self._dispatch_held()

    # -- accepting --------------------------------------------------------------------------

    def _on_acceptable(self, listener: _Listener) -> int:
        # Never more than the workers have room for: the rest wait in the kernel's backlog.
        room = self._room()
        if not room:
            self._pause_accepting()
            return 0
        accepted: list[tuple[int, Any]] = []
        failure = accept_burst(listener.accept, room, accepted)
        if accepted:
            self._accepted += len(accepted)
            self._assign(accepted, listener)
        if failure is not None:
            self._accept_failed(listener, failure)
        elif self._resource.active:
            self._resource.recovered()
        return len(accepted)

    def _assign(self, accepted: list[tuple[int, Any]], listener: _Listener) -> None:
        workers = self._workers
        pick = self._policy.pick
        picker = self._picker
        record = listener.record
        dirty = self._dirty
        for fd, addr in accepted:
            item = (record(addr), fd)
            worker = pick(workers) if picker is None else self._choose(picker, addr, listener)
            if worker is None:
                self._held.append(item)  # no worker has room (they all left): wait here
                continue
            if not worker.pending:
                dirty.append(worker)
            worker.pending.append(item)
            worker.in_flight += 1
        if not self._has_room():
            self._pause_accepting()  # the kernel's backlog holds the next ones
        if dirty:
            self._flush()

    def _room(self) -> int:
        """How many clients to accept now: the workers' free places, at most one burst."""
        room = 0
        burst = self._burst
        for link in self._workers:
            free = link.cap - link.in_flight
            if free > 0:
                room += free
                if room >= burst:
                    return burst
        return room

    def _choose(self, picker: Picker, addr: Any, listener: _Listener) -> _WorkerLink | None:
        workers = self._workers
        try:
            chosen = picker(addr, listener.name, workers)
        except Exception as exc:
            self._loop.call_exception_handler(
                {
                    "message": "aioancillary Acceptor picker failed; using least-busy",
                    "exception": exc,
                }
            )
            chosen = None
        if chosen is None:
            return self._policy.pick(workers)
        if not isinstance(chosen, _WorkerLink) or chosen.gone or chosen not in workers:
            self._loop.call_exception_handler(
                {
                    "message": f"aioancillary Acceptor picker returned {chosen!r}, not one of "
                    "the workers it was given; using least-busy"
                }
            )
            return self._policy.pick(workers)
        return chosen

    def _accept_failed(self, listener: _Listener, failure: AcceptFailure) -> None:
        if failure.kind is AcceptErrorKind.RESOURCE:
            # Out of fds or memory: stop for a moment instead of spinning on readiness (the
            # clients wait in the backlog), logged once per episode.
            delay = self._resource.failed(failure.error)
            self._pause_accepting()
            if not self._cooling:
                self._cooling = True
                self._loop.call_later(delay, self._cooled)
            return
        self._drop_listener(listener, failure.error)

    def _cooled(self) -> None:
        self._cooling = False
        self._on_room()

    def _drop_listener(self, listener: _Listener, exc: OSError) -> None:
        # accept() on it will never work again (e.g. EINVAL: it no longer listens): keeping
        # its reader would make the loop call it again at once, forever.
        if listener not in self._listeners:
            return
        self._listeners.remove(listener)
        if self._accepting and os.getpid() == self._pid:
            self._loop.remove_reader(listener.fd)
        listener.sock.close()
        self._failed_listeners.append(listener.name)
        logger.error(
            "accept() on listener %r failed (%s): it is no longer served (its socket is "
            "closed); %d other listener(s) still served. Add a new listening socket to serve "
            "that address again",
            listener.name,
            exc,
            len(self._listeners),
        )

    def _flush(self) -> None:
        dirty = self._dirty
        sent: list[_Item] = []
        for link in dirty:
            items, link.pending = link.pending, []
            if link.gone or link.transport is None:
                taken, error = 0, None
            else:
                taken, error = _send_clients(link.transport, items)
            if taken:
                link.handed += taken
                self._handed += taken
                sent += items if taken == len(items) else items[:taken]
            if taken < len(items):
                rest = items[taken:]
                link.in_flight -= len(rest)
                self._hold(rest)
                link.cap = 0  # the others take these; this one rests
                if link.transport is not None and not link.transport.is_closing():
                    # Refused but alive (e.g. ETOOMANYREFS: too many fds in flight for this
                    # user, unix(7)): try it again a little later rather than spin.
                    self._refused(link, error, taken, len(items))
                    self._loop.call_later(_RETRY_DELAY, self._reopen, link)
            elif link.refusing:
                link.refusing = False
                logger.warning("worker #%d (pid %s) takes clients again", link.index, link.pid)
        dirty.clear()
        # The workers' sockets hold these clients now. Closed together: a wake's clients are
        # consecutive fd numbers whichever worker they went to.
        _close_fds(sent)
        if self._held:
            self._loop.call_soon(self._dispatch_held)

    def _refused(self, link: _WorkerLink, error: Exception | None, taken: int, total: int) -> None:
        # Logged once per episode: the retry every _RETRY_DELAY would repeat it ten times a
        # second for as long as the condition lasts.
        if link.refusing:
            logger.debug("worker #%d still refuses clients: %s", link.index, error)
            return
        link.refusing = True
        logger.warning(
            "handing clients to worker #%d (pid %s) failed after %d of %d (%s): they go to "
            "other workers; retrying it every %d ms",
            link.index,
            link.pid,
            taken,
            total,
            error,
            _RETRY_DELAY * 1000,
        )

    def _reopen(self, link: _WorkerLink) -> None:
        transport = link.transport
        if link.gone or link.retired or link.paused:
            return
        if transport and not transport.is_closing():
            link.cap = link.limit
            self._dispatch_held()

    def _hold(self, items: list[_Item]) -> None:
        self._held.extend(items)

    def _dispatch_held(self) -> None:
        held = self._held
        if not held:
            self._on_room()
            return
        pick = self._policy.pick
        dirty = self._dirty
        while held:
            worker = pick(self._workers)
            if worker is None:
                break
            if not worker.pending:
                dirty.append(worker)
            worker.pending.append(held.popleft())
            worker.in_flight += 1
        if dirty:
            self._flush()
        if not held:
            self._on_room()

    def _on_completed(self, link: _WorkerLink, count: int) -> None:
        if count > link.in_flight:
            self._drop_worker(
                link,
                ProtocolError(
                    f"it reported {count} client(s) finished with only {link.in_flight} in flight"
                ),
            )
            return
        link.in_flight -= count
        link.completed += count
        self._completed += count
        if self._held:
            self._dispatch_held()
        elif not self._accepting:
            self._on_room()
        if self._drain_waiters:
            self._check_drained()

    def _on_room(self) -> None:
        # A worker may have room: resume accepting once per loop iteration at most.
        if not self._accepting and not self._stopped and not self._resume_scheduled:
            self._resume_scheduled = True
            self._loop.call_soon(self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume_scheduled = False
        if self._accepting or self._stopped or self._cooling or self._held:
            return
        if not self._listeners:
            return
        if os.getpid() != self._pid:
            return
        if not self._has_room():
            return
        self._accepting = True
        for listener in self._listeners:
            self._loop.add_reader(listener.fd, self._on_acceptable, listener)

    def _has_room(self) -> bool:
        return any(link.in_flight < link.cap for link in self._workers)

    def _pause_accepting(self) -> None:
        if self._accepting and os.getpid() == self._pid:
            self._accepting = False
            for listener in self._listeners:
                self._loop.remove_reader(listener.fd)

    # -- stopping ---------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Stop accepting for good and close the listeners; clients already accepted go on.

        New clients are refused by the kernel from now on (the listening sockets are closed).
        Clients already in a listener's backlog are accepted and handed over first: closing a
        listener resets every connection still queued on it (``inet_csk_listen_stop``).
        """
        self._stopped = True
        if os.getpid() == self._pid:
            for listener in list(self._listeners):  # a failing one drops itself
                while listener in self._listeners and self._on_acceptable(listener):
                    pass
        self._pause_accepting()
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.sock.close()

    def _in_flight(self) -> int:
        in_flight = sum(link.in_flight for link in self._workers) + len(self._held)
        return in_flight + sum(link.in_flight for link in self._retiring)

    def _check_drained(self) -> None:
        if self._drain_waiters and self._in_flight() == 0:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

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
        if self._in_flight() == 0 or self._in_child():
            return True  # in a forked child nothing is in flight: the clients are the parent's
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            return False
        finally:
            if waiter in self._drain_waiters:
                self._drain_waiters.remove(waiter)
        return True

    def close(self) -> None:
        """Stop accepting, close the registration servers and end every worker's link.

        Workers see the end of their client stream (their iterator ends) and may still report
        completions until they close. Clients waiting for a worker are closed. Use
        [`drain`][aioancillary.Acceptor.drain] first for a graceful stop.
        """
        if self._closed:
            return
        self._closed = True
        self.stop_accepting()
        for server in self._servers:
            server.close()
        held, self._held = list(self._held), collections.deque()
        _close_fds(held)
        for link in list(self._workers):
            if link.transport is not None:
                link.transport.write_eof()  # the worker's iterator ends; it closes the link

    def abort(self) -> None:
        """Close at once: every worker's link is aborted (see
        [`close`][aioancillary.Acceptor.close])."""
        self.close()
        for link in [*self._workers, *self._retiring]:
            if link.transport is not None:
                link.transport.abort()

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
        await asyncio.shield(self._all_gone)

    async def serve_forever(self) -> None:
        """Serve until cancelled; cancelling closes the acceptor (in-flight clients go on)."""
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self.close()

    def stats(self) -> AcceptorStats:
        """A snapshot of the counters."""
        return AcceptorStats(
            accepted=self._accepted,
            handed=self._handed,
            completed=self._completed,
            in_flight=self._in_flight(),
            lost=self._lost,
            requeued=self._requeued,
            workers=len(self._workers),
            accepting=self._accepting,
            failed_listeners=tuple(self._failed_listeners),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
            f"<Acceptor listeners={len(self._listeners)} workers={len(self._workers)} "
            f"accepting={self._accepting}>"
        )


def _address_name(sock: socket.socket) -> str:
    addr = sock.getsockname()
    if sock.family == socket.AF_INET:
        return f"{addr[0]}:{addr[1]}"
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    return os.fsdecode(addr) if addr else "unix"


async def _registration_server(
    acceptor: Acceptor,
    path: str | os.PathLike[str],
    authorize: Authorize,
    mode: int,
) -> AncillaryServer:
    """Listen for workers on ``path``; each one that connects becomes a `_WorkerLink`."""
    return await create_unix_server(acceptor._new_link, path, authorize=authorize, mode=mode)
