"""The transport's write side: the direct path, the queue (an `Outbox`), the writer."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .._core._cmsg import rights
from .._core._errors import AncillaryError, ConnectionClosedError
from .._core._fd import FD_MAX, FdLike, close_raw
from .._core._framing import Mode, encode_header
from .._core._outbox import (
    Outbox,
    Payload,
    borrowed_fds,
    check_message,
    check_open,
    payload_of,
    release_handed_over,
    take_over,
)
from .._kernel._syscalls import duplicates as _duplicates
from .._kernel._syscalls import translate_send_error
from ._protocol import AncillaryProtocol

if TYPE_CHECKING:
    from .._kernel._speedups import Outbox as COutbox

__all__ = ["WriteSide"]

# sendmsg errors meaning the peer has gone: its last messages may still be ours to read.
_PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN})
_SEQUENCES = (list, tuple)
_NO_FDS: list[int] = []
_dup = os.dup  # the copy is non-inheritable (CLOEXEC), as every fd this library holds
_EMPTY = b""
# What the C outbox's write() asks for next (_speedups_send.c): 0 is "sent, nothing to do".
_DECLINED = -1  # try_write only: an input for the full checks, nothing done
_QUEUED = 1
_FULL = 2
_PARTIAL = 3


class WriteSide:
    """Writing for [`AncillaryTransport`][aioancillary.AncillaryTransport] (a mixin: the state lives
    in the transport).

    A message goes out in the caller's own ``sendmsg`` when nothing is queued (and, on a framed
    stream, no burst is running); otherwise it joins the `Outbox` with fds of the
    outbox's own (duplicates, or the fds handed over), and the writer callback or a
    ``call_soon`` flush sends the queue.
    """

    if not TYPE_CHECKING:  # mypy would refuse assignments to attributes no mixin slot names
        __slots__ = ()  # the transport declares the state, in its own __slots__

    _loop: asyncio.AbstractEventLoop
    _sock: socket.socket | None
    _protocol: AncillaryProtocol
    _mode: Mode
    _framed: bool
    _type: int
    _outbox: Outbox
    _csend: COutbox | None  # the same outbox when it is the C one (_accel), else None
    _fileno: int
    _fd_cap: int
    _max_message_size: int
    _datagram_limit: int
    _size_limit: int
    _high: int
    _low: int
    _fd_high: int
    _fd_low: int
    _writer_added: bool
    _flush_scheduled: bool
    _protocol_paused: bool
    _eof_requested: bool
    _write_failure: Exception | None
    _exc: Exception | None
    # Open, no write_eof, no write failure: True on the pure path, None on the C path (falsy:
    # the pure path's hot test, `not _writable`, lets it through), False once writing stopped.
    _writable: bool | None

    if TYPE_CHECKING:

        def _add_writer(self) -> None: ...
        def _remove_writer(self) -> None: ...
        def _fatal_error(self, exc: Exception) -> None: ...
        def _is_open(self) -> bool: ...
        def _is_closing_down(self) -> bool: ...
        def _call_connection_lost(self, exc: Exception | None) -> None: ...
        def _drop_queue(self) -> None: ...
        def _call_protocol(self, callback: str) -> None: ...
        def _check_pause(self) -> None: ...
        def _pause_protocol(self) -> None: ...

    # -- the public write API ----------------------------------------------------------------------

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
        if close_fds or not self._writable:
            # The pure path's one test: everything else (handed-over fds, a transport that
            # cannot write, the C path, whose _writable is None) starts here.
            if self._writable is None and not close_fds:
                # The C path: the checks of the common shapes, then the direct sendmsg or
                # copies of the fds queued with the message, in one call; what is left to do
                # (schedule the flush, or the full checks of an unusual input) comes back as
                # a code.
                csend = self._csend
                assert csend is not None
                code = csend.try_write(self._fileno, data, fds)
                if code and (code != _QUEUED or not self._flush_scheduled):
                    self._after_write(csend, code, data, fds)
                if not self._protocol_paused and (
                    csend.nbytes > self._high or csend.nfds > self._fd_high
                ):
                    self._pause_protocol()
                return
            self._write_handed_over(data, fds, close_fds)
            return
        outbox = self._outbox
        # The hot path of every sender: borrowed fds, checked inline for the common shapes.
        payload = data if type(data) is bytes else payload_of(data)
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
        if outbox.direct:
            # The direct path, inline: one sendmsg with the caller's own fds (no duplicate).
            if self._framed:
                buffers: list[Payload] = [encode_header(len(nums), size), payload]
                total = size + 8
            else:
                buffers = [payload]
                total = size
            try:
                sent = self._sock.sendmsg(buffers, rights(nums))  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                # The kernel checked the fds before it found the buffer full (scm_send comes
                # first in unix_stream_sendmsg): they are open. Queue the message whole.
                self._queue(payload, nums, owned=False, checked=True)
            except OSError as exc:
                self._raise_send_error(exc, len(nums))
            else:
                if self._framed:
                    outbox.sent_directly()
                if sent < total:
                    outbox.queue_rest(b"".join(buffers)[sent:])
                    self._add_writer()
        else:
            self._queue(payload, nums)  # borrowed fds (positional: see _queue)
        if not self._protocol_paused and (
            outbox.nbytes > self._high or outbox.nfds > self._fd_high
        ):
            self._pause_protocol()

    def _after_write(self, csend: COutbox, code: int | OSError, data: Any, fds: Any) -> None:
        """What the C path's ``try_write`` left to do: the full checks of an input it declined,
        a failure to report, or the queue to get sent."""
        if code == _DECLINED:
            payload = payload_of(data)
            nums = borrowed_fds(fds) if fds else _NO_FDS  # as the pure path's checks
            self._check(len(payload), len(nums))
            code = csend.write(self._fileno, payload, nums)
            if not code or (code == _QUEUED and self._flush_scheduled):
                return
        else:
            nums = fds  # a list or tuple: try_write took it as it is
        if isinstance(code, OSError):
            self._raise_send_error(code, len(nums))
        elif code == _PARTIAL:
            self._add_writer()
        elif self._writer_added:
            return  # the socket is full: the writer callback sends when it can
        elif code == _FULL:
            self._send_queued()  # a full batch gains nothing from waiting for the flush
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _write_handed_over(self, data: Any, fds: Iterable[Any], close_fds: bool) -> None:
        """``write_fds`` when the fds are handed over, or when the transport cannot write."""
        if self._writable is False:  # None: writable, on the C path
            if close_fds:
                release_handed_over(fds)
            raise self._closed_error()
        nums = take_over(fds)  # on refusal, every fd handed over is already closed
        try:
            payload = payload_of(data)
            self._check(len(payload), len(nums))
        except BaseException:
            close_raw(nums)
            raise
        if not self._outbox.direct:
            self._queue(payload, nums, owned=True)
        elif not self._send_groups([(payload, nums)], owned=True):
            self._queue(payload, nums, owned=True, checked=True)  # EAGAIN: the kernel checked
        self._check_pause()

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
        as separate messages, in order. If the kernel refuses a later ``sendmsg`` of a batch
        outright (``ETOOMANYREFS``), the messages before it have been sent.

        Example::

            transport.write_batch([(b"a", [fd_a]), (b"b", [fd_b, fd_c]), (b"no fds", [])])

        Raises the same errors as `write_fds`, for any message of the batch.
        """
        items = list(messages)
        if self._writable is False:  # None: writable, on the C path
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
                prepared.append((_EMPTY, nums))  # its fds are ours to close from here
                payload = payload_of(data)
                self._check(len(payload), len(nums))
                prepared[-1] = (payload, nums)
            # A batch sent in several sendmsg calls, or queued, would meet a bad fd only when
            # half of it is out: find it now. One sendmsg needs no check: the kernel checks
            # every fd before it sends anything (scm_send), and the batch fails whole.
            outbox = self._outbox
            if prepared and (not outbox.direct or outbox.group_size(prepared, 0) < len(prepared)):
                check_open([fd for _payload, nums in prepared for fd in nums])
        except BaseException:
            if close_fds:
                close_raw([fd for _payload, nums in prepared for fd in nums])
                for item in items[len(prepared) :]:
                    release_handed_over(_fds_of(item))
            raise
        start = self._send_groups(prepared, close_fds) if self._outbox.direct else 0
        for payload, nums in prepared[start:]:
            self._queue(payload, nums, owned=close_fds, checked=True)
        self._check_pause()

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

    # -- sending at once and queueing --------------------------------------------------------------

    def _send_groups(self, prepared: list[tuple[Payload, list[int]]], owned: bool) -> int:
        """Send messages directly, one ``sendmsg`` per group, while the kernel takes them all.

        Returns the index of the first message not sent (the caller queues the rest).
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
                break  # the kernel checked the fds first (scm_send): the rest is queued whole
            except OSError as exc:
                if owned:
                    close_raw([fd for _payload, fds in prepared[start:] for fd in fds])
                self._raise_send_error(exc, len(nums))
            outbox.sent_directly()
            if owned:
                close_raw(nums)  # sent with the first byte: the kernel has its own references
            start += count
            total = sum(map(len, buffers))
            if sent < total:
                outbox.queue_rest(b"".join(buffers)[sent:])
                self._add_writer()
                break
        return start

    def _queue(
        self, payload: Payload, nums: list[int], owned: bool = False, checked: bool = False
    ) -> None:
        """Queue a message; the outbox gets fds of its own (handed over, or duplicates).

        ``owned`` and ``checked`` may be given by position: the pure path's burst calls this
        for every message but the first, and a call with keywords costs more in CPython.
        """
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
        full = self._outbox.queue(payload, fds)
        if self._writer_added:
            return  # the socket is full: the writer callback sends when it can
        if full:
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
        if not peer_gone or not self._is_open():
            self._fatal_error(exc)
            return
        # The peer is gone, but what it sent before leaving may still wait in our receive
        # queue: stop writing (queued fds closed), keep reading until EOF or the reset.
        self._write_failure = exc
        self._writable = False
        self._drop_queue()
        self._remove_writer()
        if self._protocol_paused:
            self._protocol_paused = False
            self._call_protocol("resume_writing")  # wakes drain(), which sees the failure

    @property
    def write_error(self) -> Exception | None:
        """Why writing stopped (the peer went away), or ``None`` while writes can go out."""
        return self._write_failure

    # -- sending the queue -------------------------------------------------------------------------

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
        csend = self._csend
        while csend is not None and outbox and sock is not None:
            # The C path: sendmsg until the queue is empty, EAGAIN or a partial write, the sent
            # fds closed there; a failure comes back with the queue as it was.
            failure = csend.flush(self._fileno)
            if failure is None:
                break
            view, fds = outbox.pending()
            size = len(view)
            view.release()
            if not self._queued_send_failed(failure, size, len(fds)):
                return
        while csend is None and outbox and sock is not None:
            view, fds = outbox.pending()
            size = len(view)
            try:
                sent = sock.sendmsg([view], rights(fds))
            except (BlockingIOError, InterruptedError):
                view.release()
                break
            except OSError as exc:
                view.release()
                if self._queued_send_failed(exc, size, len(fds)):
                    continue
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
            if self._is_closing_down():
                self._call_connection_lost(None)
            elif self._eof_requested and sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
        if (
            self._protocol_paused
            and outbox.nbytes <= self._low
            and outbox.nfds <= self._fd_low
            and self._sock is not None
        ):
            self._protocol_paused = False
            self._call_protocol("resume_writing")

    def _queued_send_failed(self, exc: OSError, size: int, nfds: int) -> bool:
        """The kernel refused the next queued ``sendmsg``; True if the rest may still go."""
        if exc.errno == errno.EMSGSIZE and self._mode is Mode.DATAGRAM:
            # SO_SNDBUF shrank after the message was queued: drop that message only.
            close_raw(self._outbox.discard_first())
            self._loop.call_exception_handler(
                {
                    "message": "aioancillary dropped a queued message the kernel "
                    f"refused as too large ({size} bytes)",
                    "exception": translate_send_error(exc, nfds),
                    "transport": self,
                }
            )
            return True
        self._send_failed(translate_send_error(exc, nfds))
        return False


def _fds_of(item: object) -> Iterable[Any]:
    """The fds of a ``(data, fds)`` item given to ``write_batch``, or nothing if malformed."""
    if isinstance(item, tuple) and len(item) == 2:
        fds = item[1]
        if isinstance(fds, Iterable):
            return fds
    return ()
