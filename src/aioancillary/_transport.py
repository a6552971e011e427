"""An asyncio transport that carries fds: readiness callbacks driving ``recvmsg``/``sendmsg``.

asyncio's own transports (and uvloop's) hide their socket and read with ``recv()``: ancillary
data cannot pass through them. This transport owns a non-blocking AF_UNIX socket and drives it
with the loop's public ``add_reader``/``add_writer`` only, so it runs unchanged on uvloop.

It is glue between three sans-I/O parts and the loop: the syscall layer (:mod:`._syscalls`)
moves bytes and fds; a decoder (:mod:`._framing`, one per :class:`Mode`) turns each read into
messages; the :class:`Outbox` (:mod:`._outbox`) holds what waits for the socket and decides
what goes out together. The transport's own state is one :class:`State` value plus the
registrations it holds with the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import mmap
import os
import socket
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from . import _fork
from ._errors import AncillaryError, ConnectionClosedError, InvalidFdError
from ._fd import FD_MAX, FdLike, close_raw
from ._framing import DEFAULT_MAX_FRAME_SIZE, Decoder, FrameDecoder, Mode, ReadDecoder
from ._message import AncillaryMessage, new_message
from ._outbox import (
    Outbox,
    Payload,
    borrowed_fds,
    check_message,
    check_open,
    payload_of,
    release_handed_over,
    take_over,
)
from ._peercred import peer_credentials
from ._platform import SCM_MAX_FD, Platform, current_platform
from ._protocol import AncillaryProtocol
from ._syscalls import peek_is_eof, receive_into, rights, translate_send_error

if TYPE_CHECKING:
    from ._server import AncillaryServer

__all__ = ["AncillaryTransport", "mode_of"]

_READ_CHUNK = 256 * 1024  # stream read buffer: holds many small frames per recvmsg
_MAX_READS_PER_CALLBACK = 32  # bounds one callback so other connections get their turn
_DELIVER_EVERY = 64  # messages handed to the protocol per call, at most, while reading on
_FRAMED_HIGH_WATER = 64 * 1024
# sendmsg errors meaning the peer has gone: its last messages may still be ours to read.
_PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})
_SEQUENCES = (list, tuple)
_NO_FDS: list[int] = []
_dup = os.dup  # the copy is non-inheritable (CLOEXEC), as every fd this library holds


class State(enum.Enum):
    """Where a transport is in its life."""

    #: Reading and writing.
    OPEN = "open"
    #: :meth:`AncillaryTransport.close` was called: queued messages are still being sent,
    #: nothing more is read or accepted for sending.
    CLOSING = "closing"
    #: The socket is closed (or about to be, with ``connection_lost`` scheduled).
    CLOSED = "closed"


def mode_of(sock_type: int, framed: bool | None) -> Mode:
    """The :class:`Mode` of a socket type with the ``framed`` option (default: framed streams)."""
    if sock_type == socket.SOCK_STREAM:
        return Mode.RAW if framed is False else Mode.FRAMED
    return Mode.DATAGRAM


class AncillaryTransport(asyncio.Transport):
    """A transport over a connected AF_UNIX socket whose writes can carry fds.

    Created by :func:`open_unix_connection`, :func:`start_unix_server`,
    :func:`create_unix_connection`, :func:`create_unix_server` and :func:`connection_pair`. It
    implements the :class:`asyncio.Transport` interface (``write``, ``writelines``,
    ``write_eof``, ``close``, ``abort``, ``pause_reading``/``resume_reading``, write-buffer
    limits) plus :meth:`write_fds` and :meth:`write_batch`; its protocol is an
    :class:`AncillaryProtocol`.

    ``get_extra_info`` knows ``"socket"``, ``"sockname"``, ``"peername"``, ``"peercred"`` (a
    :class:`Credentials` of the peer process, or ``None``), ``"framed"`` and ``"socket_type"``.

    Sending: on a framed stream the first message of a loop iteration goes out at once and the
    next ones are merged into one ``sendmsg`` (up to ``max_fds_per_send`` fds). Unframed
    sockets (raw streams, seqpacket, datagrams) send every message at once while the kernel
    takes them; their write-buffer high watermark defaults to 0, so that as soon as the kernel
    pushes back the protocol is paused (an :class:`AncillaryConnection` then waits in
    ``send_fds`` instead of queueing a duplicate of every fd).
    """

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
        server: AncillaryServer | None = None,
    ) -> None:
        """Wrap the connected ``sock`` (made non-blocking) and start reading.

        ``protocol.connection_made`` is called before this returns.

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
            server: The server that accepted this connection (it waits for it on close).
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
        self._server = server
        self._type = sock.type
        self._mode = mode = mode_of(sock.type, framed)
        self._max_message_size = max_message_size
        self._fd_cap = cap
        # Fixed where the kernel cap is (Linux, BSD); 0 makes every read query RLIMIT (macOS).
        self._ancbufsize = platform.receive_ancbufsize() if platform.scm_max_fd else 0
        self._decoder: Decoder = (
            FrameDecoder(
                max_frame_size=max_message_size,
                max_fds_per_frame=platform.scm_max_fd or SCM_MAX_FD,
                # One recvmsg returns the fds of at most one sendmsg, and a conforming sender
                # puts every header of a batch after that batch's first byte: after a feed,
                # no more than one sendmsg's fds can be waiting for their header.
                max_pending_fds=platform.scm_max_fd or SCM_MAX_FD,
            )
            if mode is Mode.FRAMED
            else ReadDecoder()
        )
        rsize = _READ_CHUNK if sock.type == socket.SOCK_STREAM else max_message_size
        # Anonymous mmap rather than bytearray: pages become resident only when a read fills
        # them, so hundreds of idle connections with 1 MiB message buffers cost little memory.
        self._rbuf = mmap.mmap(-1, rsize)
        self._rview = memoryview(self._rbuf)
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
        self._outbox = Outbox(mode, cap)
        self._high = _FRAMED_HIGH_WATER if mode is Mode.FRAMED else 0
        self._low = self._high // 4
        # Queued fds are open duplicates counting against RLIMIT_NOFILE: pause on them too.
        self._fd_high = 2 * cap
        self._fd_low = self._fd_high // 4
        self._writer_added = False
        self._flush_scheduled = False
        self._protocol_paused = False
        self._eof_requested = False
        self._write_failure: Exception | None = None  # why writing stopped (peer gone)
        # state
        self._state = State.OPEN
        self._exc: Exception | None = None  # what made the connection fail, if anything
        self._reading = False
        self._read_paused = False
        self._pid = _fork.track(self)
        if server is not None:
            server._attach(self)
        protocol.connection_made(self)
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

    def _forked(self) -> None:
        # In a child process right after fork(): close this process's copies, nothing else.
        self._state = State.CLOSED
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
        """Switch to another :class:`AncillaryProtocol`."""
        if not isinstance(protocol, AncillaryProtocol):
            raise TypeError(f"an AncillaryProtocol is required, got {type(protocol).__name__}")
        self._protocol = protocol

    # -- reading ----------------------------------------------------------------------------------

    def is_reading(self) -> bool:
        """True while the transport reads from the socket."""
        return self._reading

    def pause_reading(self) -> None:
        """Stop reading until :meth:`resume_reading` (messages stay in the kernel's queue)."""
        self._read_paused = True
        self._remove_reader()

    def resume_reading(self) -> None:
        """Resume reading after :meth:`pause_reading`."""
        self._read_paused = False
        if self._state is State.OPEN:
            self._add_reader()

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        self._outbox.end_burst()  # new input: a reply to it may go out at once
        decoder = self._decoder
        for _ in range(_MAX_READS_PER_CALLBACK):
            try:
                nbytes, fds, ancillary = receive_into(
                    sock, self._rview, 0, self._platform, self._ancbufsize
                )
            except (BlockingIOError, InterruptedError):
                return
            except (AncillaryError, OSError) as exc:
                self._fatal_error(exc)  # receive_into closed every fd of the faulty message
                return
            if not nbytes and not fds and self._at_eof(sock, ancillary):
                self._on_eof()
                return
            messages = decoder.feed(self._rview[:nbytes].tobytes(), fds)
            if messages:
                self._protocol.messages_received(messages)
            if decoder.failure is not None:
                self._fatal_error(decoder.failure)
                return
            if messages:
                # Hand over what the first read brought before reading on, so that a reply
                # goes out first; reading on to EAGAIN still happens in this loop iteration
                # (never left to the poller: libuv stops polling a socket that reported an
                # error after one callback, so a read left for later may never come).
                if self._reading:
                    self._loop.call_soon(self._read_on)
                return
            if not self._reading:
                return
        self._loop.call_soon(self._read_on)

    def _read_on(self) -> None:
        """Read until the socket would block (bounded), handing messages over in groups."""
        sock = self._sock
        if sock is None or not self._reading:
            return
        rview = self._rview
        platform = self._platform
        ancbufsize = self._ancbufsize
        decoder = self._decoder
        fd_cap = self._fd_cap
        batch: list[AncillaryMessage] = []
        nfds = 0
        failure: Exception | None = None
        eof = False
        for _ in range(_MAX_READS_PER_CALLBACK):
            try:
                nbytes, fds, ancillary = receive_into(sock, rview, 0, platform, ancbufsize)
            except (BlockingIOError, InterruptedError):
                break
            except (AncillaryError, OSError) as exc:
                failure = exc  # receive_into closed every fd of the faulty message
                break
            if not nbytes and not fds and self._at_eof(sock, ancillary):
                eof = True
                break
            messages = decoder.feed(rview[:nbytes].tobytes(), fds)
            if decoder.failure is not None:
                batch += messages
                failure = decoder.failure
                break
            if batch:
                batch += messages
            else:
                batch = messages
            nfds += len(fds)
            if len(batch) >= _DELIVER_EVERY or nfds >= fd_cap:
                self._protocol.messages_received(batch)
                batch = []
                nfds = 0
                if not self._reading:
                    return
        else:
            self._loop.call_soon(self._read_on)
        if batch:
            self._protocol.messages_received(batch)
        if failure is not None:
            self._fatal_error(failure)
        elif eof and self._sock is not None:
            self._on_eof()

    def _at_eof(self, sock: socket.socket, ancillary: bool) -> bool:
        """After a read of 0 bytes and no fds: end of stream, or an empty message?"""
        kind = self._type
        if kind == socket.SOCK_STREAM:
            return True
        if kind == socket.SOCK_DGRAM or (ancillary and self._passcred):
            return False  # datagrams have no end of stream; credentials mean a message
        # SOCK_SEQPACKET: with SO_PASSCRED, no credentials record means end of stream.
        return self._passcred or peek_is_eof(sock)

    def _on_eof(self) -> None:
        self._remove_reader()
        decoder = self._decoder
        decoder.eof()
        if decoder.failure is not None:
            self._fatal_error(decoder.failure)
            return
        keep_open = self._protocol.eof_received()
        if not keep_open or self._write_failure is not None:
            self.close()  # nothing more to read, and (if the peer is gone) nothing to write

    def get_read_pending_fds(self) -> int:
        """Fds read from the socket but not yet part of a delivered message (framed mode)."""
        return self._decoder.pending_fds

    def get_read_buffer_size(self) -> int:
        """Bytes of an incomplete message held until the rest arrives (framed mode).

        At most ``max_message_size`` plus a frame header: what a peer that stops sending in
        the middle of a frame makes this side hold.
        """
        return self._decoder.buffered_bytes

    # -- writing ----------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` (one message in framed/seqpacket/dgram mode) for sending."""
        self.write_fds(data, ())

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Write each item (one message each in framed mode), all or nothing."""
        self.write_batch([(data, ()) for data in list_of_data])

    def write_fds(
        self,
        data: bytes | bytearray | memoryview,
        fds: Iterable[FdLike] = (),
        *,
        close_fds: bool = False,
    ) -> None:
        """Queue ``data`` with ``fds`` for sending; the fds arrive with this message.

        Everything is checked before anything is queued or sent, so a refused call leaves the
        connection as it was. ``data`` may be any bytes-like object (its size in bytes is what
        is sent). The fds are borrowed: the transport keeps its own duplicates of queued ones,
        so the caller may close its fds as soon as this returns. With ``close_fds=True`` the
        transport instead takes ownership of ``OwnedFd``, ``socket.socket`` or ``int`` items
        (no duplicate is made) and closes them once sent, or on any refusal.

        Raises:
            ConnectionClosedError: the transport is closing or closed, or failed (chained
                from the cause).
            TypeError: ``data`` is not bytes-like; an fd item is not an int or an object with
                ``fileno()`` (with ``close_fds=True``: not an OwnedFd, socket or int).
            TooManyFdsError: more fds than one message may carry (``max_fds_per_send``).
            InvalidFdError: an fd is not open, negative or out of range.
            MessageTooLargeError: the message is larger than ``max_message_size`` (framed),
                or than the kernel takes in one datagram (seqpacket/dgram).
            FdsInFlightError: the kernel refused more fds in flight (ETOOMANYREFS).
            ValueError: fds with no data on a raw stream; the same fd twice with
                ``close_fds=True``.
        """
        if self._state is not State.OPEN or self._eof_requested or self._write_failure:
            if close_fds:
                release_handed_over(fds)
            raise self._closed_error()
        if close_fds:
            nums = take_over(fds)  # on refusal, every fd handed over is already closed
            try:
                payload = payload_of(data)
                self._check(len(payload), len(nums))
            except BaseException:
                close_raw(nums)
                raise
        else:
            kind = type(data)
            payload = data if kind is bytes else payload_of(data)
            if not fds:
                nums = _NO_FDS
            elif type(fds) in _SEQUENCES and len(fds) == 1:  # type: ignore[arg-type]
                fd = fds[0]  # type: ignore[index]
                nums = [fd] if type(fd) is int and 0 <= fd <= FD_MAX else borrowed_fds(fds)
            else:
                nums = borrowed_fds(fds)
            size = len(payload)
            if len(nums) > self._fd_cap or size > self._size_limit or not size:
                self._check(size, len(nums))
        if self._outbox.sendable_now():
            self._send_now(payload, nums, close_fds)
        else:
            self._queue(payload, nums, close_fds)
        if not self._protocol_paused and (
            self._outbox.nbytes > self._high or self._outbox.nfds > self._fd_high
        ):
            self._pause_protocol()

    def write_batch(
        self,
        messages: Iterable[tuple[bytes | bytearray | memoryview, Iterable[FdLike]]],
        *,
        close_fds: bool = False,
    ) -> None:
        """Queue several messages, each with its own fds, in as few ``sendmsg`` as possible.

        The batch is checked as a whole before anything is queued or sent: if any message is
        refused, none is sent (and with ``close_fds=True`` every fd of every message is
        closed). On a framed stream the messages share ``sendmsg`` calls up to
        ``max_fds_per_send`` fds each; an unframed stream gives every fd-carrying message its
        own; seqpacket and datagram sockets send one message per call. The peer receives them
        as separate messages, in order.

        Example::

            transport.write_batch([(b"a", [fd_a]), (b"b", [fd_b, fd_c]), (b"no fds", [])])

        Raises:
            The same errors as :meth:`write_fds`, for any message of the batch.
        """
        items = list(messages)
        if self._state is not State.OPEN or self._eof_requested or self._write_failure:
            if close_fds:
                for item in items:
                    release_handed_over(_fds_of(item))
            raise self._closed_error()
        prepared: list[tuple[Payload, list[int]]] = []
        try:
            for index, item in enumerate(items):
                if not isinstance(item, tuple) or len(item) != 2:
                    raise TypeError(
                        f"write_batch() takes (data, fds) pairs; item {index} is {item!r}"
                    )
                data, fds = item
                nums = take_over(fds) if close_fds else borrowed_fds(fds)
                prepared.append((_EMPTY, nums))
                payload = payload_of(data)
                self._check(len(payload), len(nums))
                prepared[-1] = (payload, nums)
            # A batch goes out in several sendmsg calls: a bad fd found by the kernel in a
            # later one would leave the batch half sent. Find it now.
            check_open([fd for _payload, nums in prepared for fd in nums])
        except BaseException:
            if close_fds:
                close_raw([fd for _payload, nums in prepared for fd in nums])
                for item in items[len(prepared) :]:
                    release_handed_over(_fds_of(item))
            raise
        start = 0
        if self._outbox.sendable_now():
            start = self._send_groups(prepared, close_fds)
        for payload, nums in prepared[start:]:
            self._queue(payload, nums, close_fds, checked=True)
        if not self._protocol_paused and (
            self._outbox.nbytes > self._high or self._outbox.nfds > self._fd_high
        ):
            self._pause_protocol()

    def _check(self, size: int, nfds: int) -> None:
        check_message(
            self._mode,
            size,
            nfds,
            fd_cap=self._fd_cap,
            max_message_size=self._max_message_size,
            datagram_limit=self._datagram_limit,
        )

    def _closed_error(self) -> ConnectionClosedError:
        failure = self._exc or self._write_failure
        if failure is not None:
            error = ConnectionClosedError(f"cannot write: the connection failed: {failure}")
            error.__cause__ = failure
            return error
        return ConnectionClosedError(
            "cannot write: the connection is closing or closed (or write_eof was called)"
        )

    def _send_now(self, payload: Payload, nums: list[int], owned: bool) -> None:
        """The direct path: one ``sendmsg`` with the caller's own fds (no duplicate)."""
        outbox = self._outbox
        buffers = outbox.frame(payload, len(nums))
        try:
            sent = self._sock.sendmsg(buffers, rights(nums))  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            # The kernel checked the fds before it found the buffer full (scm_send comes
            # first in unix_stream_sendmsg): they are open. Queue the message whole.
            self._queue(payload, nums, owned, checked=True)
            return
        except OSError as exc:
            if owned:
                close_raw(nums)
            self._raise_send_error(exc, len(nums))
        outbox.sent_directly()
        if owned:
            close_raw(nums)  # sent with the first byte: the kernel has its own references
        total = len(payload) + (len(buffers[0]) if len(buffers) == 2 else 0)
        if sent < total:
            outbox.queue_rest(b"".join(buffers)[sent:])
            self._add_writer()

    def _send_groups(self, prepared: list[tuple[Payload, list[int]]], owned: bool) -> int:
        """Send a batch directly, one ``sendmsg`` per group, while the kernel takes it all.

        Returns the index of the first message not sent (to be queued).
        """
        outbox = self._outbox
        sock = self._sock
        assert sock is not None
        start = 0
        while start < len(prepared):
            count = outbox.group_size(prepared, start)
            buffers: list[Payload] = []
            nums: list[int] = []
            for payload, fds in prepared[start : start + count]:
                buffers += outbox.frame(payload, len(fds))
                nums += fds
            try:
                sent = sock.sendmsg(buffers, rights(nums))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if owned:
                    close_raw([fd for _payload, fds in prepared[start:] for fd in fds])
                self._raise_send_error(exc, len(nums))
            outbox.sent_directly()
            if owned:
                close_raw(nums)
            start += count
            total = sum(map(len, buffers))
            if sent < total:
                outbox.queue_rest(b"".join(buffers)[sent:])
                self._add_writer()
                break
        return start

    def _queue(self, payload: Payload, nums: list[int], owned: bool, checked: bool = False) -> None:
        """Queue a message; the outbox gets fds of its own (handed over, or duplicates)."""
        if not nums:
            fds = nums
        elif owned:
            if not checked:
                try:
                    check_open(nums)
                except BaseException:
                    close_raw(nums)
                    raise
            fds = nums
        elif len(nums) == 1:
            try:
                fds = [_dup(nums[0])]
            except OSError:
                fds = _duplicates(nums)  # raises the precise error
        else:
            fds = _duplicates(nums)
        outbox = self._outbox
        outbox.queue(payload, fds)
        if self._writer_added:
            return  # the socket is full: the writer callback sends when it can
        if outbox.last_batch_full():
            self._send_queued()  # a full batch gains nothing from waiting for the flush
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _raise_send_error(self, exc: OSError, nfds: int) -> None:
        translated = translate_send_error(exc, nfds)
        if isinstance(translated, AncillaryError):
            raise translated from exc  # nothing was sent; the connection is still usable
        self._send_failed(exc)
        raise ConnectionClosedError(f"the connection failed while sending: {exc}") from exc

    def _send_failed(self, exc: Exception) -> None:
        peer_gone = isinstance(exc, OSError) and exc.errno in _PEER_GONE
        if not peer_gone or self._state is not State.OPEN:
            self._fatal_error(exc)
            return
        # The peer is gone, but what it sent before leaving may still wait in our receive
        # queue: stop writing (queued fds closed), keep reading until EOF or the reset.
        self._write_failure = exc
        self._drop_queue()
        self._remove_writer()
        if self._protocol_paused:
            self._protocol_paused = False
            self._protocol.resume_writing()  # wakes drain(), which then sees the failure

    @property
    def write_error(self) -> Exception | None:
        """Why writing stopped (the peer went away), or ``None`` while writes can go out."""
        return self._write_failure

    def end_burst(self) -> None:
        """Hint that the writer is about to wait: its next write may go out at once.

        Without the hint, on a framed stream a write that follows an earlier one in the same
        loop iteration is queued and sent by a ``call_soon`` flush, so that tight loops of
        writes are batched.
        """
        self._outbox.end_burst()

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._outbox.end_burst()
        if self._outbox and not self._writer_added:
            self._send_queued()

    def _send_queued(self) -> None:
        sock = self._sock
        outbox = self._outbox
        while outbox and sock is not None:
            view, fds = outbox.pending()
            size = len(view)
            try:
                sent = sock.sendmsg([view], rights(fds))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE and self._mode is Mode.DATAGRAM:
                    # SO_SNDBUF shrank after the message was queued: drop that message only.
                    view.release()
                    close_raw(outbox.discard_first())
                    self._loop.call_exception_handler(
                        {
                            "message": "aioancillary dropped a queued message the kernel "
                            f"refused as too large ({size} bytes)",
                            "exception": translate_send_error(exc, len(fds)),
                            "transport": self,
                        }
                    )
                    continue
                view.release()
                self._send_failed(translate_send_error(exc, len(fds)))
                return
            view.release()  # the batch's bytearray may grow again
            gone = outbox.advance(sent)
            if gone:
                close_raw(gone)  # sent: the kernel holds its own references
            if sent < size and self._mode is not Mode.DATAGRAM:
                break  # partial write: the socket is full
        if outbox:
            self._add_writer()
        else:
            self._remove_writer()
            if self._state is State.CLOSING:
                self._call_connection_lost(None)
            elif self._eof_requested and sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
        if (
            self._protocol_paused
            and outbox.nbytes <= self._low
            and outbox.nfds <= self._fd_low
            and self._state is not State.CLOSED
        ):
            self._protocol_paused = False
            self._protocol.resume_writing()

    def _pause_protocol(self) -> None:
        self._protocol_paused = True
        self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        """True on stream and seqpacket sockets."""
        return self._type != socket.SOCK_DGRAM

    def write_eof(self) -> None:
        """Shut down the sending side once everything queued has been sent."""
        if self._state is not State.OPEN or self._eof_requested:
            return
        self._eof_requested = True
        if not self._outbox and self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)

    def get_write_buffer_size(self) -> int:
        """Bytes queued and not yet sent."""
        return self._outbox.nbytes

    def get_write_buffer_fds(self) -> int:
        """Fds queued (as duplicates owned by the transport) and not yet sent."""
        return self._outbox.nfds

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """The ``(low, high)`` byte watermarks."""
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the byte watermarks for ``pause_writing``/``resume_writing``.

        Defaults: 64 KiB high on framed streams; 0 on unframed sockets (the protocol is paused
        as soon as the kernel pushes back). Writing also pauses while more than
        ``2 * max_fds_per_send`` fds are queued, since each queued fd is an open duplicate
        counting against ``RLIMIT_NOFILE``.
        """
        if high is None:
            high = _FRAMED_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high = high
        self._low = low
        if not self._protocol_paused and self._outbox.nbytes > high:
            self._pause_protocol()  # already above the new mark: writers must wait now

    # -- closing ----------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        """True once :meth:`close` or :meth:`abort` was called, or the connection failed."""
        return self._state is not State.OPEN or self._write_failure is not None

    def close(self) -> None:
        """Stop reading, send what is queued, then close the socket and every fd held."""
        if self._state is not State.OPEN:
            return
        self._state = State.CLOSING
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
        if unsent:
            messages = [new_message(data, fds or None) for data, fds in unsent]
            handler = getattr(self._protocol, "messages_unsent", None)
            if handler is None:
                for msg in messages:
                    msg.close()
            else:
                handler(messages)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        sock = self._sock
        if sock is None:
            return
        self._state = State.CLOSED
        self._remove_reader()
        self._remove_writer()
        self._drop_queue()
        self._decoder.close()  # incomplete frames will never be delivered
        self._sock = None
        try:
            self._protocol.connection_lost(exc)
        finally:
            sock.close()
            if self._server is not None:
                self._server._detach(self, exc)
                self._server = None

    def __del__(self, _warn: Any = warnings.warn) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            _warn(f"unclosed AncillaryTransport {self!r}", ResourceWarning, source=self)
            self._sock = None
            with contextlib.suppress(AttributeError):  # __init__ may have failed half-way
                close_raw(self._outbox.drop())
                self._decoder.close()
            sock.close()

    def __repr__(self) -> str:
        return f"<AncillaryTransport fd={self._fileno} {self._mode.value} {self._state.value}>"


_EMPTY = b""


def _fds_of(item: object) -> Iterable[Any]:
    """The fds of a ``(data, fds)`` item given to ``write_batch``, or nothing if malformed."""
    if isinstance(item, tuple) and len(item) == 2:
        fds = item[1]
        if isinstance(fds, Iterable):
            return fds
    return ()


def _duplicates(nums: list[int]) -> list[int]:
    """Duplicates of the borrowed ``nums``, owned by the outbox while queued."""
    copies: list[int] = []
    try:
        for num in nums:
            copy = _dup(num)
            copies.append(copy)
            if copy in nums and len(nums) > 1:
                # dup() returns the lowest free number: if that is one of the numbers to
                # send, that entry was closed, and would otherwise send our copy instead.
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    except OSError as exc:
        close_raw(copies)  # none of them was queued
        if exc.errno == errno.EBADF:
            raise InvalidFdError(
                "cannot send: an fd in the list is not open (EBADF); nothing was queued"
            ) from exc
        raise OSError(
            exc.errno,
            f"cannot queue fds to send: duplicating one failed ({exc.strerror}); the "
            "process is probably at its RLIMIT_NOFILE. Nothing was queued",
        ) from exc
    return copies
