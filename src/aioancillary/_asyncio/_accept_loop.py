"""A single-process accept loop that knows its connections:
[`ConnectionServer`][aioancillary.ConnectionServer].

A daemon that reloads by handing its listening sockets to a successor must, when the
successor is up, stop accepting without closing the sockets (the successor accepts on the
same ones), let the connections it already accepted finish, and give up on the slow ones at
a deadline. ``asyncio.start_server`` cannot do that: its handler task starts a few loop
iterations after ``accept()`` (a drain that starts in between does not see that connection),
``Server.close()`` closes the listening socket, and ``wait_closed()`` waits for connections
only from Python 3.12 on, with no deadline.

Here every connection is tracked from the instant ``accept()`` returns it. Accepting is a
persistent reader on each listener that accepts until ``EAGAIN``, at most ``accept_burst``
per wake-up (never ``loop.sock_accept``: uvloop's registers and removes a watcher on the
listener for every call). ``accept()`` errors are sorted as ``_kernel._accept`` says:
transient ones skip their client, resource ones (``EMFILE``...) pause that listener and
retry, logged once per episode, and any other error drops that listener alone (its reader
removed; the socket is the caller's and stays open). So does a Unix listener shut down
underneath the server, which ``accept()`` reports as an empty queue (``EAGAIN``) while the
poller reports it ready for good: ``accept_burst`` is given its fd to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any, NamedTuple, Self

from .._kernel import _accel
from .._kernel._accept import (
    AcceptErrorKind,
    ResourcePause,
    accept_burst,
    accepted_kind,
    sockets_of,
)
from ._tracking import Connections, ProtocolFactory, StreamHandler

__all__ = ["ConnectionServer", "ConnectionServerStats"]

logger = logging.getLogger("aioancillary")

_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


class ConnectionServerStats(NamedTuple):
    """Counters of a [`ConnectionServer`][aioancillary.ConnectionServer]."""

    #: Connections accepted since the server was made.
    accepted: int
    #: Connections being served now.
    active: int
    #: Connections that ended by themselves (the handler returned, or the protocol's
    #: ``connection_lost`` ran).
    finished: int
    #: Connections closed by the server: at a drain's deadline, or by ``close()``.
    cut: int
    #: Handlers that raised (each logged with its traceback).
    handler_errors: int
    #: Listeners being accepted on now.
    listeners: int
    #: Names of listeners dropped because ``accept()`` failed for good.
    failed_listeners: tuple[str, ...]
    #: Episodes in which accepting failed for lack of fds or memory (each logged once).
    resource_pauses: int


class _Listener:
    """One listening socket served by the server."""

    __slots__ = (
        "fd",
        "handler",
        "kind",
        "name",
        "protocol_factory",
        "reading",
        "retry",
        "sock",
    )

    def __init__(
        self,
        sock: socket.socket,
        name: str,
        handler: StreamHandler | None,
        protocol_factory: ProtocolFactory | None,
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # kept: the caller may close the socket object under us
        self.kind = accepted_kind(sock)
        self.name = name
        self.handler = handler
        self.protocol_factory = protocol_factory
        self.reading = False
        self.retry: asyncio.TimerHandle | None = None


class ConnectionServer:
    """Accepts on listening sockets in this process, serves each connection, drains.

    Every connection is tracked from the instant ``accept()`` returns it, until its handler
    returns (stream form) or its protocol's ``connection_lost`` runs (protocol form).
    [`stop_accepting`][aioancillary.ConnectionServer.stop_accepting] stops reading the
    listeners *without closing them*: they stay open and listening, so a successor that has
    them (from [`start_generation`][aioancillary.start_generation], or the same socket
    activation) accepts what arrives next.
    [`drain`][aioancillary.ConnectionServer.drain] waits for the connections in flight and,
    at its deadline, closes what is left and says how many it cut.

    Listeners are any listening ``SOCK_STREAM`` sockets: TCP (IPv4, IPv6) and Unix, made
    here, adopted from [`listen_fds`][aioancillary.listen_fds] or taken from a predecessor.
    They remain the caller's: the server never closes them (it makes them non-blocking).
    Stop accepting before you close one.

    Example::

        async def handle(reader, writer):
            writer.write(await reader.readline())     # the writer is closed on return

        async with ConnectionServer(handle) as server:
            server.add_listener(gen.take_socket("web"))
            await gen.ready()
            await gen.handed_over()                   # a successor accepts now
            cut = await server.drain(timeout=30)      # stop accepting, finish, cut the rest

    Args:
        handler: ``async def handler(reader, writer)``, run in a task per connection (as
            for ``asyncio.start_server``); the writer is closed when it returns. A handler
            that raises is logged and counted; it does not stop the server.
        protocol_factory: Instead of ``handler``: a protocol per connection
            (``loop.connect_accepted_socket``); the connection is finished when the
            protocol's ``connection_lost`` runs.
        accept_burst: The most connections accepted per wake-up of one listener, so that a
            busy listener cannot starve the loop.
        limit: The stream reader's buffer limit (stream form).

    Either may be left out here and given per listener to
    [`add_listener`][aioancillary.ConnectionServer.add_listener].
    """

    def __init__(
        self,
        handler: StreamHandler | None = None,
        *,
        protocol_factory: ProtocolFactory | None = None,
        accept_burst: int = 64,
        limit: int = 2**16,
    ) -> None:
        if handler is not None and protocol_factory is not None:
            raise ValueError("give a handler or a protocol_factory, not both")
        if accept_burst < 1:
            raise ValueError(f"accept_burst must be at least 1, got {accept_burst}")
        self._loop = asyncio.get_running_loop()
        self._pid = os.getpid()  # after fork(), the child must not touch the loop's readers
        self._handler = handler
        self._protocol_factory = protocol_factory
        self._burst = accept_burst
        self._listeners: dict[int, _Listener] = {}
        self._conns = Connections(limit)
        self._closed = False
        self._pause = ResourcePause(logger, "the connection server")
        self._failed: list[str] = []

    # -- listeners ----------------------------------------------------------------------------

    def add_listener(
        self,
        sock: socket.socket,
        *,
        name: str | None = None,
        handler: StreamHandler | None = None,
        protocol_factory: ProtocolFactory | None = None,
    ) -> None:
        """Start accepting on the listening socket ``sock`` (it stays yours, and open).

        Args:
            sock: A listening ``SOCK_STREAM`` socket (TCP or Unix); made non-blocking.
            name: Names the listener in logs and stats (default: its address).
            handler: This listener's stream handler, instead of the server's.
            protocol_factory: This listener's protocol factory, instead of the server's.

        Raises:
            ValueError: ``sock`` is closed, not listening, not a stream socket of a supported
                family, or already served; no handler for it, or two; the server is closed.
        """
        if self._closed:
            raise ValueError("this server is closed: make a new one")
        if handler is not None and protocol_factory is not None:
            raise ValueError("give a handler or a protocol_factory, not both")
        if handler is None and protocol_factory is None:
            handler, protocol_factory = self._handler, self._protocol_factory
            if handler is None and protocol_factory is None:
                raise ValueError(
                    "no handler for this listener: pass handler= or protocol_factory= here "
                    "or to ConnectionServer()"
                )
        fd = sock.fileno()
        if fd < 0:
            raise ValueError("the listener is closed")
        if sock.family not in _FAMILIES or sock.type != socket.SOCK_STREAM:
            raise ValueError(
                f"a listener must be a SOCK_STREAM socket of AF_INET, AF_INET6 or AF_UNIX, "
                f"got {sock.family!r}, {sock.type!r}"
            )
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError("the socket does not listen: bind() and listen() it first")
        if fd in self._listeners:
            raise ValueError(f"fd {fd} is already served by this server")
        sock.setblocking(False)
        entry = _Listener(sock, name or _address_name(sock), handler, protocol_factory)
        self._listeners[fd] = entry
        self._start_reading(entry)

    def stop_accepting(self) -> None:
        """Stop accepting on every listener; they stay open, listening, and the caller's.

        Connections that arrive from now on wait in the kernel's backlog for whoever else
        accepts on the same sockets (a successor), or for this server's next
        [`add_listener`][aioancillary.ConnectionServer.add_listener]. The connections being
        served go on. Idempotent.
        """
        listeners, self._listeners = self._listeners, {}
        for entry in listeners.values():
            self._stop_reading(entry)

    @property
    def listeners(self) -> list[socket.socket]:
        """The sockets being accepted on."""
        return [entry.sock for entry in self._listeners.values()]

    def _start_reading(self, entry: _Listener) -> None:
        self._loop.add_reader(entry.fd, self._on_readable, entry)
        entry.reading = True

    def _stop_reading(self, entry: _Listener) -> None:
        if entry.retry is not None:
            entry.retry.cancel()
            entry.retry = None
        if entry.reading and os.getpid() == self._pid:
            # A listener closed under us: its fd may be gone or reused, and the selector
            # unregisters what it can; nothing is left to undo either way.
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(entry.fd)
        entry.reading = False

    def _on_readable(self, entry: _Listener) -> None:
        if self._listeners.get(entry.fd) is not entry:
            return  # stopped in this loop iteration, after the poller reported it ready
        accept_into = _accel.accept_into
        kind = entry.kind
        if accept_into is not None and kind is not None:
            fds: list[int] = []  # the C burst: raw fds, no address tuples
            try:
                failure = accept_into(entry.fd, self._burst, fds, None)
            finally:
                for sock in sockets_of(fds, kind):  # each tracked, even on error
                    self._conns.start(sock, entry.name, entry.handler, entry.protocol_factory)
            count = len(fds)
        else:
            accepted: list[tuple[socket.socket, Any]] = []
            try:
                failure = accept_burst(entry.sock.accept, self._burst, accepted, entry.fd)
            finally:
                for sock, _addr in accepted:  # every accepted socket is tracked, even on error
                    self._conns.start(sock, entry.name, entry.handler, entry.protocol_factory)
            count = len(accepted)
        if failure is None:
            if count:
                self._pause.recovered()
            return
        self._stop_reading(entry)
        if failure.kind is AcceptErrorKind.RESOURCE:
            # The clients stay in the backlog; retrying at once would fail again.
            delay = self._pause.failed(failure.error)
            entry.retry = self._loop.call_later(delay, self._retry, entry)
            return
        del self._listeners[entry.fd]
        self._failed.append(entry.name)
        logger.error(
            "stopped accepting on listener %s: accept() failed with %s, which no retry "
            "fixes (does it still listen?); the other listeners are served",
            entry.name,
            failure.error,
        )

    def _retry(self, entry: _Listener) -> None:
        entry.retry = None
        if self._listeners.get(entry.fd) is entry:
            self._start_reading(entry)

    # -- stopping -----------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Connections being served now."""
        return len(self._conns.live)

    async def drain(self, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Stop accepting, wait for the connections in flight; at ``timeout``, cut the rest.

        The listeners stay open (see
        [`stop_accepting`][aioancillary.ConnectionServer.stop_accepting]). A connection is cut
        by cancelling its handler (its writer is aborted: unsent data is dropped) or, in the
        protocol form, by aborting its transport (``connection_lost`` runs). Returns once the
        cut handlers have ended.

        Args:
            timeout: Seconds to wait before cutting what is left (``None``: as long as it
                takes; ``0``: cut at once).

        Returns:
            How many connections were cut (0: every one finished in time).
        """
        self.stop_accepting()
        if timeout is None or timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._conns.idle.wait()
        before = self._conns.cut
        tasks = self._conns.cut_now()
        if tasks:
            await asyncio.wait(tasks)
        cut = self._conns.cut - before
        if cut:
            logger.warning("cut %d connection(s) still open at the drain's deadline", cut)
        return cut

    def close(self) -> None:
        """Stop accepting and cut every connection now; the listeners stay open.

        [`wait_closed`][aioancillary.ConnectionServer.wait_closed] waits for the cut handlers
        to end. The server accepts no new listener afterwards.
        """
        self._closed = True
        self.stop_accepting()
        self._conns.cut_now()

    async def wait_closed(self) -> None:
        """Wait until no connection is being served."""
        await self._conns.idle.wait()

    def stats(self) -> ConnectionServerStats:
        """The server's counters (a snapshot)."""
        conns = self._conns
        return ConnectionServerStats(
            accepted=conns.accepted,
            active=len(conns.live),
            finished=conns.finished_count,
            cut=conns.cut,
            handler_errors=conns.errors,
            listeners=len(self._listeners),
            failed_listeners=tuple(self._failed),
            resource_pauses=self._pause.episodes,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Leaving the block cuts what is still running: drain before, to let it finish."""
        self._closed = True
        await self.drain(timeout=0)

    def __repr__(self) -> str:
        return (
            f"<ConnectionServer listeners={len(self._listeners)} "
            f"active={len(self._conns.live)} accepted={self._conns.accepted}>"
        )


def _address_name(sock: socket.socket) -> str:
    try:
        addr = sock.getsockname()
    except OSError:
        return f"fd {sock.fileno()}"
    if sock.family == socket.AF_UNIX:
        return repr(addr) if addr else "unix (unnamed)"
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    return f"{addr[0]}:{addr[1]}"
