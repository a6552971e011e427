"""Servers: [`start_unix_server`][aioancillary.start_unix_server] (a handler per connection)
and [`create_unix_server`][aioancillary.create_unix_server] (a protocol per connection), both
returning an [`AncillaryServer`][aioancillary.AncillaryServer].

This module sits above the server (``_listener.py``, which knows connections only as things
to close) and above connections and transports: it decides what each accepted socket
becomes, and runs ``start_unix_server``'s handler per connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from .._core._errors import (
    CloexecError,
    ConnectionClosedError,
    DataTruncatedError,
    FdTruncatedError,
    ProtocolError,
)
from .._core._framing import DEFAULT_MAX_FRAME_SIZE
from .._kernel._authorize import SERVER_DEFAULT
from .._kernel._unix import Authorize, PathArg, check_listening, is_abstract, listen, policy_for
from ._connection import DEFAULT_MAX_QUEUED_BYTES, AncillaryConnection
from ._listener import AncillaryServer, Ended, Serve, ServerStats
from ._options import ConnectionOptions, closed_on_error, path_or_sock
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


class _HandlerRunner:
    """``start_unix_server``'s ``serve``: a connection, and a task running the handler on it."""

    __slots__ = ("_handler", "_options", "_tasks")

    def __init__(self, handler: Handler, options: ConnectionOptions) -> None:
        self._handler = handler
        self._options = options
        self._tasks: set[asyncio.Task[Exception | None]] = set()  # the loop keeps weak refs

    def serve(self, conn_sock: socket.socket, ended: Ended) -> AncillaryConnection:
        handled = _Handled(ended)
        conn = handled.conn = self._options.connection(conn_sock, handled.transport_closed)
        task = asyncio.get_running_loop().create_task(self._run(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(handled.handler_done)
        return conn

    async def _run(self, conn: AncillaryConnection) -> Exception | None:
        """Run the handler; return what it raised, if the server should report it."""
        try:
            async with conn:
                await self._handler(conn)
        except (ConnectionClosedError, *_PEER_FAULTS) as exc:
            # The peer left or broke the protocol (counted and logged once, when its
            # transport closed), or the server closed its clients: not the server's failure.
            logger.debug("connection handler ended: %s", exc)
        except Exception as exc:  # reported by the server, which serves on
            return exc
        return None


_RUNNING: Any = object()  # not known yet


class _Handled:
    """One connection of ``start_unix_server``: over for its server once both its transport
    closed and its handler returned."""

    __slots__ = ("conn", "ended", "failure", "lost")

    def __init__(self, ended: Ended) -> None:
        self.ended = ended
        self.conn: AncillaryConnection | None = None
        self.lost: Exception | None = _RUNNING
        self.failure: Exception | None = _RUNNING

    def transport_closed(self, exc: Exception | None) -> None:
        self.lost = exc
        self._end()

    def handler_done(self, task: asyncio.Task[Exception | None]) -> None:
        self.failure = None if task.cancelled() or task.exception() else task.result()
        self._end()

    def _end(self) -> None:
        if self.lost is not _RUNNING and self.failure is not _RUNNING:
            assert self.conn is not None
            self.ended(self.conn, self.lost, self.failure)


def _listening(
    serve: Serve,
    path: PathArg | None,
    sock: socket.socket | None,
    *,
    sock_type: int,
    mode: int,
    backlog: int,
    authorize: Authorize | None,
    peer_error_level: int,
) -> AncillaryServer:
    """A server on the listening socket made at ``path``, or on the caller's ``sock``."""
    fspath = path_or_sock(path, sock)
    if sock is not None:
        check_listening(sock)
        sock.setblocking(False)
        listener = sock
    else:
        assert fspath is not None
        listener = listen(fspath, sock_type, mode, backlog)
    with closed_on_error(listener):
        return AncillaryServer(
            listener,
            serve,
            path=None if fspath is None or is_abstract(fspath) else fspath,
            authorize=policy_for(authorize, fspath, sock),
            peer_error_level=peer_error_level,
        )


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
    options = ConnectionOptions(
        framed, max_message_size, max_fds_per_send, max_queued_bytes, max_queued_fds
    )
    return _listening(
        _HandlerRunner(handler, options).serve,
        path,
        sock,
        sock_type=sock_type,
        mode=mode,
        backlog=backlog,
        authorize=authorize,
        peer_error_level=peer_error_level,
    )


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
    options = ConnectionOptions(framed, max_message_size, max_fds_per_send)

    def serve(conn_sock: socket.socket, ended: Ended) -> AncillaryTransport:
        transport: AncillaryTransport
        transport = options.transport(
            conn_sock,
            protocol_from(protocol_factory),
            on_closed=lambda exc: ended(transport, exc, None),  # always after this returned
        )
        return transport

    return _listening(
        serve,
        path,
        sock,
        sock_type=sock_type,
        mode=mode,
        backlog=backlog,
        authorize=authorize,
        peer_error_level=peer_error_level,
    )
