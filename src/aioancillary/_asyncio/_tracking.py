"""The connections of a [`ConnectionServer`][aioancillary.ConnectionServer]: each one tracked
from ``accept()`` until it ends, served in the stream form (a handler task) or the protocol
form (``loop.connect_accepted_socket``), counted, and cut on demand."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Connections", "ProtocolFactory", "StreamHandler"]

logger = logging.getLogger("aioancillary")

#: ``async def handler(reader, writer) -> None``: serves one connection, as the callback of
#: ``asyncio.start_server``; the writer is closed when it returns.
StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
#: Makes the protocol of one connection, as for ``loop.create_server``.
ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class _Connection:
    """One accepted connection, tracked from ``accept()`` until it ends."""

    __slots__ = ("cut", "done", "listener", "sock", "task", "transport")

    def __init__(self, sock: socket.socket, listener: str) -> None:
        self.sock = sock
        self.listener = listener
        #: The handler's task (stream form), or the task that connects the protocol.
        self.task: asyncio.Task[None] | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.cut = False  # closed by the server, not by itself
        self.done = False


class Connections:
    """The live connections of one server, and its counters."""

    def __init__(self, limit: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = limit  # the stream reader's buffer limit
        self.live: set[_Connection] = set()
        #: Set while no connection is live.
        self.idle = asyncio.Event()
        self.idle.set()
        self.accepted = self.finished_count = self.cut = self.errors = 0

    def start(
        self,
        sock: socket.socket,
        listener: str,
        handler: StreamHandler | None,
        protocol_factory: ProtocolFactory | None,
    ) -> None:
        """Track the accepted ``sock`` from now on and serve it in a task."""
        conn = _Connection(sock, listener)
        self.live.add(conn)
        self.idle.clear()
        self.accepted += 1
        if handler is not None:
            coro = self._serve_streams(handler, conn)
        else:
            assert protocol_factory is not None
            coro = self._serve_protocol(protocol_factory, conn)
        conn.task = self._loop.create_task(coro)

    def finished(self, conn: _Connection) -> None:
        """``conn`` has ended (idempotent); counted as cut if the server closed it."""
        if conn.done:
            return
        conn.done = True
        self.live.discard(conn)
        if conn.cut:
            self.cut += 1
        else:
            self.finished_count += 1
        if not self.live:
            self.idle.set()

    async def _serve_streams(self, handler: StreamHandler, conn: _Connection) -> None:
        try:
            try:
                reader, writer = await asyncio.open_connection(sock=conn.sock, limit=self._limit)
            except Exception as exc:
                conn.sock.close()  # the streams never took it
                logger.error("cannot serve a connection from listener %s: %r", conn.listener, exc)
                return
            conn.transport = writer.transport
            try:
                await handler(reader, writer)
            except Exception:
                self.errors += 1
                logger.exception("connection handler failed (listener %s)", conn.listener)
            writer.close()  # sends what is buffered, then closes
            with contextlib.suppress(OSError):  # a peer that reset: nothing left to send
                await writer.wait_closed()  # finished once the kernel took it all
        except asyncio.CancelledError:
            self.abort(conn)  # cut: what the handler left unsent is dropped
            raise
        finally:
            self.finished(conn)

    async def _serve_protocol(self, factory: ProtocolFactory, conn: _Connection) -> None:
        def make() -> asyncio.BaseProtocol:
            inner = factory()
            if isinstance(inner, asyncio.BufferedProtocol):
                return _TrackedBuffered(inner, self, conn)
            return _Tracked(inner, self, conn)

        try:
            await self._loop.connect_accepted_socket(make, conn.sock)
        except BaseException as exc:
            # No transport took the socket, or the one that did was closed with it.
            conn.sock.close()
            self.finished(conn)
            if not isinstance(exc, Exception):
                raise
            self.errors += 1
            logger.error("cannot serve a connection from listener %s: %r", conn.listener, exc)
        # From here the protocol's connection_lost says when the connection is finished.

    @staticmethod
    def abort(conn: _Connection) -> None:
        """Close ``conn`` at once: abort its transport (unsent data is dropped), or its socket."""
        transport = conn.transport
        if transport is None:
            conn.sock.close()
            return
        abort = getattr(transport, "abort", None)  # every stream transport has it
        if abort is not None:
            abort()
        else:
            transport.close()

    def cut_now(self) -> list[asyncio.Task[None]]:
        """Cut every live connection; return the tasks to wait for."""
        tasks = []
        for conn in list(self.live):
            task = conn.task
            if task is not None and not task.done():
                conn.cut = True
                task.cancel()  # the handler (or the connect) ends; the task cleans up
                tasks.append(task)
                continue
            transport = conn.transport
            conn.cut = transport is None or not transport.is_closing()
            self.abort(conn)
            # connection_lost follows from the loop, but the protocol may have handed the
            # transport to another one (set_protocol): do not wait for it to say so.
            self.finished(conn)
        return tasks


class _TrackedBase(asyncio.BaseProtocol):
    """Passes every callback to the application's protocol; tells the server when the
    connection is lost."""

    __slots__ = ("_conn", "_inner", "_server")

    def __init__(self, inner: Any, server: Connections, conn: _Connection) -> None:
        self._inner = inner
        self._server = server
        self._conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._conn.transport = transport
        try:
            self._inner.connection_made(transport)
        except Exception:
            # The loop would report it and keep the transport open with nobody serving it.
            self._server.errors += 1
            logger.exception("connection_made failed (listener %s)", self._conn.listener)
            self._server.abort(self._conn)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._server.finished(self._conn)


class _Tracked(_TrackedBase, asyncio.Protocol):
    """`_TrackedBase` for an ``asyncio.Protocol``."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)


class _TrackedBuffered(_TrackedBase, asyncio.BufferedProtocol):
    """`_TrackedBase` for an ``asyncio.BufferedProtocol`` (uvloop picks the read path by
    the protocol's type: this one must not also be an ``asyncio.Protocol``)."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> Any:
        return self._inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._inner.buffer_updated(nbytes)
