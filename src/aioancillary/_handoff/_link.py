"""The acceptor's workers: their connections, the hand-off of clients, and what they report.

A `WorkerLink` is the protocol on one worker's transport. It turns what happens on the
connection into calls of a small named interface, `LinkOwner`: the worker is ready, reported
completions, broke the protocol, got clients back unsent, its socket filled or drained, or it
left. `WorkerLinks` implements it for all of an acceptor's workers: it keeps their entries in
the ledger (``_ledger``, the bookkeeping without sockets), sends each worker the clients
assigned to it, retries a worker whose socket refused some, and answers the waits on workers
and on clients in flight. Reading the listeners stays the acceptor's (``_intake``), which the
links reach through another small named interface, `AcceptorSide`: the listeners'
announcements, "a worker may have room", "no worker has room".
"""

from __future__ import annotations

import asyncio
import logging
import operator
import os
import socket
from typing import Protocol

from .._asyncio._protocol import AncillaryProtocol
from .._asyncio._server import AncillaryServer, create_unix_server
from .._asyncio._transport import AncillaryTransport
from .._core._errors import AncillaryError, ConnectionClosedError, ProtocolError
from .._core._fd import close_raw
from .._core._message import AncillaryMessage, take_raw_fds
from .._core._platform import SCM_MAX_FD
from .._kernel import _accel
from .._kernel._unix import Authorize
from . import _wire as wire
from ._ledger import Item, Ledger, WorkerSlot

__all__ = [
    "RETRY_DELAY",
    "AcceptorSide",
    "LinkOwner",
    "WorkerLink",
    "WorkerLinks",
    "close_items",
    "send_clients",
]

logger = logging.getLogger("aioancillary")

#: Seconds before a worker whose socket refused a hand-off (not because it left) gets more.
RETRY_DELAY = 0.1

# An item's parts, without a Python frame per item (the hand-off's hot path).
_record_of = operator.itemgetter(0)
_fd_of = operator.itemgetter(1)


class LinkOwner(Protocol):
    """What a [`WorkerLink`][] tells its acceptor (each call from the link's transport)."""

    def link_ready(self, link: WorkerLink) -> None:
        """The connection is up: welcome the worker and register it (``link.slot``)."""
        ...

    def link_completed(self, link: WorkerLink, count: int) -> None:
        """The worker reported ``count`` more clients finished."""
        ...

    def link_broken(self, link: WorkerLink, exc: ProtocolError) -> None:
        """The worker sent something the hand-off protocol does not allow: drop it."""
        ...

    def link_unsent(self, link: WorkerLink, items: list[Item]) -> None:
        """Clients handed to the link that never left it (the connection failed); the
        caller owns their fds now."""
        ...

    def link_paused(self, link: WorkerLink, paused: bool) -> None:
        """The worker's socket filled up (``True``) or drained again (``False``)."""
        ...

    def link_lost(self, link: WorkerLink, exc: Exception | None) -> None:
        """The connection is closed: the worker left."""
        ...


class AcceptorSide(Protocol):
    """What [`WorkerLinks`][] asks of, and tells, the side of the acceptor that reads the
    listeners (``_intake.Intake``)."""

    def announcements(self) -> list[bytes]:
        """The messages announcing the acceptor's listeners (for a new worker)."""
        ...

    def workers_have_room(self) -> None:
        """A worker may have room again: the listeners may be read."""
        ...

    def workers_full(self) -> None:
        """A worker's socket filled up and no worker has room left: stop reading at once."""
        ...


