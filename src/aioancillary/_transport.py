"""An asyncio transport that carries fds: readiness callbacks driving ``recvmsg``/``sendmsg``.

asyncio's own transports (and uvloop's) hide their socket and read with ``recv()``: ancillary
data cannot pass through them. This transport owns a non-blocking AF_UNIX socket and drives it
with the loop's public ``add_reader``/``add_writer`` only, so it runs unchanged on uvloop.

Write path (SOCK_STREAM): the first message of a loop iteration goes out at once (round trips
stay fast); later ones are appended to a batch that goes out on a ``call_soon`` flush, or as soon
as it holds the per-message fd cap. A batch's fds ride with its first byte; after a partial
write the rest of the batch goes out without them. Queued fds are duplicates owned here, so a
caller may close its fds as soon as ``write_fds`` returns.

Read path: one readiness callback reads until the socket would block (bounded), through the one
receive path (:func:`receive_into`) into a reusable buffer, decodes frames (framed mode) and
hands each read's messages to the protocol in one call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import mmap
import os
import socket
import warnings
from collections.abc import Iterable
from typing import Any

from ._blocking import receive_into, translate_send_error
from ._errors import (
    AncillaryError,
    ConnectionClosedError,
    MessageTooLargeError,
    TooManyFdsError,
)
from ._fd import FdLike, OwnedFd, fd_number
from ._framing import _VERSION_WORD, DEFAULT_MAX_FRAME_SIZE, FrameDecoder, _pack_header
from ._message import AncillaryMessage
from ._outbox import (
    Batch,
    ancdata,
    close_given,
    close_numbers,
    duplicates,
    take_ownership,
)
from ._peercred import peer_credentials
from ._platform import SCM_MAX_FD, Platform, current_platform
from ._protocol import AncillaryProtocol

__all__ = ["AncillaryTransport"]

_READ_CHUNK = 256 * 1024  # stream read buffer: holds many small frames per recvmsg
_MAX_READS_PER_CALLBACK = 32  # bounds one callback so other connections get their turn
_DEFAULT_HIGH_WATER = 64 * 1024
_DEFAULT_FD_HIGH_WATER = 2 * SCM_MAX_FD
_NO_FDS: list[int] = []
_SEQUENCES = (list, tuple)
# sendmsg errors meaning the peer has gone: its last messages may still be ours to read.
_PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})
_dup = os.dup  # the copy is non-inheritable (CLOEXEC), as every fd this library holds


class AncillaryTransport(asyncio.Transport):
    """A transport over a connected AF_UNIX socket whose writes can carry fds.

    Created by :func:`open_unix_connection`, :func:`start_unix_server` and
    :func:`connection_pair`; use it directly only to write your own protocol. It implements
    the :class:`asyncio.Transport` interface (``write``, ``writelines``, ``write_eof``,
    ``close``, ``abort``, ``pause_reading``/``resume_reading``, write-buffer limits) plus
    :meth:`write_fds`.

    ``get_extra_info`` knows ``"socket"``, ``"sockname"``, ``"peername"``, ``"peercred"`` (a
    :class:`Credentials` of the peer process, or ``None``), ``"framed"`` and ``"socket_type"``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: AncillaryProtocol,
        *,
        framed: bool | None = None,
        max_message_size: int = DEFAULT_MAX_FRAME_SIZE,
        platform: Platform | None = None,
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
            platform: Kernel facts (default: this kernel); tests simulate others.
        """
        super().__init__()
        if sock.family != socket.AF_UNIX:
            raise ValueError(f"an AF_UNIX socket is required, got {sock.family!r}")
        sock.setblocking(False)
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._fileno = sock.fileno()
        self._protocol = protocol
        self._platform = platform or current_platform()
        self._stream = sock.type == socket.SOCK_STREAM
        self._dgram = sock.type == socket.SOCK_DGRAM
        self._seqpacket = sock.type == socket.SOCK_SEQPACKET
        self._framed = self._stream if framed is None else (framed and self._stream)
        self._max_message_size = max_message_size
        self._fd_cap = self._platform.scm_max_fd or SCM_MAX_FD
        # Fixed where the kernel cap is (Linux, BSD); 0 makes every read query RLIMIT (macOS).
        fixed = self._platform.scm_max_fd is not None
        self._ancbufsize = self._platform.receive_ancbufsize() if fixed else 0
        self._decoder = (
            FrameDecoder(
                max_frame_size=max_message_size,
                max_fds_per_frame=self._fd_cap,
                # One recvmsg returns the fds of at most one sendmsg, and a conforming sender
                # puts every header of a batch after that batch's first byte: after a feed,
                # no more than one sendmsg's fds can be waiting for their header.
                max_pending_fds=self._fd_cap,
            )
            if self._framed
            else None
        )
        rsize = _READ_CHUNK if self._stream else max_message_size
        # Anonymous mmap rather than bytearray: pages become resident only when a read fills
        # them, so hundreds of idle connections with 1 MiB message buffers cost little memory.
        self._rbuf = mmap.mmap(-1, rsize)
        self._rview = memoryview(self._rbuf)
        self._extra: dict[str, Any] = {
            "socket": sock,
            "framed": self._framed,
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
        if self._seqpacket and self._platform.name == "linux" and hasattr(socket, "SO_PASSCRED"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                self._passcred = True
        # Taken now: the credentials are fixed at connect time, and unreadable once closed.
        self._extra["peercred"] = peer_credentials(sock)
        # Linux's unix_dgram_sendmsg refuses (EMSGSIZE) a message over sk_sndbuf - 32 bytes;
        # checking before queueing keeps that error with the write that caused it.
        self._dgram_limit = max_message_size
        if not self._stream and self._platform.name == "linux":
            with contextlib.suppress(OSError):
                sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                self._dgram_limit = min(max_message_size, sndbuf - 32)
        # write side
        self._queue: collections.deque[Batch] = collections.deque()
        self._wsize = 0
        self._wfds = 0
        self._high = _DEFAULT_HIGH_WATER
        self._low = self._high // 4
        self._fd_high = _DEFAULT_FD_HIGH_WATER
        self._fd_low = self._fd_high // 4
        self._writer_added = False
        self._flush_scheduled = False
        # Set by a write that went out at once; later writes in the same burst are batched.
        # Cleared when the burst ends (the flush runs, data arrives, or the writer waits).
        self._burst = False
        self._protocol_paused = False
        self._eof_requested = False
        # state
        self._closing = False
        self._conn_lost = False
        self._exc: Exception | None = None  # what made the connection fail, if anything
        self._write_exc: Exception | None = None  # why writing stopped (peer gone)
        self._reading = False
        self._read_paused = False
        protocol.connection_made(self)
        if not self._conn_lost and not self._closing and not self._read_paused:
            self._loop.add_reader(self._fileno, self._on_readable)
            self._reading = True

    # -- extra info -----------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Return transport information: see the class docstring for the keys."""
        return self._extra.get(name, default)

    # -- reading --------------------------------------------------------------------------

    def is_reading(self) -> bool:
        """True while the transport reads from the socket."""
        return self._reading

    def pause_reading(self) -> None:
        """Stop reading until :meth:`resume_reading` (messages stay in the kernel's queue)."""
        self._read_paused = True
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fileno)

    def resume_reading(self) -> None:
        """Resume reading after :meth:`pause_reading`."""
        self._read_paused = False
        if not self._reading and not self._closing and self._sock is not None:
            self._reading = True
            self._loop.add_reader(self._fileno, self._on_readable)

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        self._burst = False  # new input: a reply to it may go out at once
        view = self._rview
        decoder = self._decoder
        platform = self._platform
        ancbufsize = self._ancbufsize
        protocol = self._protocol
        # Read until EAGAIN, never less: uvloop (libuv's uv_poll) stops watching a socket
        # that reported an error condition (a reset peer) after one callback, so a read
        # left for "the next callback" may never come.
        for _ in range(_MAX_READS_PER_CALLBACK):
            try:
                nbytes, fds, ancillary = receive_into(sock, view, 0, platform, ancbufsize)
            except (BlockingIOError, InterruptedError):
                return
            except (AncillaryError, OSError) as exc:
                # receive_into closed every fd of the faulty message before raising.
                self._fatal_error(exc)
                return
            if nbytes == 0 and not fds and self._at_eof(sock, ancillary):
                self._on_eof()
                return
            if decoder is None:
                self._read_messages(sock, view[:nbytes].tobytes(), fds)
                return
            # One copy of the chunk; each message's bytes are then a single slice of it.
            messages = decoder.feed(view[:nbytes].tobytes(), fds)
            if messages:
                protocol.messages_received(messages)
            if decoder.failure is not None:
                self._fatal_error(decoder.failure)
                return
            if not self._reading:  # the protocol paused reading, or the transport closed
                return
        # Bound reached with data still coming: yield to other callbacks, then go on (not
        # left to the poller, for the reason above).
        self._loop.call_soon(self._continue_reading)

    def _read_messages(self, sock: socket.socket, data: bytes, fds: list[OwnedFd]) -> None:
        """Unframed reads (seqpacket, dgram, raw stream): one read is one message.

        Such reads carry one small message each, so messages are handed to the protocol in
        groups (up to one message cap of fds, or 64 messages) rather than one call per read.
        """
        view = self._rview
        platform = self._platform
        ancbufsize = self._ancbufsize
        batch = [AncillaryMessage(data, tuple(fds))]
        batch_fds = len(fds)
        failure: Exception | None = None
        eof = False
        for _ in range(2 * _MAX_READS_PER_CALLBACK):
            if batch_fds >= self._fd_cap or len(batch) >= 64:
                self._protocol.messages_received(batch)
                batch = []
                batch_fds = 0
                if not self._reading:
                    return
            try:
                nbytes, fds, ancillary = receive_into(sock, view, 0, platform, ancbufsize)
            except (BlockingIOError, InterruptedError):
                break
            except (AncillaryError, OSError) as exc:
                failure = exc  # receive_into closed every fd of the faulty message
                break
            if nbytes == 0 and not fds and self._at_eof(sock, ancillary):
                eof = True
                break
            batch.append(AncillaryMessage(view[:nbytes].tobytes(), tuple(fds)))
            batch_fds += len(fds)
        else:
            self._loop.call_soon(self._continue_reading)
        if batch:
            self._protocol.messages_received(batch)
        if failure is not None:
            self._fatal_error(failure)
        elif eof and self._sock is not None:
            self._on_eof()

    def _continue_reading(self) -> None:
        if self._reading:
            self._on_readable()

    def _at_eof(self, sock: socket.socket, ancillary: bool) -> bool:
        """After a read of 0 bytes and no fds: end of stream, or an empty message?"""
        if self._dgram or (ancillary and self._passcred):
            return False  # datagrams have no end of stream; credentials mean a message
        return not self._empty_message(sock)

    def _empty_message(self, sock: socket.socket) -> bool:
        """After a 0-byte read on SOCK_SEQPACKET: was it an empty message, or end of stream?

        ``recvmsg`` returns 0 bytes for both. Where SO_PASSCRED could not tell them apart,
        peek without a control buffer (no fd is installed by a peek without one): at end of
        stream a non-blocking read returns 0 again at once, while after a message it either
        finds nothing yet (EAGAIN) or the next message's bytes. Another 0 is ambiguous (an
        empty message followed by another, or by the close) and is taken as end of stream,
        so empty messages right before the peer closes may be lost (documented).
        """
        if not self._seqpacket or self._passcred:
            return False  # with SO_PASSCRED, no credentials record means end of stream
        try:
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def _on_eof(self) -> None:
        self._remove_reader()
        decoder = self._decoder
        if decoder is not None:
            decoder.eof()
            if decoder.failure is not None:
                self._fatal_error(decoder.failure)
                return
        keep_open = self._protocol.eof_received()
        if not keep_open or self._write_exc is not None:
            self.close()  # nothing more to read, and (if the peer is gone) nothing to write

    def _remove_reader(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fileno)

    # -- writing --------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` (one message in framed/seqpacket/dgram mode) for sending."""
        self.write_fds(data, ())

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Write each item, as :meth:`write` would (one message each in framed mode)."""
        for data in list_of_data:
            self.write_fds(data, ())

    def write_fds(
        self,
        data: bytes | bytearray | memoryview,
        fds: Iterable[FdLike] = (),
        *,
        close_fds: bool = False,
    ) -> None:
        """Queue ``data`` with ``fds`` for sending; the fds arrive with this message.

        The fds are borrowed: the transport keeps its own duplicates until they are sent, so
        the caller may close its fds as soon as this returns. With ``close_fds=True`` the
        transport instead takes ownership of ``OwnedFd``, ``socket.socket`` or ``int`` items
        (no duplicate is made) and closes them once sent.

        Raises:
            ConnectionClosedError: the transport is closing or closed, or failed (chained
                from the cause).
            TooManyFdsError: more fds than one message may carry.
            InvalidFdError: an fd is not open; nothing was queued.
            MessageTooLargeError: the message is larger than ``max_message_size`` (framed),
                or than the kernel takes in one datagram (seqpacket/dgram).
            FdsInFlightError: the kernel refused more fds in flight (ETOOMANYREFS).
            ValueError: fds with no data on a raw stream; the same fd twice with
                ``close_fds=True``.
        """
        if self._closing or self._eof_requested or self._write_exc is not None:
            if close_fds:
                close_given(fds)
            failure = self._exc or self._write_exc
            if failure is not None:
                raise ConnectionClosedError(
                    f"cannot write: the connection failed: {failure}"
                ) from failure
            raise ConnectionClosedError(
                "cannot write: the connection is closing or closed (or write_eof was called)"
            )
        owned: list[int] | None = None  # fds handed over (close_fds=True): ours to close
        if close_fds:
            owned = [fd.detach() for fd in take_ownership(fds)]
            nums = owned
        elif not fds:
            nums = _NO_FDS
        elif type(fds) in _SEQUENCES and len(fds) == 1:  # type: ignore[arg-type]
            fd = fds[0]  # type: ignore[index]
            nums = [fd if type(fd) is int and fd >= 0 else fd_number(fd)]
        else:
            nums = [fd if type(fd) is int and fd >= 0 else fd_number(fd) for fd in fds]
        nfds = len(nums)
        size = len(data)
        if nfds > self._fd_cap or size > self._dgram_limit or (nfds and not size):
            try:
                self._check_message(size, nfds)
            except BaseException:
                if owned:
                    close_numbers(owned)
                raise
        if self._stream:
            self._write_stream(data, size, nums, owned)
        else:
            self._write_message(data, nums, owned)
        if not self._protocol_paused and (self._wsize > self._high or self._wfds > self._fd_high):
            self._pause_protocol()

    def _pause_protocol(self) -> None:
        self._protocol_paused = True
        self._protocol.pause_writing()

    def _check_message(self, size: int, nfds: int) -> None:
        if nfds > self._fd_cap:
            raise TooManyFdsError(
                f"one message can carry at most {self._fd_cap} fds (SCM_MAX_FD); this one has "
                f"{nfds}. Split them over several messages"
            )
        if size > self._dgram_limit and not self._stream:
            raise MessageTooLargeError(
                f"message of {size} bytes exceeds the {self._dgram_limit} bytes this "
                "socket takes in one datagram (max_message_size, or SO_SNDBUF - 32 on Linux); "
                "send smaller messages or raise SO_SNDBUF"
            )
        if size > self._max_message_size and self._framed:
            raise MessageTooLargeError(
                f"message of {size} bytes exceeds max_message_size="
                f"{self._max_message_size}; the peer would refuse it"
            )
        if nfds and not size and self._stream and not self._framed:
            raise ValueError(
                "a stream socket sends nothing, fds included, for an empty write: "
                "send at least one byte with the fds"
            )

    def _write_stream(
        self,
        data: bytes | bytearray | memoryview,
        size: int,
        nums: list[int],
        owned: list[int] | None,
    ) -> None:
        header = _pack_header(_VERSION_WORD, len(nums), size) if self._framed else b""
        queue = self._queue
        if not queue and not self._burst and self._sock is not None:
            # First message of a burst: send it now, with the caller's fds.
            try:
                sent = self._sock.sendmsg([header, data], ancdata(nums) if nums else [])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                if owned:
                    close_numbers(owned)
                self._raise_send_error(exc, len(nums))
            self._burst = True
            if sent and owned:
                close_numbers(owned)  # sent with the first byte: the kernel has its references
            if sent == len(header) + size:
                return
            if sent:
                batch = Batch((bytes(header) + bytes(data))[sent:], [])
                batch.sealed = True  # its fds went out with the part already sent
            else:
                batch = Batch(header, owned if owned is not None else duplicates(nums))
                batch.data += data
            queue.append(batch)
            self._wsize += len(batch.data)
            self._wfds += len(batch.fds)
            self._ensure_writer()
            return
        last = queue[-1] if queue else None
        if nums:
            if owned is not None:
                fds = owned
            elif len(nums) == 1:  # the common case, without the general loop
                try:
                    fds = [_dup(nums[0])]
                except OSError:
                    fds = duplicates(nums)  # raises the precise error
            else:
                fds = duplicates(nums)
            if (
                last is None
                or last.sealed
                or len(last.fds) + len(fds) > self._fd_cap
                or (not self._framed and last.data)
            ):
                # Raw mode: an fd-carrying message starts its own sendmsg, so that a peer
                # reading one message at a time gets these fds with this message's bytes.
                last = Batch(b"", [])
                queue.append(last)
            last.fds += fds
            self._wfds += len(fds)
        elif last is None:
            last = Batch(b"", [])
            queue.append(last)
        buf = last.data
        buf += header
        buf += data
        self._wsize += len(header) + size
        if self._writer_added:
            return  # the socket is full: the writer callback sends when it can
        if len(last.fds) >= self._fd_cap:
            self._send_queued()  # a full batch gains nothing from waiting for the flush
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _write_message(
        self, data: bytes | bytearray | memoryview, nums: list[int], owned: list[int] | None
    ) -> None:
        # SOCK_SEQPACKET / SOCK_DGRAM: one sendmsg per message keeps the boundaries.
        if not self._queue and self._sock is not None:
            try:
                self._sock.sendmsg([data], ancdata(nums) if nums else [])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                if owned:
                    close_numbers(owned)
                self._raise_send_error(exc, len(nums))
            else:
                if owned:
                    close_numbers(owned)
                return
        batch = Batch(data, owned if owned is not None else duplicates(nums) if nums else [])
        self._queue.append(batch)
        self._wsize += len(batch.data)
        self._wfds += len(batch.fds)
        self._ensure_writer()

    def _raise_send_error(self, exc: OSError, nfds: int) -> None:
        translated = translate_send_error(exc, nfds)
        if isinstance(translated, AncillaryError):
            raise translated from exc  # nothing was sent; the connection is still usable
        self._send_failed(exc)
        raise ConnectionClosedError(f"the connection failed while sending: {exc}") from exc

    def _send_failed(self, exc: Exception) -> None:
        if not (isinstance(exc, OSError) and exc.errno in _PEER_GONE) or self._closing:
            self._fatal_error(exc)
            return
        # The peer is gone, but what it sent before leaving may still wait in our receive
        # queue: stop writing (queued fds closed), keep reading until EOF or the reset.
        self._write_exc = exc
        self._drop_queue()
        self._remove_writer()
        if self._protocol_paused:
            self._protocol_paused = False
            self._protocol.resume_writing()  # wakes drain(), which then sees the failure

    @property
    def write_error(self) -> Exception | None:
        """Why writing stopped (the peer went away), or ``None`` while writes can go out."""
        return self._write_exc

    def end_burst(self) -> None:
        """Hint that the writer is about to wait: its next write may go out at once.

        Without the hint, a write that follows an earlier one in the same loop iteration is
        queued and sent by a ``call_soon`` flush, so that tight loops of writes are batched.
        """
        self._burst = False

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._burst = False
        if self._queue and not self._writer_added:
            self._send_queued()

    def _remove_writer(self) -> None:
        if self._writer_added:
            self._writer_added = False
            self._loop.remove_writer(self._fileno)

    def _ensure_writer(self) -> None:
        if not self._writer_added and self._sock is not None:
            self._writer_added = True
            self._loop.add_writer(self._fileno, self._send_queued)

    def _send_queued(self) -> None:
        sock = self._sock
        queue = self._queue
        stream = self._stream
        while queue and sock is not None:
            batch = queue[0]
            fds = batch.fds
            anc = ancdata(fds) if fds else []
            try:
                with memoryview(batch.data) as view:
                    sent = sock.sendmsg([view[batch.offset :]], anc)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE and not stream:
                    # SO_SNDBUF shrank after the message was queued: drop that message only.
                    queue.popleft()
                    self._wsize -= len(batch.data) - batch.offset
                    self._wfds -= len(fds)
                    close_numbers(fds)
                    self._loop.call_exception_handler(
                        {
                            "message": "aioancillary dropped a queued message the kernel "
                            f"refused as too large ({len(batch.data)} bytes)",
                            "exception": translate_send_error(exc, len(fds)),
                            "transport": self,
                        }
                    )
                    continue
                self._send_failed(translate_send_error(exc, len(fds)))
                return
            batch.sealed = True
            if fds:
                batch.fds = []
                self._wfds -= len(fds)
                close_numbers(fds)  # sent: the kernel holds its own references
            self._wsize -= sent
            batch.offset += sent
            if batch.offset >= len(batch.data) or not stream:
                queue.popleft()
            else:
                break  # partial write: the socket is full
        if queue:
            self._ensure_writer()
        else:
            self._remove_writer()
            if self._closing:
                self._call_connection_lost(None)
            elif self._eof_requested and sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
        if (
            self._protocol_paused
            and self._wsize <= self._low
            and self._wfds <= self._fd_low
            and not self._conn_lost
        ):
            self._protocol_paused = False
            self._protocol.resume_writing()

    def can_write_eof(self) -> bool:
        """True on stream and seqpacket sockets."""
        return self._sock is not None and self._sock.type != socket.SOCK_DGRAM

    def write_eof(self) -> None:
        """Shut down the sending side once everything queued has been sent."""
        if self._closing or self._eof_requested:
            return
        self._eof_requested = True
        if not self._queue and self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)

    def get_read_pending_fds(self) -> int:
        """Fds read from the socket but not yet part of a delivered message (framed mode)."""
        return 0 if self._decoder is None else self._decoder.pending_fds

    def get_write_buffer_size(self) -> int:
        """Bytes queued and not yet sent."""
        return self._wsize

    def get_write_buffer_fds(self) -> int:
        """Fds queued (as duplicates owned by the transport) and not yet sent."""
        return self._wfds

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """The ``(low, high)`` byte watermarks."""
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the byte watermarks for ``pause_writing``/``resume_writing``.

        Writing also pauses while more than ``2 * SCM_MAX_FD`` fds are queued, since each
        queued fd is an open duplicate counting against ``RLIMIT_NOFILE``.
        """
        if high is None:
            high = _DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high = high
        self._low = low
        if not self._protocol_paused and self._wsize > high:
            self._pause_protocol()  # already above the new mark: writers must wait now

    # -- closing --------------------------------------------------------------------------

    def is_closing(self) -> bool:
        """True once :meth:`close` or :meth:`abort` was called, or the connection failed."""
        return self._closing or self._write_exc is not None

    def close(self) -> None:
        """Stop reading, send what is queued, then close the socket and every fd held."""
        if self._closing:
            return
        self._closing = True
        self._remove_reader()
        if not self._queue:
            self._loop.call_soon(self._call_connection_lost, None)

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
        if self._conn_lost:
            return
        if exc is not None and self._exc is None:
            self._exc = exc
        self._drop_queue()
        self._remove_writer()
        if not self._closing:
            self._closing = True
            self._remove_reader()
        self._conn_lost = True
        self._loop.call_soon(self._call_connection_lost, exc)

    def _drop_queue(self) -> None:
        for batch in self._queue:
            close_numbers(batch.fds)  # never sent: the duplicates are ours to close
        self._queue.clear()
        self._wsize = 0
        self._wfds = 0

    def _call_connection_lost(self, exc: Exception | None) -> None:
        if self._sock is None:
            return
        self._conn_lost = True
        self._remove_reader()
        self._remove_writer()
        self._drop_queue()
        if self._decoder is not None:
            self._decoder.close()  # incomplete frames will never be delivered
        sock, self._sock = self._sock, None
        try:
            self._protocol.connection_lost(exc)
        finally:
            sock.close()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        sock = getattr(self, "_sock", None)
        if sock is not None:
            _warn(f"unclosed AncillaryTransport {self!r}", ResourceWarning, source=self)
            self._sock = None
            for batch in self._queue:
                close_numbers(batch.fds)
            if self._decoder is not None:
                self._decoder.close()
            sock.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else ("closing" if self._closing else "open")
        kind = "framed" if self._framed else ("stream" if self._stream else "message")
        return f"<AncillaryTransport fd={self._fileno} {kind} {state}>"
