"""The transport's write-side flow control: the watermarks that pause and resume the protocol,
and the end of the sending side (``write_eof``)."""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING

from .._core._outbox import Outbox

__all__ = ["FRAMED_HIGH_WATER", "WriteFlow"]

#: Default byte high watermark of a framed stream (unframed ones pause at once: 0).
FRAMED_HIGH_WATER = 64 * 1024


class WriteFlow:
    """Flow control for [`AncillaryTransport`][aioancillary.AncillaryTransport]'s writes (a
    mixin: the state lives in the transport).

    Writing pauses the protocol above the byte high watermark, or while more fds than
    ``2 * max_fds_per_send`` are queued (each an open duplicate counting against
    ``RLIMIT_NOFILE``), and resumes it once the queue is below both low marks.
    """

    if not TYPE_CHECKING:  # mypy would refuse assignments to attributes no mixin slot names
        __slots__ = ()  # the transport declares the state, in its own __slots__

    _sock: socket.socket | None
    _type: int
    _outbox: Outbox
    _high: int
    _low: int
    _fd_high: int
    _protocol_paused: bool
    _eof_requested: bool
    _writable: bool | None  # see WriteSide

    if TYPE_CHECKING:

        def _is_open(self) -> bool: ...
        def _call_protocol(self, callback: str) -> None: ...

    def _check_pause(self) -> None:
        outbox = self._outbox
        if not self._protocol_paused and (
            outbox.nbytes > self._high or outbox.nfds > self._fd_high
        ):
            self._pause_protocol()

    def _pause_protocol(self) -> None:
        self._protocol_paused = True
        self._call_protocol("pause_writing")

    def can_write_eof(self) -> bool:
        """True on stream and seqpacket sockets."""
        return self._type != socket.SOCK_DGRAM

    def write_eof(self) -> None:
        """Shut down the sending side once everything queued has been sent."""
        if not self._is_open() or self._eof_requested:
            return
        self._eof_requested = True
        self._writable = False
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
            high = FRAMED_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high = high
        self._low = low
        if not self._protocol_paused and self._outbox.nbytes > high:
            self._pause_protocol()  # already above the new mark: writers must wait now
