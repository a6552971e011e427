"""Sans-I/O message framing for SOCK_STREAM: keeps every message's fds with its own message.

Wire format, version 1 (see ``docs/reference/protocol.md``). Every message is one frame::

    +---------+---------+-----------------+-------------------------+---------------+
    | version |  flags  |   fd count      |   payload length        |   payload     |
    | u8 = 1  | u8 = 0  |   u16, big end. |   u32, big endian       |   length bytes|
    +---------+---------+-----------------+-------------------------+---------------+

The frame's fds travel as SCM_RIGHTS with (or before) the frame's first byte, in the same
``sendmsg`` as that byte. Linux attaches a ``sendmsg``'s fds to its first chunk and returns them
with the ``recvmsg`` that reads that chunk (``unix_stream_read_generic``), so when a frame's
header has been read in full, its fds are already in the receiver's FIFO. A frame whose fds are
not there then is a protocol violation, as are a bad version/flags, an oversized length or fd
count, and fds that no frame claims.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Callable, Sequence

from ._errors import ProtocolError
from ._fd import OwnedFd, close_raw
from ._message import AncillaryMessage, messages_of, new_message
from ._platform import SCM_MAX_FD

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAME_HEADER_SIZE",
    "Decoder",
    "FrameDecoder",
    "Mode",
    "ReadDecoder",
    "encode_header",
    "frame_header",
    "frames_of",
]


class Mode(enum.Enum):
    """How messages map onto a socket: the choice every layer above the core makes once."""

    #: SOCK_STREAM with aioancillary's framing: one frame per message, fds with its first byte.
    FRAMED = "framed"
    #: SOCK_STREAM without framing: a read is whatever the kernel returns (foreign peers).
    RAW = "raw"
    #: SOCK_SEQPACKET / SOCK_DGRAM: the kernel keeps the boundaries; one read is one message.
    DATAGRAM = "datagram"


_HEADER = struct.Struct(">HHI")
#: Bytes of framing in front of every message.
FRAME_HEADER_SIZE = _HEADER.size
_VERSION = 1
_VERSION_WORD = _VERSION << 8  # version byte 1, flags byte 0 (reserved)
#: Default cap on one message's payload in framed mode (1 MiB).
DEFAULT_MAX_FRAME_SIZE = 1 << 20
_MAX_LENGTH = 0xFFFFFFFF
_MAX_FDS_FIELD = 0xFFFF

_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack_from
_UNCLAIMED: list[int] = []  # the claim of a frame without fds (never mutated)


def frame_header(nfds: int, length: int) -> bytes:
    """Return the 8-byte frame header for a payload of ``length`` bytes carrying ``nfds`` fds.

    Raises:
        ValueError: a field does not fit the wire format.
    """
    if not 0 <= nfds <= _MAX_FDS_FIELD or not 0 <= length <= _MAX_LENGTH:
        raise ValueError(f"frame fields out of range: nfds={nfds}, length={length}")
    return _pack_header(_VERSION_WORD, nfds, length)


#: ``encode_header(nfds, length)``: `frame_header` without the range checks, for senders
#: that checked already. A partial of ``struct.pack``, so that the per-message call runs in C.
encode_header: Callable[[int, int], bytes] = functools.partial(_pack_header, _VERSION_WORD)


def frames_of(data: bytes | bytearray, fds: list[int]) -> list[tuple[bytes, list[int]]]:
    """Split well-formed frames (as this side encoded them) back into ``(payload, fds)``.

    For a sender taking back messages it queued and never sent; ``fds`` are the frames' fds in
    order. Anything after the last whole frame, and fds no frame claims, are returned as a last
    pair with the unframed remainder.
    """
    out: list[tuple[bytes, list[int]]] = []
    pos = 0
    taken = 0
    end = len(data)
    while end - pos >= FRAME_HEADER_SIZE:
        _word, nfds, length = _unpack_header(data, pos)
        start = pos + FRAME_HEADER_SIZE
        if start + length > end or taken + nfds > len(fds):
            break
        out.append((bytes(data[start : start + length]), fds[taken : taken + nfds]))
        taken += nfds
        pos = start + length
    if pos < end or taken < len(fds):
        out.append((bytes(data[pos:]), fds[taken:]))
    return out


class Decoder:
    """The interface of the per-mode decoders the transport feeds every read to.

    ``feed(data, fds)`` takes one read's bytes and the raw fds that came with it (owned by the
    decoder from the call on, whatever happens) and returns the completed messages; ``eof()``
    reports the end of the stream; ``close()`` closes every fd still held; ``failure`` is the
    [`ProtocolError`][aioancillary.ProtocolError] once the peer broke the protocol.
    """

    __slots__ = ("failure",)

    def __init__(self) -> None:
        #: The `ProtocolError` once the peer has broken the protocol, else ``None``.
        self.failure: ProtocolError | None = None

    @property
    def pending_fds(self) -> int:
        """Fds held by the decoder that belong to no completed message yet."""
        return 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete message held by the decoder."""
        return 0

    def feed(self, data: bytes, fds: list[int] | None) -> list[AncillaryMessage]:
        raise NotImplementedError

    def feed_reads(self, reads: list[tuple[bytes, list[int] | None]]) -> list[AncillaryMessage]:
        """`feed` every read in order; the decoder owns all their fds from the call on.

        Stops at a protocol failure (the fds of the reads after it are closed too).
        """
        out: list[AncillaryMessage] = []
        for index, (data, fds) in enumerate(reads):
            out += self.feed(data, fds)
            if self.failure is not None:
                for _data, later in reads[index + 1 :]:
                    if later:
                        close_raw(later)  # after a failure nothing more is read from this
                break
        return out

    def eof(self) -> None:
        """Signal the end of the stream (nothing is pending in a read-per-message decoder)."""

    def close(self) -> None:
        """Close every fd the decoder still holds."""


