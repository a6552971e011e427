"""Servers: [`start_unix_server`][aioancillary.start_unix_server] (a handler per connection),
[`create_unix_server`][aioancillary.create_unix_server] (a protocol per connection), and the
[`AncillaryServer`][aioancillary.AncillaryServer] both return."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from .._core._errors import (
    AncillaryError,
    CloexecError,
    ConnectionClosedError,
    DataTruncatedError,
    FdTruncatedError,
    PeerRejectedError,
    ProtocolError,
)
from .._core._framing import DEFAULT_MAX_FRAME_SIZE
from .._kernel import _fork
from .._kernel._accept import AcceptErrorKind, AcceptFailure, ResourcePause, accept_burst
from .._kernel._authorize import SERVER_DEFAULT
from .._kernel._unix import (
    Authorize,
    PathArg,
    check_listening,
    check_peer,
    is_abstract,
    listen,
    listener_shut_down,
    policy_for,
)
from ._connection import DEFAULT_MAX_QUEUED_BYTES, AncillaryConnection
from ._protocol import AncillaryProtocol, protocol_from
from ._transport import AncillaryTransport

__all__ = [
    "AncillaryServer",
    "Handler",
    "ServerStats",
    "create_unix_server",
    "start_unix_server",
]

logger = logging.getLogger("aioancillary")

#: ``async def handler(conn)``: serves one accepted connection; it is closed when this returns.
Handler = Callable[[AncillaryConnection], Awaitable[None]]
# What a peer can make a receiving handler raise: logged once when the transport closes.
_PEER_FAULTS = (ProtocolError, FdTruncatedError, DataTruncatedError, CloexecError)


@dataclass(frozen=True, slots=True)
class ServerStats:
    """Counters of an [`AncillaryServer`][aioancillary.AncillaryServer] since it started.

    Attributes:
        accepted: Connections accepted (including those then refused by ``authorize``).
        rejected: Connections refused by ``authorize``.
        peer_errors: Connections closed because the peer broke the protocol or sent what
            could not be received (``ProtocolError``, ``FdTruncatedError``, ...).
        handler_errors: Handlers that raised, and connections that could not be set up
            because the application's code raised (``authorize``, a protocol factory,
            ``connection_made``); each is reported once to the loop's exception handler.
        active: Connections open now.
        listener_error: Why the server stopped listening on its own: ``accept()`` failed
            for good on its socket (for example once the socket was shut down underneath
            it); the fact is logged once. ``None`` while it listens, or after ``close()``.
    """

    accepted: int
    rejected: int
    peer_errors: int
    handler_errors: int
    active: int
    listener_error: OSError | None = None


class AncillaryServer:
    """A listening Unix socket; each connection gets a handler task or a protocol.

    Made by [`start_unix_server`][aioancillary.start_unix_server] and
    [`create_unix_server`][aioancillary.create_unix_server]. Like `asyncio.Server`:
    [`close`][aioancillary.AncillaryServer.close],
    [`wait_closed`][aioancillary.AncillaryServer.wait_closed],
    [`serve_forever`][aioancillary.AncillaryServer.serve_forever], and ``async with``. A peer's
    faults (garbage frames, a refused ``authorize``) are not the server's errors: each is logged
    once per connection on the ``"aioancillary"`` logger at ``peer_error_level`` and counted in
    [`stats`][aioancillary.AncillaryServer.stats]; they never reach the loop's exception handler.
    """

    def __init__(
        self,
        sock: socket.socket,
        serve: Callable[[socket.socket], None],
        *,
        path: str | bytes | None,
        authorize: Authorize | None,
        peer_error_level: int,
    ) -> None:
        """Serve the listening ``sock``; use [`start_unix_server`][aioancillary.start_unix_server]
        instead."""
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = sock
        self._fileno = sock.fileno()
        self._serve = serve
        self._authorize = authorize
        self._peer_level = peer_error_level
        self._path = path
        self._inode = os.lstat(path).st_ino if path is not None else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[AncillaryConnection] = set()
        self._transports: set[AncillaryTransport] = set()
        self._idle: asyncio.Future[None] | None = None
        self._closed = self._loop.create_future()
        self._accepted = self._rejected = self._peer_errors = self._handler_errors = 0
        self._listener_error: OSError | None = None
        where = f"the server at {path!r}" if path is not None else "the server"
        self._pause = ResourcePause(logger, where)
        self._pid = _fork.track(self)
        self._loop.add_reader(self._fileno, self._on_accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening socket (empty once closed); send it to a successor to hand over."""
        return () if self._sock is None else (self._sock,)

    @property
    def stats(self) -> ServerStats:
        """A snapshot of the server's counters."""
        return ServerStats(
            self._accepted,
            self._rejected,
            self._peer_errors,
            self._handler_errors,
            len(self._transports),
            self._listener_error,
        )

    def is_serving(self) -> bool:
        """True while the server accepts connections (not after ``close()``, nor once its
        listener failed for good: logged once, the listener closed)."""
        return self._sock is not None

    def _forked(self) -> None:
        # In a child process after fork(): drop this process's copy; the loop is the parent's.
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _on_accept(self) -> None:
        sock = self._sock
        if sock is None:
            return
        accepted: list[tuple[socket.socket, object]] = []
        failure = accept_burst(sock.accept, 64, accepted)
        for i, (conn_sock, _addr) in enumerate(accepted):
            try:
                self._take(conn_sock)
            except BaseException:
                for rest, _ in accepted[i:]:  # this one and those not taken yet
                    rest.close()
                raise
        if failure is None and not accepted and listener_shut_down(sock):
            # A listener shut down underneath the server polls readable for good while
            # accept() finds nothing: the reader would fire again at once, forever.
            shut = OSError(errno.ESHUTDOWN, "the listening socket was shut down")
            failure = AcceptFailure(AcceptErrorKind.FATAL, shut)
        if failure is None:
            self._pause.recovered()
        elif failure.kind is AcceptErrorKind.RESOURCE:
            # Out of fds or memory: stop accepting for a moment instead of spinning on the
            # readiness callback; pending clients wait in the backlog. Logged once per episode.
            delay = self._pause.failed(failure.error)
            self._loop.remove_reader(self._fileno)
            self._loop.call_later(delay, self._resume_accepting)
        else:
            self._drop_listener(failure.error)

    def _take(self, conn_sock: socket.socket) -> None:
        self._accepted += 1
        try:
            check_peer(conn_sock, self._authorize)
            self._serve(conn_sock)
        except PeerRejectedError as exc:
            conn_sock.close()  # any fds the peer already sent are closed by the kernel
            self._rejected += 1
            logger.log(self._peer_level, "%s", exc)
        except Exception as exc:
            # The application's code failed on this connection (authorize, the protocol
            # factory, connection_made): close it, report it once, serve the next one.
            conn_sock.close()
            self._handler_errors += 1
            self._loop.call_exception_handler(
                {
                    "message": "aioancillary server could not set up a connection "
                    "(authorize, the protocol factory or connection_made raised); the "
                    "connection was closed",
                    "exception": exc,
                    "server": self,
                }
            )

    def _drop_listener(self, exc: OSError) -> None:
        # accept() fails for good (EINVAL: no longer listening; EBADF...): stop serving the
        # listener, once, instead of failing again on every readiness callback.
        self._listener_error = exc
        logger.error(
            "the server at %r stopped listening: accept() failed for good (%s); its "
            "connections go on, new ones are refused: start a new server",
            self._path if self._path is not None else "inherited socket",
            exc,
        )
        self.close()

    def _resume_accepting(self) -> None:
        if self._sock is not None and os.getpid() == self._pid:
            self._loop.add_reader(self._fileno, self._on_accept)

    # -- connections ------------------------------------------------------------------------------

    def _attach(self, transport: AncillaryTransport) -> None:
        self._transports.add(transport)

    def _detach(self, transport: AncillaryTransport, exc: Exception | None) -> None:
        self._transports.discard(transport)
        if isinstance(exc, AncillaryError) and not isinstance(exc, ConnectionClosedError):
            self._peer_errors += 1
            logger.log(
                self._peer_level,
                "closed the connection from peer %s: %s",
                transport.get_extra_info("peercred"),
                exc,
            )
        elif exc is not None:
            logger.debug("connection from %s lost: %s", transport.get_extra_info("peercred"), exc)
        if not self._transports and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _start_handler(self, conn: AncillaryConnection, handler: Handler) -> None:
        self._conns.add(conn)
        task = self._loop.create_task(self._run_handler(conn, handler))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, conn: AncillaryConnection, handler: Handler) -> None:
        try:
            async with conn:
                await handler(conn)
        except (ConnectionClosedError, *_PEER_FAULTS) as exc:
            # The peer left or broke the protocol (counted and logged once, when its
            # transport closed), or the server closed its clients: not the server's failure.
            logger.debug("connection handler ended: %s", exc)
        except Exception as exc:  # a failing handler must not stop the server
            self._handler_errors += 1
            self._loop.call_exception_handler(
                {"message": "aioancillary connection handler failed", "exception": exc}
            )
        finally:
            self._conns.discard(conn)

    # -- closing ----------------------------------------------------------------------------------

    def close(self, *, unlink: bool = True) -> None:
        """Stop listening. Running handlers and connections go on; see
        [`close_clients`][aioancillary.AncillaryServer.close_clients].

        Args:
            unlink: Remove the socket file this server created (if it is still the same
                file). Pass ``False`` after handing the listening socket to a successor.
        """
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        if os.getpid() == self._pid:
            self._loop.remove_reader(self._fileno)
        sock.close()
        if unlink and self._path is not None and not is_abstract(self._path):
            with contextlib.suppress(OSError):
                if os.lstat(self._path).st_ino == self._inode:
                    os.unlink(self._path)
        if not self._closed.done():
            self._closed.set_result(None)

    def close_clients(self) -> None:
        """Close every open connection (queued outgoing messages are still sent)."""
        for conn in list(self._conns):
            conn.close()
        for transport in list(self._transports):
            transport.close()

    def abort_clients(self) -> None:
        """Abort every open connection at once."""
        for conn in list(self._conns):
            conn.abort()
        for transport in list(self._transports):
            transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the server is closed, every handler has returned and every connection
        is closed."""
        await asyncio.shield(self._closed)
        while True:
            # Only unfinished tasks: a finished one leaves the set in a done callback that
            # may not have run yet (and gather() over finished tasks completes without
            # yielding on 3.12+, which would spin here).
            pending = [task for task in self._tasks if not task.done()]
            if pending:
                await asyncio.wait(pending)
            elif self._transports:
                self._idle = self._loop.create_future()
                await asyncio.shield(self._idle)
            else:
                return

    async def serve_forever(self) -> None:
        """Serve until cancelled, or until the server is closed; cancelling closes it.

        Raises:
            OSError: the server stopped listening because ``accept()`` failed for good on
                its socket (see ``stats.listener_error``).
        """
        try:
            await asyncio.shield(self._closed)
        except asyncio.CancelledError:
            self.close()
            raise
        failure = self._listener_error
        if failure is not None:
            where = self._path if self._path is not None else "an inherited socket"
            raise OSError(
                failure.errno,
                f"the server on {where!r} stopped listening: accept() failed "
                f"({failure.strerror}). Start a new server to serve that address again",
            ) from failure

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        self.close_clients()
        await self.wait_closed()

    def __repr__(self) -> str:
        where = self._path if self._path is not None else "inherited socket"
        return f"<AncillaryServer {where!r} serving={self.is_serving()}>"


def _fspath(path: PathArg | None) -> str | bytes | None:
    return None if path is None else os.fspath(path)


def _listening_socket(
    path: PathArg | None, sock: socket.socket | None, sock_type: int, mode: int, backlog: int
) -> tuple[socket.socket, str | bytes | None]:
    if (path is None) == (sock is None):
        raise ValueError("give exactly one of path= or sock=")
    if sock is not None:
        check_listening(sock)
        sock.setblocking(False)
        return sock, None
    assert path is not None
    fspath = os.fspath(path)
    listener = listen(fspath, sock_type, mode, backlog)
    return listener, None if is_abstract(fspath) else fspath


async def start_unix_server(
    handler: Handler,
    path: PathArg | None = None,
    *,
    sock: socket.socket | None = None,
    sock_type: int = socket.SOCK_STREAM,
    framed: bool | None = None,
    mode: int = 0o600,
    backlog: int = 128,
    authorize: Authorize | None = SERVER_DEFAULT,
    max_message_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    max_queued_fds: int | None = None,
    max_fds_per_send: int | None = None,
    peer_error_level: int = logging.INFO,
) -> AncillaryServer:
    """Listen on ``path`` (or the listening ``sock``) and run ``handler(conn)`` per connection.

    The socket file is created with permissions ``mode`` (default ``0o600``: owner only); a
    stale socket file left by a dead server is replaced, a live one or a non-socket file is
    refused. Paths starting with ``"\\0"`` are Linux abstract names (no file). Each connection
    is closed when its handler returns.

    Args:
        handler: ``async def handler(conn: AncillaryConnection) -> None``.
        path: Where to listen.
        sock: A listening AF_UNIX socket instead (e.g. inherited from a predecessor).
        sock_type: ``SOCK_STREAM`` (default) or ``SOCK_SEQPACKET`` (with ``path``).
        framed: As for [`open_unix_connection`][aioancillary.open_unix_connection].
        mode: Permissions of the socket file.
        backlog: ``listen()`` backlog.
        authorize: Called with each peer's credentials on accept; refused peers are
            disconnected before any fd moves. By default, on an abstract name or a ``sock=``
            (no file permission of this server's choosing protects them) only this user is
            let in ([`same_user`][aioancillary.same_user]); on a path the socket file's
            ``mode`` decides alone. ``None`` lets in anyone who can connect.
        max_message_size: As for [`open_unix_connection`][aioancillary.open_unix_connection].
        max_queued_bytes: As for [`open_unix_connection`][aioancillary.open_unix_connection].
        max_queued_fds: As for [`open_unix_connection`][aioancillary.open_unix_connection].
        max_fds_per_send: As for [`open_unix_connection`][aioancillary.open_unix_connection].
        peer_error_level: Logging level for a peer's faults (refused by ``authorize``, broke
            the protocol): one record per connection on the ``"aioancillary"`` logger.

    Example::

        async def handler(conn):
            async for msg in conn:
                with msg:
                    ...

        async with await start_unix_server(handler, "/run/worker.sock") as server:
            await server.serve_forever()

    Raises:
        ValueError: both or neither of ``path`` and ``sock``; ``sock`` is not a listening
            AF_UNIX socket.
        OSError: binding failed (the message names the path).
    """
    listener, fspath = _listening_socket(path, sock, sock_type, mode, backlog)
    server: AncillaryServer | None = None

    def serve(conn_sock: socket.socket) -> None:
        assert server is not None
        conn = AncillaryConnection(
            conn_sock,
            framed=framed,
            max_message_size=max_message_size,
            max_queued_bytes=max_queued_bytes,
            max_queued_fds=max_queued_fds,
            max_fds_per_send=max_fds_per_send,
            server=server,
        )
        server._start_handler(conn, handler)

    try:
        server = AncillaryServer(
            listener,
            serve,
            path=fspath,
            authorize=policy_for(authorize, _fspath(path), sock),
            peer_error_level=peer_error_level,
        )
    except BaseException:
        listener.close()
        raise
    return server


async def create_unix_server(
    protocol_factory: Callable[[], AncillaryProtocol],
    path: PathArg | None = None,
    *,
    sock: socket.socket | None = None,
    sock_type: int = socket.SOCK_STREAM,
    framed: bool | None = None,
    mode: int = 0o600,
    backlog: int = 128,
    authorize: Authorize | None = SERVER_DEFAULT,
    max_message_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_fds_per_send: int | None = None,
    peer_error_level: int = logging.INFO,
) -> AncillaryServer:
    """Listen on ``path`` (or ``sock``) and give each connection a protocol from the factory.

    The protocol-level form of [`start_unix_server`][aioancillary.start_unix_server], as
    `loop.create_unix_server` is for asyncio's streams: each accepted connection gets an
    [`AncillaryTransport`][aioancillary.AncillaryTransport] and ``protocol_factory()``, whose
    callbacks receive its messages. No task is created per connection.

    Example::

        class Echo(AncillaryProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def message_received(self, msg):
                with msg:
                    self.transport.write_fds(msg.data, msg.fds)

        server = await create_unix_server(Echo, "/run/echo.sock")

    Args:
        protocol_factory: Returns a new [`AncillaryProtocol`][aioancillary.AncillaryProtocol] per
            connection.
        path: As for [`start_unix_server`][aioancillary.start_unix_server].
        sock: As for [`start_unix_server`][aioancillary.start_unix_server].
        sock_type: As for [`start_unix_server`][aioancillary.start_unix_server].
        framed: As for [`start_unix_server`][aioancillary.start_unix_server].
        mode: As for [`start_unix_server`][aioancillary.start_unix_server].
        backlog: As for [`start_unix_server`][aioancillary.start_unix_server].
        authorize: As for [`start_unix_server`][aioancillary.start_unix_server].
        max_message_size: As for [`start_unix_server`][aioancillary.start_unix_server].
        max_fds_per_send: As for [`start_unix_server`][aioancillary.start_unix_server].
        peer_error_level: As for [`start_unix_server`][aioancillary.start_unix_server].

    Raises the same errors as [`start_unix_server`][aioancillary.start_unix_server].
    """
    listener, fspath = _listening_socket(path, sock, sock_type, mode, backlog)
    loop = asyncio.get_running_loop()
    server: AncillaryServer | None = None

    def serve(conn_sock: socket.socket) -> None:
        protocol = protocol_from(protocol_factory)
        AncillaryTransport(
            loop,
            conn_sock,
            protocol,
            framed=framed,
            max_message_size=max_message_size,
            max_fds_per_send=max_fds_per_send,
            server=server,
        )

    try:
        server = AncillaryServer(
            listener,
            serve,
            path=fspath,
            authorize=policy_for(authorize, _fspath(path), sock),
            peer_error_level=peer_error_level,
        )
    except BaseException:
        listener.close()
        raise
    return server
