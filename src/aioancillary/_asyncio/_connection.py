"""The application-facing connection: ``await send_fds()``, ``await recv()``, ``async for``."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

from .._core._cmsg import Credentials
from .._core._errors import ConnectionClosedError
from .._core._fd import FdLike
from .._core._framing import DEFAULT_MAX_FRAME_SIZE
from .._core._message import AncillaryMessage
from .._core._platform import Platform
from ._closing import AsyncClosing
from ._inbox import (
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_FDS,
    NO_MESSAGES,
    Inbox,
    State,
    default_max_queued_fds,
    waited_on,
)
from ._protocol import AncillaryProtocol
from ._transport import AncillaryTransport, OnClosed

__all__ = ["DEFAULT_MAX_QUEUED_BYTES", "DEFAULT_MAX_QUEUED_FDS", "AncillaryConnection"]


class _ConnectionProtocol(AncillaryProtocol):
    __slots__ = ("_conn",)

    def __init__(self, conn: AncillaryConnection) -> None:
        self._conn = weakref.ref(conn)

    def messages_received(self, messages: list[AncillaryMessage]) -> None:
        conn = self._conn()
        if conn is None:
            for msg in messages:
                msg.close()  # nobody can ever read them
            return
        conn._on_messages(messages)

    def eof_received(self) -> bool:
        conn = self._conn()
        if conn is not None:
            conn._on_eof()
        return True  # the application may still send; it closes the connection itself

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self._conn()
        if conn is not None:
            conn._on_connection_lost(exc)

    def pause_writing(self) -> None:
        conn = self._conn()
        if conn is not None:
            conn._write_paused = True

    def resume_writing(self) -> None:
        conn = self._conn()
        if conn is not None:
            conn._on_resume_writing()


class AncillaryConnection(Inbox, AsyncClosing):
    """A connected Unix socket that sends and receives messages with fds.

    Get one from [`open_unix_connection`][aioancillary.open_unix_connection],
    [`start_unix_server`][aioancillary.start_unix_server] (passed to the handler) or
    [`connection_pair`][aioancillary.connection_pair]. On SOCK_STREAM the default framed mode
    delivers every ``send_fds(data, fds)`` as exactly one message with exactly its fds.

    Example::

        async with await open_unix_connection("/run/worker.sock") as conn:
            await conn.send_fds(b"client", [client_sock])    # client_sock may be closed now
            async for msg in conn:                            # ends cleanly at EOF
                with msg:
                    print(msg.data, msg.fds)

    Received messages queue up to ``max_queued_bytes`` / ``max_queued_fds``; above that the
    connection stops reading until the application catches up (the peer then blocks).
    Only one task may wait in [`recv`][aioancillary.AncillaryConnection.recv] at a time.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        framed: bool | None = None,
        max_message_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        max_queued_fds: int | None = None,
        max_fds_per_send: int | None = None,
        platform: Platform | None = None,
        on_closed: OnClosed | None = None,
    ) -> None:
        """Wrap a connected AF_UNIX socket; call from a coroutine (the running loop is used).

        The connection owns ``sock``. Prefer
        [`open_unix_connection`][aioancillary.open_unix_connection] with ``sock=``.
        ``on_closed`` goes to its [`AncillaryTransport`][aioancillary.AncillaryTransport].
        """
        self._state = State.CLOSED  # until the transport exists: __del__ has nothing to close
        self._loop = asyncio.get_running_loop()
        self._queue: collections.deque[AncillaryMessage] = NO_MESSAGES  # a deque once needed
        self._qbytes = 0
        self._qfds = 0
        self._max_qbytes = max_queued_bytes
        self._max_qfds = default_max_queued_fds() if max_queued_fds is None else max_queued_fds
        self._read_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None
        self._lost = self._loop.create_future()
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] | None = None  # a list once needed
        self._transport = AncillaryTransport(
            self._loop,
            sock,
            _ConnectionProtocol(self),
            framed=framed,
            max_message_size=max_message_size,
            max_fds_per_send=max_fds_per_send,
            platform=platform,
            on_closed=on_closed,
        )
        self._state = State.OPEN

    # -- sending --------------------------------------------------------------------------

    async def send_fds(
        self,
        data: bytes | bytearray | memoryview,
        fds: Iterable[FdLike] = (),
        *,
        close_fds: bool = False,
    ) -> None:
        """Send ``data`` with ``fds``; the peer receives them as one message.

        ``data`` may be any bytes-like object; its size in bytes is what is sent. The fds are
        borrowed: they stay open, and the caller may close them as soon as this returns
        (queued fds are held as duplicates). With ``close_fds=True`` the connection takes
        ownership of ``OwnedFd``/socket/int items and closes them once sent, or on any
        refusal (no duplicate is made).

        Everything is checked before anything is queued: a refused call leaves the
        connection usable and sends nothing. On a framed stream, below the write buffer's high
        watermark this returns without suspending, so a tight loop of sends is batched; on an
        unframed socket it suspends only while the kernel pushes back. Once ``send_fds`` has
        queued the message, cancelling it while it waits does not withdraw the message.

        Raises:
            ConnectionClosedError: the connection is closed or failed (chained from the cause).
            TypeError: ``data`` is not bytes-like, or an fd item is of the wrong type.
            TooManyFdsError: more fds than one message may carry (253 on Linux/BSD, or
                ``max_fds_per_send``).
            InvalidFdError: an fd is not open; nothing was sent.
            MessageTooLargeError: the message is over ``max_message_size`` (framed) or over
                what the kernel takes in one datagram (seqpacket/dgram); nothing was sent.
            FdsInFlightError: the kernel refused more fds in flight (ETOOMANYREFS).
        """
        self._transport.write_fds(data, fds, close_fds=close_fds)
        if self._write_paused:
            await self.drain()

    async def send_batch(
        self,
        messages: Iterable[tuple[bytes | bytearray | memoryview, Iterable[FdLike]]],
        *,
        close_fds: bool = False,
    ) -> None:
        """Send several messages, each with its own fds, in as few ``sendmsg`` as possible.

        All messages are checked before any is sent; the peer receives each as its own message, in
        order. See [`AncillaryTransport.write_batch`][aioancillary.AncillaryTransport.write_batch].

        Example::

            await conn.send_batch([(b"client", [sock1]), (b"client", [sock2])], close_fds=True)

        Raises the same errors as [`send_fds`][aioancillary.AncillaryConnection.send_fds], for any
        of the messages.
        """
        self._transport.write_batch(messages, close_fds=close_fds)
        if self._write_paused:
            await self.drain()

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one message without fds (see
        [`send_fds`][aioancillary.AncillaryConnection.send_fds])."""
        await self.send_fds(data, ())

    async def drain(self) -> None:
        """Wait until the write buffer is below its low watermark.

        Raises:
            ConnectionClosedError: the connection failed while data was queued (chained from
                the cause).
        """
        self._raise_if_failed()
        if not self._write_paused:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        waiters = self._drain_waiters
        if waiters is None:
            waiters = self._drain_waiters = []
        waiters.append(waiter)
        waited_on.add(self)
        try:
            await waiter
        finally:
            waiters = self._drain_waiters
            if waiters is not None:
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    self._drain_waiters = None
            if self._drain_waiters is None and self._waiter is None:
                waited_on.discard(self)
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        failure = self._exc or self._transport.write_error
        if failure is not None:
            raise ConnectionClosedError(f"the connection failed: {failure}") from failure

    def _on_resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def write_eof(self) -> None:
        """Shut down the sending side after queued messages (the peer sees EOF)."""
        self._transport.write_eof()

    # -- closing --------------------------------------------------------------------------

    def _on_connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None and self._exc is None:
            self._exc = exc
        if self._state is not State.CLOSED:
            self._move(State.LOST)
        if not self._lost.done():
            self._lost.set_result(None)
        self._wake_reader()
        for waiter in self._drain_waiters or ():
            if not waiter.done():
                waiter.set_result(None)  # drain() then raises, chained from the cause
        self._write_paused = False

    def close(self) -> None:
        """Close the connection: queued outgoing messages are sent first; received messages
        not yet taken are closed (with their fds). Idempotent."""
        if self._state is State.CLOSED:
            return
        self._move(State.CLOSED)
        self._transport.close()
        self._close_queue()
        self._wake_reader()

    def abort(self) -> None:
        """Close at once, dropping queued outgoing messages; every fd held is closed."""
        if self._state is not State.CLOSED:
            self._move(State.CLOSED)
        self._transport.abort()
        self._close_queue()
        self._wake_reader()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if self._state is State.OPEN or self._state is State.EOF:
            self._state = State.CLOSED
            # Its reader registration is all that is left of it: close the socket and every
            # fd it holds (before warning: with warnings turned into errors, warn() raises).
            # The loop may be closed or gone by now; nothing more can be done.
            with contextlib.suppress(Exception):
                self._transport.abort()
            self._close_queue()
            _warn(
                f"unclosed AncillaryConnection {self!r}: close it (or use 'async with')",
                ResourceWarning,
                source=self,
            )

    async def wait_closed(self) -> None:
        """Wait until the socket is closed (after [`close`][aioancillary.AncillaryConnection.close],
        or when the peer vanished)."""
        await asyncio.shield(self._lost)

    def is_closing(self) -> bool:
        """True once the connection is closing or closed."""
        return self._state is State.CLOSED or self._transport.is_closing()

    async def _close_and_wait(self, cancelled: bool) -> None:
        if cancelled:
            # Cancelled means stop now: waiting to flush to a peer that may never read would
            # turn a cancellation into a hang.
            self.abort()
        else:
            self.close()
        try:
            await self.wait_closed()
        except asyncio.CancelledError:
            self.abort()  # cancelled while flushing: drop the rest, close every fd
            raise

    # -- information ----------------------------------------------------------------------

    @property
    def transport(self) -> AncillaryTransport:
        """The underlying [`AncillaryTransport`][aioancillary.AncillaryTransport]."""
        return self._transport

    @property
    def peercred(self) -> Credentials | None:
        """The peer process's credentials ``(pid, uid, gid)``, or ``None`` where unknown."""
        creds: Credentials | None = self._transport.get_extra_info("peercred")
        return creds

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Transport information, as
        [`AncillaryTransport.get_extra_info`][aioancillary.AncillaryTransport.get_extra_info]."""
        return self._transport.get_extra_info(name, default)

    def __repr__(self) -> str:
        return (
            f"<AncillaryConnection {self._transport!r} {self._state.value} "
            f"queued={len(self._queue)}>"
        )
