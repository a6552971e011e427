"""The worker side of the hand-off: clients arrive from an [`Acceptor`][aioancillary.Acceptor] as
ready sockets.

A [`Worker`][aioancillary.Worker] is a protocol on its link to the acceptor. Each ``C`` message
becomes a [`HandedClient`][aioancillary.HandedClient] (``_client``): a non-blocking
``socket.socket`` built from the family, type and protocol the acceptor announced for its
listener (passed to ``socket.socket`` with the fd, so no ``getsockopt`` is needed), plus the
listener's name and metadata and the peer's address (decoded only when asked for).
Finishing a client (``with client:``, or [`HandedClient.done`][aioancillary.HandedClient.done])
closes it and reports the completion; reports are coalesced into one message per loop
iteration.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Self

from .._asyncio._client import create_unix_connection
from .._asyncio._closing import AsyncClosing
from .._asyncio._protocol import AncillaryProtocol
from .._asyncio._transport import AncillaryTransport
from .._core._cmsg import Credentials
from .._core._errors import ConnectionClosedError, PeerRejectedError, ProtocolError
from .._core._fd import close_raw
from .._core._message import AncillaryMessage, take_raw_fds
from .._kernel._authorize import same_user
from .._kernel._unix import Authorize
from . import _wire as wire
from ._client import HandedClient, as_enum, client_socket

__all__ = ["ClientHandler", "Worker"]

logger = logging.getLogger("aioancillary")

_EAGER = sys.version_info >= (3, 12)


#: ``async def handler(client: HandedClient) -> None``: serves one client; the client is
#: finished (closed and reported) when it returns.
ClientHandler = Callable[[HandedClient], Awaitable[None]]


class Worker(AncillaryProtocol, AsyncClosing):
    """A worker process's link to its [`Acceptor`][aioancillary.Acceptor]: clients arrive here.

    Get one with [`connect`][aioancillary.Worker.connect]; then iterate (``async for client in
    worker``) or [`serve`][aioancillary.Worker.serve] a handler. Iteration ends when the acceptor
    closes the link (it stops handing out clients); finish the clients you hold, then close the
    worker.

    Example::

        async with await Worker.connect("/run/app/workers.sock") as worker:
            async for client in worker:
                with client:
                    client.sock.sendall(b"hello\\n")
    """

    def __init__(self) -> None:
        """Use [`connect`][aioancillary.Worker.connect]."""
        self._loop = asyncio.get_running_loop()
        self._transport: AncillaryTransport | None = None
        self._listeners: dict[int, wire.ListenerInfo] = {}
        self._welcomed = False
        self._queue: collections.deque[HandedClient] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._exc: Exception | None = None
        self._lost = self._loop.create_future()
        self._done_count = 0
        self._flush_scheduled = False
        self._handler: ClientHandler | None = None
        self._sink: Callable[[HandedClient], object] | None = None
        self._sink_adopts = False  # the sink gives each socket to a loop transport at once
        self._tasks: set[asyncio.Task[None]] = set()
        self._pid = os.getpid()

    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        sock: socket.socket | None = None,
        authorize: Authorize = same_user,
    ) -> Worker:
        """Register with the acceptor listening on ``path`` (or over the connected ``sock``).

        The acceptor decides what this worker serves: every fd it sends becomes a client
        socket here, with the address it claims. So the acceptor's credentials (recorded by
        the kernel when the link was made, ``SO_PEERCRED``) are checked before anything is
        read from it; by default only an acceptor running as this process's own user is
        trusted. A process of another user that bound the path first (an abstract name has
        no permissions; a path in a directory others can write can be taken before the
        acceptor starts) is refused, and whatever it already sent is freed by the kernel
        unread.

        Args:
            path: The acceptor's worker socket
                ([`Acceptor.listen_for_workers`][aioancillary.Acceptor.listen_for_workers]).
            sock: A connected AF_UNIX stream socket instead (e.g. inherited from a pool); the
                worker owns it.
            authorize: Called with the acceptor's credentials; a false result closes the socket
                and raises [`PeerRejectedError`][aioancillary.PeerRejectedError]. Default
                [`same_user`][aioancillary.same_user]; widen it for an acceptor that runs as
                another user, e.g. ``root_or_same_user`` for a worker that dropped root, or
                ``allow_uids(uid)``.

        Raises:
            PeerRejectedError: ``authorize`` refused the acceptor (nothing was read from it).
            TypeError: ``authorize`` is ``None``.
            OSError: the connection failed.
        """
        if authorize is None:
            raise TypeError(
                "Worker.connect(authorize=None) would take clients from any process that "
                "answers: pass a policy (the default, same_user, trusts an acceptor of this "
                "user; allow_uids(...) or root_or_same_user widen it)"
            )
        worker = cls()
        await _open_link(worker, path, sock, authorize)
        return worker

    # -- the link ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, AncillaryTransport)
        self._transport = transport

    def messages_received(self, messages: list[AncillaryMessage]) -> None:
        for i, msg in enumerate(messages):
            try:
                if msg.data[:1] == b"C" and self._welcomed:
                    self._clients(msg)
                else:
                    self._control(msg)
            except ProtocolError as exc:
                for rest in messages[i:]:
                    rest.close()  # closes every fd the faulty message (and later ones) held
                self._fail(exc)
                return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _clients(self, msg: AncillaryMessage) -> None:
        """A ``C`` message: its clients, one fd each, become
        [`HandedClient`][aioancillary.HandedClient] objects."""
        records = wire.client_records(msg.data)
        listeners = self._listeners
        infos = [listeners.get(lid) for lid, _addr in records]
        if None in infos or len(records) != msg.fd_count:
            raise ProtocolError(
                f"the acceptor sent {len(records)} client(s) with {msg.fd_count} fd(s), "
                f"listener ids {sorted({lid for lid, _ in records})} (known: "
                f"{sorted(listeners)}); the fds were closed"
            )
        handler = self._handler
        sink = self._sink
        blocking = not self._sink_adopts
        queue = self._queue
        fds = take_raw_fds(msg)
        used = 0  # fds before this index belong to a socket object (or were closed)
        try:
            for info, (_lid, addr), fd in zip(infos, records, fds, strict=True):
                assert info is not None
                try:
                    sock = client_socket(info.family, info.type, info.proto, fd)
                except OSError as exc:
                    used += 1
                    os.close(fd)  # never a socket object: ours to close
                    logger.error("cannot use a client from listener %r: %s", info.name, exc)
                    self._complete()
                    continue
                used += 1
                if blocking:
                    # (A loop's transport does this itself when it adopts the socket.)
                    sock.setblocking(False)
                client = HandedClient(sock, info, addr, self)
                if sink is not None:
                    try:
                        sink(client)
                    except Exception:
                        logger.exception("could not start serving %r; closing it", client)
                        client.done()
                elif handler is not None:
                    self._start(handler, client)
                else:
                    queue.append(client)
        finally:
            if used < len(fds):  # only if something above raised: none may leak
                close_raw(fds[used:])

    def _control(self, msg: AncillaryMessage) -> None:
        """A message that is not a well-formed client: welcome, listener, or garbage."""
        with msg:  # closes any fd such a message carries
            data = msg.data
            kind = data[0] if data else -1
            if msg.fd_count:
                raise ProtocolError(
                    f"the acceptor sent {msg.fd_count} fd(s) with a message of kind "
                    f"{data[:1]!r} (not a client message, or before the welcome); they were "
                    "closed"
                )
            if kind == wire.WELCOME:
                wire.parse_welcome(data)
                self._welcomed = True
            elif kind == wire.LISTENER and self._welcomed:
                info = wire.parse_listener(data)
                # Enum members, as socket.socket reports them (converted once, not per client).
                self._listeners[info.id] = info._replace(
                    family=as_enum(info.family, socket.AddressFamily),
                    type=as_enum(info.type, socket.SocketKind),
                )
            else:
                raise ProtocolError(f"unexpected message from the acceptor: {data[:64]!r}")

    def _fail(self, exc: Exception) -> None:
        logger.error("closing the link to the acceptor: %s", exc)
        if self._exc is None:
            self._exc = exc
        if self._transport is not None:
            self._transport.abort()

    def eof_received(self) -> bool:
        self._eof = True  # no more clients; completions may still be reported
        self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._exc is None:
            self._exc = exc
        if not self._lost.done():
            self._lost.set_result(None)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _complete(self) -> None:
        self._done_count += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_done)

    def _flush_done(self) -> None:
        self._flush_scheduled = False
        count, self._done_count = self._done_count, 0
        transport = self._transport
        if count and transport is not None and not transport.is_closing():
            try:
                transport.write(wire.done_message(count))
            except ConnectionError as exc:
                # The acceptor is gone (EPIPE, ECONNRESET): nobody is left to count these
                # clients. The transport stopped its write side; the read side sees the end.
                logger.debug("completion report for %d client(s) not sent: %s", count, exc)

    # -- iteration --------------------------------------------------------------------------

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> HandedClient:
        """The next client; iteration ends when the acceptor stops sending clients.

        Raises:
            ProtocolError: the acceptor broke the hand-off protocol (the link is closed).
            ConnectionClosedError: the link failed.
        """
        queue = self._queue
        while not queue:
            exc = self._exc
            if exc is not None:
                if isinstance(exc, ProtocolError):
                    raise exc
                raise ConnectionClosedError(f"the link to the acceptor failed: {exc}") from exc
            if self._eof or self._lost.done():
                if not self._welcomed:
                    raise ConnectionClosedError(
                        "the acceptor closed the link before welcoming this worker (did its "
                        "authorize= refuse this process?)"
                    )
                raise StopAsyncIteration
            if self._waiter is not None:
                raise RuntimeError("another task is already iterating over this worker")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return queue.popleft()

    # -- handler form -----------------------------------------------------------------------

    async def serve(self, handler: ClientHandler) -> None:
        """Run ``handler(client)`` in a task for every client until the acceptor stops.

        Each client is finished (closed and reported) when its handler returns or raises; a
        handler's exception is logged and does not stop the worker. Returns once the acceptor
        closed the link and every handler has returned.

        Raises:
            ProtocolError: the acceptor broke the hand-off protocol.
            ConnectionClosedError: the link failed.
        """
        self._handler = handler
        try:
            while self._queue:
                self._start(handler, self._queue.popleft())
            await self._until_end()  # clients go to tasks directly
        finally:
            self._handler = None
            while self._tasks:
                await asyncio.wait(list(self._tasks))

    async def _deliver(
        self, sink: Callable[[HandedClient], object], *, adopting: bool = False
    ) -> None:
        """Call ``sink(client)`` for every client as it arrives, until the acceptor stops.

        Like [`serve`][aioancillary.Worker.serve], but synchronous: no task per client and no
        iterating task to wake, for adapters that start each client's work themselves (the
        serve runner's). ``sink`` should not raise: a client it raises for is logged and
        finished. With ``adopting``, the sink hands every socket to a loop transport at once
        (``loop.connect_accepted_socket``, ``create_connection(sock=)``), which makes it
        non-blocking itself: the sockets are passed on as they came.

        Raises:
            ProtocolError: the acceptor broke the hand-off protocol.
            ConnectionClosedError: the link failed.
        """
        self._sink = sink
        self._sink_adopts = adopting
        try:
            queue = self._queue
            while queue:
                client = queue.popleft()
                try:
                    sink(client)
                except Exception:
                    logger.exception("could not start serving %r; closing it", client)
                    client.done()
            await self._until_end()  # clients go to the sink
        finally:
            self._sink = None
            self._sink_adopts = False

    async def _until_end(self) -> None:
        """Wait for the end of the client stream, while clients go elsewhere than the queue
        (to a handler's tasks, or a sink); raises what `__anext__` raises."""
        while True:
            try:
                await self.__anext__()
            except StopAsyncIteration:
                return

    def _start(self, handler: ClientHandler, client: HandedClient) -> None:
        coro = _run_handler(handler, client)
        if _EAGER:
            # A handler that finishes without waiting never goes through the scheduler.
            task = asyncio.Task(coro, loop=self._loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]
            if task.done():
                return
        else:
            task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the link (pending completion reports are sent first); clients not yet taken
        from the iterator are closed without being served."""
        queue = self._queue
        while queue:
            queue.popleft().done()
        self._flush_scheduled = False
        self._flush_done()
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        """Wait until the link is closed (at once in a forked child: the link is the parent's)."""
        if os.getpid() != self._pid:
            return  # the child's copy of the link is inert (see _fork): it never closes here
        await asyncio.shield(self._lost)

    @property
    def listeners(self) -> dict[str, dict[str, Any]]:
        """The acceptor's listeners announced so far: name -> metadata."""
        return {info.name: info.metadata for info in self._listeners.values()}

    async def _close_and_wait(self, cancelled: bool) -> None:
        """``async with``'s exit (AsyncClosing): close, then wait until closed."""
        self.close()
        if cancelled and self._transport is not None:
            self._transport.abort()
        await self.wait_closed()

    def __repr__(self) -> str:
        return f"<Worker listeners={len(self._listeners)} queued={len(self._queue)}>"


async def _run_handler(handler: ClientHandler, client: HandedClient) -> None:
    with client:
        try:
            await handler(client)
        except Exception:
            logger.exception("client handler failed for %r", client)


async def _open_link(
    worker: Worker,
    path: str | os.PathLike[str] | None,
    sock: socket.socket | None,
    authorize: Authorize,
) -> None:
    """Connect ``worker`` (the link's protocol) to its acceptor, once ``authorize`` trusts it.

    The check runs on the connected socket before the transport exists, so before any byte
    or fd is read: a refused peer's socket is closed with whatever it sent still queued, and
    the kernel frees those fds without installing them here (``unix(7)``: fds in flight in a
    closed socket are released with it).
    """
    seen: list[Credentials | None] = []

    def check(credentials: Credentials | None) -> bool:
        seen.append(credentials)
        return bool(authorize(credentials))

    try:
        await create_unix_connection(lambda: worker, path, sock=sock, authorize=check)
    except PeerRejectedError as exc:
        where = "over the socket given" if path is None else f"at {os.fsdecode(path)!r}"
        creds = seen[0] if seen else None
        who = "an unknown user" if creds is None else f"uid {creds.uid} (pid {creds.pid})"
        raise PeerRejectedError(
            f"the acceptor {where} runs as {who} and authorize={_policy_name(authorize)} "
            f"does not trust it (this worker runs as uid {os.geteuid()}); the link was "
            "closed before any fd was taken. Another user's process may have bound the "
            "socket before the acceptor: check who owns it, or widen authorize= if the "
            "acceptor is meant to run as that user"
        ) from exc


def _policy_name(authorize: Authorize) -> str:
    name = getattr(authorize, "__name__", None)
    return name if isinstance(name, str) and name != "<lambda>" else repr(authorize)