class ReadDecoder(Decoder):
    """One read is one message: SOCK_SEQPACKET, SOCK_DGRAM, and unframed streams.

    The unframed counterpart of [`FrameDecoder`][aioancillary.FrameDecoder], with the same
    interface, so that the transport has one read path whatever the mode.
    """

    __slots__ = ()

    def feed(self, data: bytes, fds: list[int] | None) -> list[AncillaryMessage]:
        """Return the read as one message owning ``fds``."""
        return [new_message(data, fds or None)]

    def feed_reads(self, reads: list[tuple[bytes, list[int] | None]]) -> list[AncillaryMessage]:
        """Every read as one message owning its fds (no failure is possible)."""
        return messages_of(reads)


class FrameDecoder(Decoder):
    """Turns ``(bytes, fds)`` chunks read from a stream into whole messages with their fds.

    Feed it what each ``recvmsg`` returned, in order; it returns the messages completed so far.
    Partial frames are kept for the next call. If the peer breaks the protocol, the messages decoded
    before the fault are still returned, ``failure`` is set, and
    every fd the decoder held is closed; later input is refused (its fds closed).

    Example::

        dec = FrameDecoder()
        for msg in dec.feed(data, fds):
            handle(msg)
        if dec.failure:
            raise dec.failure

    Args:
        max_frame_size: Largest payload accepted; a bigger length field is a protocol error.
        max_fds_per_frame: Largest fd count accepted in one frame.
        max_pending_fds: Most fds that may wait for their frame's header after a feed. A
            conforming sender never exceeds one ``sendmsg``'s fds (``SCM_MAX_FD``): one
            ``recvmsg`` returns the fds of at most one ``sendmsg``, and the headers those fds
            belong to follow that call's first byte. More is a protocol violation.
    """

    __slots__ = (
        "_buf",
        "_claimed",
        "_fifo",
        "_max_fds",
        "_max_pending",
        "_max_size",
        "_need",
    )

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_fds_per_frame: int = SCM_MAX_FD,
        max_pending_fds: int = SCM_MAX_FD,
    ) -> None:
        super().__init__()
        self._max_size = max_frame_size
        self._max_fds = max_fds_per_frame
        self._max_pending = max_pending_fds
        self._buf = bytearray()
        # Raw fd numbers owned by the decoder, in arrival order; a frame takes its fds from
        # the front when its header is complete.
        self._fifo: list[int] = []
        self._claimed: list[int] | None = None  # the fds of a frame whose payload is incomplete
        self._need = 0  # bytes the buffered partial frame needs before it can complete

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame held by the decoder."""
        return len(self._buf)

    @property
    def pending_fds(self) -> int:
        """Fds held by the decoder that belong to no completed message yet."""
        return len(self._fifo) + len(self._claimed or ())

    def feed(
        self, data: bytes | bytearray | memoryview, fds: Sequence[int | OwnedFd] | None
    ) -> list[AncillaryMessage]:
        """Take one chunk read from the stream and its fds; return the completed messages.

        The decoder owns ``fds`` (raw numbers, or [`OwnedFd`][aioancillary.OwnedFd] objects, which
        it detaches) from this call on. ``data`` is not kept (it may be a view of a buffer the
        caller reuses).
        """
        fifo = self._fifo
        if fds:
            if type(fds[0]) is int:
                fifo.extend(fds)  # type: ignore[arg-type]
            else:
                fifo.extend(fd if isinstance(fd, int) else fd.detach() for fd in fds)
        if self.failure is not None:
            self._discard()  # a broken stream cannot be resynchronised: refuse what follows
            return []
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                # Still inside one frame (a large one arrives over many reads): wait for the
                # rest rather than copy the growing buffer on every read.
                self._check_pending()
                return []
            view = bytes(buf)
            buf.clear()
        else:
            view = data if type(data) is bytes else bytes(data)
        pairs: list[tuple[bytes, list[int] | None]] = []
        append = pairs.append
        claimed = self._claimed
        self._claimed = None  # held in the local until the loop ends
        fault: ProtocolError | None = None
        max_size = self._max_size
        max_fds = self._max_fds
        head = 0  # fds before it in the FIFO were claimed in this feed (removed at the end)
        unpack = _unpack_header
        pos = 0
        end = len(view)
        need = 8
        while end - pos >= 8:
            if claimed is None:
                word, nfds, length = unpack(view, pos)
                if word != _VERSION_WORD or length > max_size or nfds > max_fds:
                    fault = self._bad_header(word, nfds, length)
                    break
                if not nfds:
                    claimed = _UNCLAIMED
                elif len(fifo) - head >= nfds:
                    claimed = fifo[head : head + nfds]
                    head += nfds
                else:
                    fault = ProtocolError(
                        f"a frame declares {nfds} fd(s) but only {len(fifo) - head} arrived "
                        "with or before its header; the peer is not following the "
                        "framing protocol (fds must ride with the frame's first byte)"
                    )
                    break
            else:
                length = unpack(view, pos)[2]
            start = pos + 8
            stop = start + length
            if stop > end:
                need = stop - pos
                break
            append((view[start:stop], claimed or None))
            claimed = None
            pos = stop
        self._claimed = claimed
        self._need = need
        if pos < end and fault is None:
            buf += memoryview(view)[pos:]
        if head:
            del fifo[:head]
        messages = messages_of(pairs)  # every claimed fd is owned by its message from here
        if fault is not None:
            self._fail(fault)
        elif len(fifo) > self._max_pending:
            self._check_pending()
        return messages

    def _check_pending(self) -> None:
        if len(self._fifo) > self._max_pending:
            self._fail(
                ProtocolError(
                    f"the peer sent {len(self._fifo)} fds that no frame has claimed (limit "
                    f"{self._max_pending}); it is not following the framing protocol"
                )
            )

    def eof(self) -> None:
        """Signal the end of the stream: an incomplete frame or an unclaimed fd sets ``failure``."""
        if self.failure is None and (self._buf or self._fifo or self._claimed):
            self._fail(
                ProtocolError(
                    f"the stream ended inside a frame: {len(self._buf)} byte(s) of an incomplete "
                    f"frame and {self.pending_fds} fd(s) never delivered (all closed). The peer "
                    "closed or crashed mid-message"
                )
            )

    def close(self) -> None:
        """Close every fd the decoder still holds and drop buffered bytes."""
        self._discard()

    def _bad_header(self, word: int, nfds: int, length: int) -> ProtocolError:
        if word >> 8 != _VERSION:
            return ProtocolError(
                f"received a frame of wire-format version {word >> 8} (expected {_VERSION}); "
                "the peer does not speak aioancillary's framing, or the stream is corrupt. "
                "Use framed=False to talk to a peer that does not frame"
            )
        if word & 0xFF:
            return ProtocolError(f"received a frame with reserved flags 0x{word & 0xFF:02x} set")
        if length > self._max_size:
            return ProtocolError(
                f"received a frame of {length} bytes, over the {self._max_size}-byte limit; "
                "raise max_frame_size if the peer legitimately sends such messages"
            )
        return ProtocolError(
            f"received a frame declaring {nfds} fds, over the per-frame limit of {self._max_fds}"
        )

    def _fail(self, exc: ProtocolError) -> None:
        self.failure = exc
        self._discard()

    def _discard(self) -> None:
        fds = list(self._fifo)
        fds += self._claimed or ()
        self._fifo.clear()
        self._claimed = None
        self._buf.clear()
        self._need = 0
        close_raw(fds)  # no message will ever own these: close them rather than leak them
