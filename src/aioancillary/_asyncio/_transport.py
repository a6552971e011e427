"""An asyncio transport that carries fds: readiness callbacks driving ``recvmsg``/``sendmsg``.

asyncio's own transports (and uvloop's) hide their socket and read with ``recv()``: ancillary
data cannot pass through them. This transport owns a non-blocking AF_UNIX socket and drives it
with the loop's public ``add_reader``/``add_writer`` only, so it runs unchanged on uvloop.

It is glue between three sans-I/O parts and the loop: the syscall layer (`._syscalls`)
moves bytes and fds; a decoder (`._framing`, one per `Mode`) turns each read into
messages; the `Outbox` (`._outbox`) holds what waits for the socket and decides
what goes out together. The transport's own state is one `State` value plus the
registrations it holds with the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import mmap
import os
import socket
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from .._core._errors import AncillaryError
from .._core._fd import FD_MAX, close_raw
from .._core._framing import DEFAULT_MAX_FRAME_SIZE, Decoder, Mode
from .._core._message import new_message
from .._core._platform import SCM_MAX_FD, Platform, current_platform
from .._kernel import _accel, _fork
from .._kernel._peercred import peer_credentials
from .._kernel._syscalls import EOF_NEVER, EOF_NO_CREDENTIALS, EOF_ON_EMPTY, EOF_PEEK
from ._flow import FRAMED_HIGH_WATER, WriteFlow
from ._protocol import AncillaryProtocol
from ._reading import ReadSide
from ._writing import WriteSide

if TYPE_CHECKING:
    from .._kernel._speedups import Outbox as COutbox

__all__ = ["AncillaryTransport", "OnClosed", "mode_of"]

#: ``on_closed(exc)``: called once when a transport has closed (right after
#: ``connection_lost(exc)``): how a server keeps count of the connections it serves.
OnClosed = Callable[[Exception | None], None]

_READ_CHUNK = 256 * 1024  # stream read buffer: holds many small frames per recvmsg

# Read buffers, shared by the transports of one loop (a loop runs its callbacks one at a time,
# and every read is copied out of the buffer before the next), one per size: a connection
# costs no buffer of its own, idle or after traffic. Anonymous private mmaps: pages become
# resident only when a read fills them, and a forked child gets copies, not the same pages.
_READ_BUFFERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, memoryview]] = (
    weakref.WeakKeyDictionary()
)


def _read_buffer(loop: asyncio.AbstractEventLoop, size: int) -> memoryview:
    buffers = _READ_BUFFERS.get(loop)
    if buffers is None:
        buffers = _READ_BUFFERS[loop] = {}
    view = buffers.get(size)
    if view is None:
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0)
        view = buffers[size] = memoryview(mmap.mmap(-1, size, flags=flags))
    return view


class State(enum.Enum):
    """Where a transport is in its life."""

    #: Reading and writing.
    OPEN = "open"
    #: `AncillaryTransport.close` was called: queued messages are still being sent,
    #: nothing more is read or accepted for sending.
    CLOSING = "closing"
    #: The socket is closed (or about to be, with ``connection_lost`` scheduled).
    CLOSED = "closed"


def mode_of(sock_type: int, framed: bool | None) -> Mode:
    """The `Mode` of a socket type with the ``framed`` option (default: framed streams)."""
    if sock_type == socket.SOCK_STREAM:
        return Mode.RAW if framed is False else Mode.FRAMED
    return Mode.DATAGRAM


class AncillaryTransport(ReadSide, WriteSide, WriteFlow, asyncio.Transport):
    """A transport over a connected AF_UNIX socket whose writes can carry fds.

    Created by [`open_unix_connection`][aioancillary.open_unix_connection],
    [`start_unix_server`][aioancillary.start_unix_server],
    [`create_unix_connection`][aioancillary.create_unix_connection],
    [`create_unix_server`][aioancillary.create_unix_server] and
    [`connection_pair`][aioancillary.connection_pair]. It implements the `asyncio.Transport`
    interface (``write``, ``writelines``, ``write_eof``, ``close``, ``abort``,
    ``pause_reading``/``resume_reading``, write-buffer limits) plus
    [`write_fds`][aioancillary.AncillaryTransport.write_fds] and
    [`write_batch`][aioancillary.AncillaryTransport.write_batch]; its protocol is an
    [`AncillaryProtocol`][aioancillary.AncillaryProtocol].

    ``get_extra_info`` knows ``"socket"``, ``"sockname"``, ``"peername"``, ``"peercred"`` (a
    [`Credentials`][aioancillary.Credentials] of the peer process, or ``None``), ``"framed"`` and
    ``"socket_type"``.

    Sending: on a framed stream the first message of a loop iteration goes out at once and the next
    ones are merged into one ``sendmsg`` (up to ``max_fds_per_send`` fds). Unframed sockets (raw
    streams, seqpacket, datagrams) send every message at once while the kernel takes them; their
    write-buffer high watermark defaults to 0, so that as soon as the kernel pushes back the
    protocol is paused (an [`AncillaryConnection`][aioancillary.AncillaryConnection] then waits in
    ``send_fds`` instead of queueing a duplicate of every fd).
    """

    # Slots: a server may hold thousands of idle transports, and with this many attributes
    # CPython's instance dict was the largest part of one (about 1.5 KiB). "__dict__" keeps
    # attributes of the caller's own (and tests' patched methods) possible: that dict is made
    # only when one is set. Weak references are kept: `_fork` tracks transports in a WeakSet.
    # ``_extra`` is asyncio.BaseTransport's slot.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_csend",
        "_datagram_limit",
        "_decoder",
        "_eof_requested",
        "_exc",
        "_fd_cap",
        "_fd_high",
        "_fd_low",
        "_fileno",
        "_flush_scheduled",
        "_framed",
        "_high",
        "_loop",
        "_low",
        "_max_message_size",
        "_mode",
        "_on_closed",
        "_outbox",
        "_passcred",
        "_pid",
        "_platform",
        "_protocol",
        "_protocol_paused",
        "_read_paused",
        "_reading",
        "_receiver",
        "_rview",
        "_size_limit",
        "_sock",
        "_state",
        "_type",
        "_writable",
        "_write_failure",
        "_writer_added",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: AncillaryProtocol,
        *,
        framed: bool | None = None,
        max_message_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_fds_per_send: int | None = None,
        platform: Platform | None = None,
        on_closed: OnClosed | None = None,
    ) -> None:
        """Wrap the connected ``sock`` (made non-blocking) and start reading.

        ``protocol.connection_made`` is called before this returns. If it raises, so does
        this: whatever it queued is dropped (fds closed) and ``sock`` stays the caller's.

        Args:
            loop: The running loop.
            sock: A connected AF_UNIX socket; the transport owns and closes it.
            protocol: The protocol that receives messages.
            framed: Frame messages (default on SOCK_STREAM). ``False`` on a stream delivers
                what each read returns. Ignored (always message-based) on seqpacket/dgram.
            max_message_size: Largest message accepted from the peer (framed: frame payload;
                seqpacket/dgram: the receive buffer) and sent by this side.
            max_fds_per_send: Most fds one ``sendmsg`` carries (default: the kernel's cap,
                253). A receiver with few free fds fails its read (``FdTruncatedError``) when a
                single ``sendmsg`` brings more fds than it has room for; a lower cap spreads
                a burst over more ``sendmsg`` calls. A message with more fds is refused.
            platform: Kernel facts (default: this kernel); tests simulate others.
            on_closed: Called once, right after ``connection_lost``, with the same
                exception (``None``: closed normally): how a server keeps count of the
                connections it serves. Never called if this constructor raises.
        """
        super().__init__()
        if sock.family != socket.AF_UNIX:
            raise ValueError(f"an AF_UNIX socket is required, got {sock.family!r}")
        platform = platform or current_platform()
        cap = platform.scm_max_fd or SCM_MAX_FD
        if max_fds_per_send is not None:
            if not 1 <= max_fds_per_send <= cap:
                raise ValueError(f"max_fds_per_send must be between 1 and {cap}")
            cap = max_fds_per_send
        sock.setblocking(False)
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._fileno = sock.fileno()
        self._protocol = protocol
        self._platform = platform
        self._on_closed = on_closed
        self._type = sock.type
        self._mode = mode = mode_of(sock.type, framed)
        self._max_message_size = max_message_size
        self._fd_cap = cap
        # The hot path's classes, C or pure Python (_accel: looked up per transport).
        self._decoder: Decoder = (
            _accel.FrameDecoder(
                max_frame_size=max_message_size,
                max_fds_per_frame=platform.scm_max_fd or SCM_MAX_FD,
                # One recvmsg returns the fds of at most one sendmsg, and a conforming sender
                # puts every header of a batch after that batch's first byte: after a feed,
                # no more than one sendmsg's fds can be waiting for their header.
                max_pending_fds=platform.scm_max_fd or SCM_MAX_FD,
            )
            if mode is Mode.FRAMED
            else _accel.ReadDecoder()
        )
        rsize = _READ_CHUNK if sock.type == socket.SOCK_STREAM else max_message_size
        self._rview = _read_buffer(loop, rsize)
        self._extra: dict[str, Any] = {
            "socket": sock,
            "framed": mode is Mode.FRAMED,
            "socket_type": sock.type,
        }
        with contextlib.suppress(OSError):
            self._extra["sockname"] = sock.getsockname()
        with contextlib.suppress(OSError):
            self._extra["peername"] = sock.getpeername()
        # Linux: a 0-byte SOCK_SEQPACKET read is either an empty message or end of stream.
        # With SO_PASSCRED every message carries an SCM_CREDENTIALS record and the end of
        # stream none, which tells them apart. Side effect: like any SO_PASSCRED socket, an
        # unbound one is autobound to an abstract address at its first send (af_unix.c,
        # unix_dgram_sendmsg), which changes what getsockname() reports.
        self._passcred = False
        if (
            sock.type == socket.SOCK_SEQPACKET
            and platform.name == "linux"
            and hasattr(socket, "SO_PASSCRED")
        ):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                self._passcred = True
        # How a 0-byte read is told from the end of the stream.
        if sock.type == socket.SOCK_STREAM:
            eof = EOF_ON_EMPTY
        elif sock.type == socket.SOCK_DGRAM:
            eof = EOF_NEVER
        else:
            eof = EOF_NO_CREDENTIALS if self._passcred else EOF_PEEK
        self._receiver = _accel.Receiver(sock, self._rview, platform, eof)
        # Taken now: the credentials are fixed at connect time, and unreadable once closed.
        self._extra["peercred"] = peer_credentials(sock)
        # Linux's unix_dgram_sendmsg refuses (EMSGSIZE) a message over sk_sndbuf - 32 bytes;
        # checking before queueing keeps that error with the write that caused it.
        self._datagram_limit = max_message_size
        if mode is Mode.DATAGRAM and platform.name == "linux":
            with contextlib.suppress(OSError):
                sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                self._datagram_limit = min(max_message_size, sndbuf - 32)
        # Above this size a message needs the full check (framed: the peer's frame limit;
        # datagrams: the kernel's; raw streams: none).
        self._size_limit = {
            Mode.FRAMED: max_message_size,
            Mode.DATAGRAM: self._datagram_limit,
            Mode.RAW: FD_MAX,
        }[mode]
        # write side
        self._outbox = outbox = _accel.Outbox(mode, cap)
        # The C outbox also sends (write, flush): the write side takes its C path through it.
        self._csend = cast("COutbox", outbox) if _accel.EXTENSION is not None else None
        if self._csend is not None:
            self._csend.size_limit = self._size_limit  # try_write's own check
        self._framed = mode is Mode.FRAMED
        self._high = FRAMED_HIGH_WATER if mode is Mode.FRAMED else 0
        self._low = self._high // 4
        # Queued fds are open duplicates counting against RLIMIT_NOFILE: pause on them too.
        self._fd_high = 2 * cap
        self._fd_low = self._fd_high // 4
        self._writer_added = False
        self._flush_scheduled = False
        self._protocol_paused = False
        self._eof_requested = False
        self._write_failure: Exception | None = None  # why writing stopped (peer gone)
        # open, no write_eof, no write failure (and which send path: see WriteSide.write_fds)
        self._writable = True if self._csend is None else None
        # state
        self._state = State.OPEN
        self._exc: Exception | None = None  # what made the connection fail, if anything
        self._reading = False
        self._read_paused = False
        self._pid = _fork.track(self)
        try:
            protocol.connection_made(self)
        except BaseException:
            self._abandon()
            raise
        if self._state is State.OPEN and not self._read_paused:
            self._add_reader()

    # -- loop registrations: the only places that touch the loop's fd table -----------------------

    def _in_owner(self) -> bool:
        # After fork() the loop's epoll instance is shared with the parent: a child must never
        # change its registrations (see _fork).
        return os.getpid() == self._pid

    def _add_reader(self) -> None:
        if not self._reading and self._in_owner():
            self._reading = True
            self._loop.add_reader(self._fileno, self._on_readable)

    def _remove_reader(self) -> None:
        if self._reading:
            self._reading = False
            if self._in_owner():
                self._loop.remove_reader(self._fileno)

    def _add_writer(self) -> None:
        if not self._writer_added and self._sock is not None and self._in_owner():
            self._writer_added = True
            self._loop.add_writer(self._fileno, self._send_queued)

    def _remove_writer(self) -> None:
        if self._writer_added:
            self._writer_added = False
            if self._in_owner():
                self._loop.remove_writer(self._fileno)

    def _is_open(self) -> bool:
        return self._state is State.OPEN

    def _is_closing_down(self) -> bool:
        return self._state is State.CLOSING

    def _abandon(self) -> None:
        # connection_made raised: the constructor fails and the socket stays the caller's.
        # Whatever connection_made queued is dropped (its fds closed); nothing reaches the
        # protocol again, and nothing is left registered with the loop.
        self._state = State.CLOSED
        self._writable = False
        self._remove_writer()
        self._sock = None
        close_raw(self._outbox.drop())
        self._decoder.close()

    def _report(self, exc: BaseException, what: str) -> None:
        """Report a protocol callback's exception to the loop (once); re-raise a
        ``KeyboardInterrupt``/``SystemExit``, which is not the connection's business."""
        if not isinstance(exc, Exception):
            raise exc
        self._loop.call_exception_handler(
            {
                "message": f"aioancillary protocol's {what}",
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            }
        )

    def _protocol_failed(self, exc: BaseException, callback: str) -> None:
        """A protocol callback raised: report it once and close the connection.

        As asyncio's transports do when ``data_received`` raises: the protocol's state is
        unknown from here, so nothing more is handed to it but ``connection_lost(exc)``.
        """
        self._report(exc, f"{callback}() raised; the connection was closed")
        assert isinstance(exc, Exception)
        self._force_close(exc)

    def _call_protocol(self, callback: str) -> None:
        """Call a flow-control callback; one that raises is reported, the connection goes on."""
        try:
            getattr(self._protocol, callback)()
        except BaseException as exc:
            self._report(exc, f"{callback}() raised")

    def _forked(self) -> None:
        # In a child process right after fork(): close this process's copies, nothing else.
        self._state = State.CLOSED
        self._writable = False
        self._reading = self._writer_added = False
        sock, self._sock = self._sock, None
        close_raw(self._outbox.drop())
        self._decoder.close()
        if sock is not None:
            sock.close()

    # -- extra info -------------------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Return transport information: see the class docstring for the keys."""
        return self._extra.get(name, default)

    def get_protocol(self) -> AncillaryProtocol:
        """The protocol receiving this transport's messages."""
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Switch to another [`AncillaryProtocol`][aioancillary.AncillaryProtocol]."""
        if not isinstance(protocol, AncillaryProtocol):
            raise TypeError(f"an AncillaryProtocol is required, got {type(protocol).__name__}")
        self._protocol = protocol

    # -- closing ----------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        """True once [`close`][aioancillary.AncillaryTransport.close] or
        [`abort`][aioancillary.AncillaryTransport.abort] was called, or the connection failed."""
        return self._state is not State.OPEN or self._write_failure is not None

    def close(self) -> None:
        """Stop reading, send what is queued, then close the socket and every fd held."""
        if self._state is not State.OPEN:
            return
        self._state = State.CLOSING
        self._writable = False
        self._remove_reader()
        if not self._outbox:
            self._schedule_connection_lost(None)

    def abort(self) -> None:
        """Close at once: queued messages are dropped and their fds closed."""
        self._force_close(None)

    def _fatal_error(self, exc: Exception) -> None:
        if not isinstance(exc, (OSError, AncillaryError)):
            self._loop.call_exception_handler(
                {
                    "message": "fatal error on aioancillary transport",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._force_close(exc)

    def _force_close(self, exc: Exception | None) -> None:
        if self._state is State.CLOSED:
            return
        if exc is not None and self._exc is None:
            self._exc = exc
        self._state = State.CLOSED
        self._writable = False
        self._remove_reader()
        self._remove_writer()
        self._drop_queue()
        self._schedule_connection_lost(exc)

    def _schedule_connection_lost(self, exc: Exception | None) -> None:
        if self._loop.is_closed():
            self._call_connection_lost(exc)  # nothing will run later: close the socket now
        else:
            self._loop.call_soon(self._call_connection_lost, exc)

    def _drop_queue(self) -> None:
        """Empty the queue: what never left goes back to the protocol, the rest is closed."""
        outbox = self._outbox
        unsent = outbox.take_unsent() if outbox else []
        close_raw(outbox.drop())  # partly sent: its fds already left, only the bytes are lost
        if not unsent:
            return
        messages = [new_message(data, fds or None) for data, fds in unsent]
        handler = getattr(self._protocol, "messages_unsent", None)
        if handler is None:
            for msg in messages:
                msg.close()
            return
        try:
            handler(messages)
        except BaseException as exc:
            for msg in messages:
                msg.close()  # a handler that raised gave them up (fds it took stay its own)
            self._report(exc, "messages_unsent() raised; their fds were closed")

    def _call_connection_lost(self, exc: Exception | None) -> None:
        sock = self._sock
        if sock is None:
            return
        self._state = State.CLOSED
        self._writable = False
        self._remove_reader()
        self._remove_writer()
        self._drop_queue()
        self._decoder.close()  # incomplete frames will never be delivered
        self._sock = None
        try:
            self._protocol.connection_lost(exc)
        except BaseException as error:
            self._report(error, "connection_lost() raised")
        finally:
            sock.close()
            on_closed, self._on_closed = self._on_closed, None
            if on_closed is not None:
                on_closed(exc)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            self._sock = None
            with contextlib.suppress(AttributeError):  # __init__ may have failed half-way
                close_raw(self._outbox.drop())
                self._decoder.close()
            sock.close()  # before warning: with warnings turned into errors, warn() raises
            _warn(f"unclosed AncillaryTransport {self!r}", ResourceWarning, source=self)

    def __repr__(self) -> str:
        return f"<AncillaryTransport fd={self._fileno} {self._mode.value} {self._state.value}>"