class WorkerLink(AncillaryProtocol):
    """The protocol of one worker's connection, on the acceptor's side.

    Attributes:
        slot: The worker's entry in the acceptor's ledger, once registered.
        pid: The worker's process id (given, or from its credentials), or ``None``.
        transport: The connection, once made.
    """

    __slots__ = ("_owner", "pid", "slot", "transport")

    def __init__(self, owner: LinkOwner, pid: int | None) -> None:
        self._owner = owner
        self.pid = pid
        self.slot: WorkerSlot[WorkerLink] | None = None
        self.transport: AncillaryTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, AncillaryTransport)
        self.transport = transport
        if self.pid is None:
            creds = transport.get_extra_info("peercred")
            self.pid = creds.pid if creds is not None and creds.pid > 0 else None
        self._owner.link_ready(self)

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
                    for rest in messages:
                        rest.close()
                    self._owner.link_broken(self, exc)
                    return
        if total:
            self._owner.link_completed(self, total)

    def messages_unsent(self, messages: list[AncillaryMessage]) -> None:
        # Queued in the transport: none of their bytes (hence fds) reached the worker.
        items: list[Item] = []
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
        if items:
            self._owner.link_unsent(self, items)

    def eof_received(self) -> bool:
        return False  # the worker stopped talking: it is leaving

    def pause_writing(self) -> None:
        self._owner.link_paused(self, True)

    def resume_writing(self) -> None:
        self._owner.link_paused(self, False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.link_lost(self, exc)

    def __repr__(self) -> str:
        return f"<WorkerLink pid={self.pid} {self.slot!r}>"


class WorkerLinks:
    """The acceptor's workers: their links, the ledger of their clients, and the hand-off.

    It implements [`LinkOwner`][] for every link it makes, sends each worker its pending
    clients ([`flush`][]), retries a worker whose socket refused some, takes back what a
    leaving worker never got, and answers the waits on workers and on the clients in flight.
    It tells the acceptor's reading side, through [`AcceptorSide`][] only, when the workers
    may have room again and when they have none: reading the listeners is its business.

    Args:
        ledger: The bookkeeping of clients and workers.
        side: The acceptor's side that reads the listeners.
    """

    def __init__(self, ledger: Ledger[WorkerLink], side: AcceptorSide) -> None:
        self._loop = asyncio.get_running_loop()
        self.ledger = ledger
        self._side = side
        self._next_index = 0
        self._pid = os.getpid()
        self._closing = False  # close(): no new worker, nothing more handed out
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._worker_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._all_gone: asyncio.Future[None] = self._loop.create_future()
        self._all_gone.set_result(None)

    # -- registering ------------------------------------------------------------------------

    def new_link(self, pid: int | None = None) -> WorkerLink:
        """A link for a worker's connection (a protocol factory)."""
        return WorkerLink(self, pid)

    async def listen(
        self, path: str | os.PathLike[str], authorize: Authorize, mode: int
    ) -> AncillaryServer:
        """A registration server on ``path``: each worker ``authorize`` admits gets a link.

        Raises:
            TypeError: ``authorize`` is ``None``.
        """
        if authorize is None:
            raise TypeError(
                "listen_for_workers(authorize=None) would hand clients to any process that "
                "can connect: pass a policy (the default, same_user, admits workers of this "
                "user; allow_uids(...) or root_or_same_user widen it)"
            )
        return await create_unix_server(self.new_link, path, authorize=authorize, mode=mode)

    def add(self, sock: socket.socket, pid: int | None) -> WorkerSlot[WorkerLink]:
        """Register the worker at the other end of ``sock`` (ours from now on)."""
        if self._closing:
            sock.close()
            raise ConnectionClosedError("the acceptor is closed")
        link = self.new_link(pid)
        AncillaryTransport(self._loop, sock, link)  # connection_made registers it
        assert link.slot is not None
        return link.slot

    def link_ready(self, link: WorkerLink) -> None:
        transport = link.transport
        assert transport is not None
        if self._closing:
            transport.close()
            return
        transport.write(wire.welcome_message())
        for announcement in self._side.announcements():
            transport.write(announcement)
        link.slot = self.ledger.join(link, self._next_index, link.pid)
        self._next_index += 1
        if self._worker_waiters:
            registered = len(self.ledger.workers)
            for count, waiter in self._worker_waiters:
                if count <= registered and not waiter.done():
                    waiter.set_result(None)
        if self._all_gone.done():
            self._all_gone = self._loop.create_future()
        logger.debug("worker %r registered", link.slot)
        self._side.workers_have_room()

    def retire(self, slot: WorkerSlot[WorkerLink]) -> None:
        """Give ``slot``'s worker no more clients and end its client stream.

        Raises:
            ValueError: not one of the live workers.
        """
        self.ledger.retire(slot)
        transport = slot.link.transport
        if transport is not None:
            transport.write_eof()  # after what is queued: its iteration ends there
        logger.debug("worker %r retired", slot)

    def announce(self, announcement: bytes) -> None:
        """Tell every live worker of a new listener."""
        for slot in self.ledger.workers:
            transport = slot.link.transport
            if transport is not None and not slot.gone:
                transport.write(announcement)

    # -- handing clients over -----------------------------------------------------------------

    def flush(self) -> None:
        """Give every worker with pending clients its clients: one message each."""
        ledger = self.ledger
        sent: list[Item] = []
        dirty, ledger.dirty = ledger.dirty, []
        for slot in dirty:
            items, slot.pending = slot.pending, []
            transport = slot.link.transport
            if slot.gone or transport is None:
                taken, error = 0, None
            else:
                taken, error = send_clients(transport, items)
            sent += ledger.sent(slot, items, taken)
            if taken < len(items):
                if transport is not None and not transport.is_closing():
                    # Refused but alive (e.g. ETOOMANYREFS: too many fds in flight for this
                    # user, unix(7)): the others take these; try it again a little later.
                    self._refused(slot, error, taken, len(items))
                    self._loop.call_later(RETRY_DELAY, self._reopen, slot)
            elif slot.refusing:
                slot.refusing = False
                logger.warning("worker #%d (pid %s) takes clients again", slot.index, slot.pid)
        # The workers' sockets hold these clients now. Closed together: a wake's clients are
        # consecutive fd numbers whichever worker they went to.
        close_items(sent)
        if ledger.held:
            self._loop.call_soon(self.hand_held)

    def _refused(
        self, slot: WorkerSlot[WorkerLink], error: Exception | None, taken: int, total: int
    ) -> None:
        # Logged once per episode: the retry every RETRY_DELAY would repeat it ten times a
        # second for as long as the condition lasts.
        if slot.refusing:
            logger.debug("worker #%d still refuses clients: %s", slot.index, error)
            return
        slot.refusing = True
        logger.warning(
            "handing clients to worker #%d (pid %s) failed after %d of %d (%s): they go to "
            "other workers; retrying it every %d ms",
            slot.index,
            slot.pid,
            taken,
            total,
            error,
            RETRY_DELAY * 1000,
        )

    def _reopen(self, slot: WorkerSlot[WorkerLink]) -> None:
        transport = slot.link.transport
        if transport is not None and not transport.is_closing() and self.ledger.reopen(slot):
            self.hand_held()

    def hand_held(self) -> None:
        """Give the held clients to workers with room; then the acceptor may read again."""
        ledger = self.ledger
        if self._closing:
            close_items(ledger.close_held())  # no worker takes clients any more
            return
        if ledger.held:
            ledger.hand_held()
            if ledger.dirty:
                self.flush()
        if not ledger.held:
            self._side.workers_have_room()

    # -- what the links say ---------------------------------------------------------------------

    def link_completed(self, link: WorkerLink, count: int) -> None:
        slot = link.slot
        assert slot is not None
        ledger = self.ledger
        was_full = slot.in_flight >= slot.cap  # else the acceptor is not waiting for it
        try:
            ledger.completed_by(slot, count)
        except ProtocolError as exc:
            self.link_broken(link, exc)
            return
        if ledger.held:
            self.hand_held()
        elif was_full:
            self._side.workers_have_room()
        if self._drain_waiters:
            self._check_drained()

    def link_broken(self, link: WorkerLink, exc: ProtocolError) -> None:
        logger.error(
            "dropping worker #%s (pid %s): %s; its queued clients go to other workers",
            link.slot.index if link.slot is not None else "?",
            link.pid,
            exc,
        )
        if link.slot is not None:
            self.ledger.drop(link.slot)
        if link.transport is not None:
            link.transport.abort()

    def link_unsent(self, link: WorkerLink, items: list[Item]) -> None:
        if link.slot is None:
            close_items(items)
            return
        self.ledger.taken_back(link.slot, items)
        self.hand_held()

    def link_paused(self, link: WorkerLink, paused: bool) -> None:
        slot = link.slot
        if slot is None:
            return
        ledger = self.ledger
        if paused:
            ledger.full(slot)
            if not ledger.has_room():
                self._side.workers_full()  # stop reading at once, not at the next client's wake-up
            return
        ledger.room_again(slot)
        if not slot.gone:
            self.hand_held()

    def link_lost(self, link: WorkerLink, exc: Exception | None) -> None:
        slot = link.slot
        if slot is None:
            return
        ledger = self.ledger
        lost = ledger.left(slot)
        if lost:
            logger.warning(
                "worker #%d (pid %s) left with %d client(s) in flight: those connections are "
                "lost (%s)",
                slot.index,
                slot.pid,
                lost,
                exc or "connection closed",
            )
        if not ledger.workers and not ledger.retiring and not self._all_gone.done():
            self._all_gone.set_result(None)
        self.hand_held()
        self._check_drained()

    # -- waiting --------------------------------------------------------------------------------

    async def wait_workers(self, count: int) -> None:
        """Wait until at least ``count`` workers are registered.

        Raises:
            ConnectionClosedError: in a forked child (the workers are the parent's).
        """
        if len(self.ledger.workers) >= count:
            return
        if os.getpid() != self._pid:
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

    def _check_drained(self) -> None:
        if self._drain_waiters and self.ledger.in_flight == 0:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def drain(self, timeout: float | None) -> bool:  # noqa: ASYNC109
        """Wait until no client is in flight; ``False`` if ``timeout`` expired first."""
        if self.ledger.in_flight == 0:
            return True
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

    async def wait_gone(self) -> None:
        """Wait until every worker has left."""
        await asyncio.shield(self._all_gone)

    # -- ending ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Hand out nothing more: close the held clients and end every worker's link (the
        workers' iterators end; they may still report completions until they close)."""
        self._closing = True
        close_items(self.ledger.close_held())
        for slot in list(self.ledger.workers):
            if slot.link.transport is not None:
                slot.link.transport.write_eof()

    def abort(self) -> None:
        """Abort every worker's link (retiring ones too)."""
        for slot in [*self.ledger.workers, *self.ledger.retiring]:
            if slot.link.transport is not None:
                slot.link.transport.abort()

    def forked(self) -> None:
        """In a forked child: the workers are the parent's (their transports are inert)."""
        self._closing = True
        self.ledger.workers.clear()
        self.ledger.retiring.clear()
        close_items(self.ledger.close_held())


def send_clients(
    transport: AncillaryTransport, items: list[Item]
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
    batch = _accel.client_batch
    try:
        while taken < len(items):
            chunk = items[taken : taken + SCM_MAX_FD] if taken or len(items) > SCM_MAX_FD else items
            # This wake's clients are one message already: send it now, not after the
            # transport's end-of-iteration flush (which would also duplicate every fd).
            transport.end_burst()
            if batch is None:
                transport.write_fds(
                    wire.client_message(map(_record_of, chunk)), list(map(_fd_of, chunk))
                )
            else:
                transport.write_fds(*batch(chunk))  # the same message and fds, built in C
            taken += len(chunk)
    except (AncillaryError, OSError) as exc:
        return taken, exc
    return taken, None


def close_items(items: list[Item]) -> None:
    """Close the fds of ``items``."""
    # The clients of one wake are mostly consecutive fd numbers (accept hands out the lowest
    # free ones): both close such runs with one close_range(2) each.
    close = _accel.close_item_fds
    if close is None:
        close_raw(list(map(_fd_of, items)))
    else:
        close(items)
