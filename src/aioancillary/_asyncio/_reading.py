"""The transport's read side: one read loop for every mode, driven by ``add_reader``."""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

from .._core._framing import Decoder
from .._core._message import AncillaryMessage
from .._core._outbox import Outbox
from .._kernel._syscalls import AGAIN, END, Receiver
from ._protocol import AncillaryProtocol

__all__ = ["ReadSide"]

_MAX_READS_PER_CALLBACK = 32  # bounds one callback so other connections get their turn
_NONE: list[AncillaryMessage] = []  # never mutated


class ReadSide:
    """Reading for [`AncillaryTransport`][aioancillary.AncillaryTransport] (a mixin: the state lives
    in the transport).

    Every read goes through the syscall layer into a reusable buffer and through the mode's
    decoder; the messages of a wake-up are handed to the protocol in groups.
    """

    if not TYPE_CHECKING:  # mypy would refuse assignments to attributes no mixin slot names
        __slots__ = ()  # the transport declares the state, in its own __slots__

    _loop: asyncio.AbstractEventLoop
    _sock: socket.socket | None
    _protocol: AncillaryProtocol
    _decoder: Decoder
    _rview: memoryview
    _receiver: Receiver
    _fd_cap: int
    _reading: bool
    _read_paused: bool
    _write_failure: Exception | None

    _outbox: Outbox

    if TYPE_CHECKING:

        def _add_reader(self) -> None: ...
        def _remove_reader(self) -> None: ...
        def _fatal_error(self, exc: Exception) -> None: ...
        def _protocol_failed(self, exc: BaseException, callback: str) -> None: ...
        def _is_open(self) -> bool: ...
        def close(self) -> None: ...

    def is_reading(self) -> bool:
        """True while the transport reads from the socket."""
        return self._reading

    def pause_reading(self) -> None:
        """Stop reading until `resume_reading` (messages stay in the kernel's queue)."""
        self._read_paused = True
        self._remove_reader()

    def resume_reading(self) -> None:
        """Resume reading after `pause_reading`."""
        self._read_paused = False
        if self._is_open():
            self._add_reader()

    def get_read_pending_fds(self) -> int:
        """Fds read from the socket but not yet part of a delivered message (framed mode)."""
        return self._decoder.pending_fds

    def get_read_buffer_size(self) -> int:
        """Bytes of an incomplete message held until the rest arrives (framed mode).

        At most ``max_message_size`` plus a frame header: what a peer that stops sending in
        the middle of a frame makes this side hold.
        """
        return self._decoder.buffered_bytes

    def _on_readable(self) -> None:
        self._outbox.end_burst()  # new input: a reply to it may go out at once
        self._read(1)

    def _read(self, limit: int) -> None:
        """Read until the socket would block, handing messages over; at most ``limit`` reads.

        A wake-up reads once and hands that read's messages over at once, then reads on in a
        ``call_soon`` callback, so that a reply to them goes out before this side reads on.
        Reading on to EAGAIN is never left to the poller: libuv (uvloop) stops polling a
        socket that reported an error after one callback, so a read left for later may never
        come.
        """
        if self._sock is None or not self._reading:
            return
        decoder = self._decoder
        while True:
            reads, how, error = self._receiver.read(limit, self._fd_cap)
            # The decoder owns every fd of these reads from here, whatever happens.
            messages = decoder.feed_reads(reads) if reads else _NONE
            if messages:
                try:
                    self._protocol.messages_received(messages)
                except BaseException as exc:
                    for msg in messages:
                        # The callback gave up the messages it was handed: whatever
                        # references it kept, no fd of theirs stays open.
                        msg.close()
                    self._protocol_failed(exc, "messages_received")
                    return
            if decoder.failure is not None:
                self._fatal_error(decoder.failure)
                return
            if error is not None:
                self._fatal_error(error)  # receive_many closed the fds of the failed read
                return
            if how == END:
                if self._sock is not None:
                    self._on_eof()
                return
            if how == AGAIN or not self._reading:
                return
            if messages or limit > 1:
                # A wake-up's first messages are out: read on after whatever they trigger;
                # or the bound was reached: let other callbacks run, then go on.
                self._loop.call_soon(self._read, _MAX_READS_PER_CALLBACK)
                return
            limit = _MAX_READS_PER_CALLBACK  # the first read completed no message: go on

    def _on_eof(self) -> None:
        self._remove_reader()
        decoder = self._decoder
        decoder.eof()
        if decoder.failure is not None:
            self._fatal_error(decoder.failure)
            return
        try:
            keep_open = self._protocol.eof_received()
        except BaseException as exc:
            self._protocol_failed(exc, "eof_received")
            return
        if not keep_open or self._write_failure is not None:
            self.close()  # nothing more to read, and (if the peer is gone) nothing to write
