"""The one syscall layer: ``recvmsg``/``sendmsg`` with fds, and their errors, for every mode.

Both the blocking helpers and the asyncio transport call these and nothing else to move fds,
so there is one receive path (control buffer sized for the kernel's cap, fds owned the moment
``recvmsg`` returns) and one translation of send errors into the library's exceptions.
Sockets may be blocking or not: a non-blocking one raises ``BlockingIOError`` as usual.
"""

from __future__ import annotations

import array
import errno
import mmap
import os
import socket

from .._core._cmsg import AncData, extract_fds, rights
from .._core._errors import (
    AncillaryError,
    DataTruncatedError,
    FdsInFlightError,
    FdTruncatedError,
    InvalidFdError,
    MessageTooLargeError,
)
from .._core._fd import close_raw
from .._core._platform import Platform

__all__ = [
    "AGAIN",
    "END",
    "EOF_NEVER",
    "EOF_NO_CREDENTIALS",
    "EOF_ON_EMPTY",
    "EOF_PEEK",
    "FAILED",
    "LIMIT",
    "Receiver",
    "duplicates",
    "peek_is_eof",
    "receive_into",
    "send_all",
    "send_message",
    "translate_send_error",
]


# Plain ints: the socket module's MsgFlag members are IntFlag enums, whose | and & run Python
# code (several per message on the receive path).
_MSG_TRUNC = int(socket.MSG_TRUNC)
_TRUNCATED = _MSG_TRUNC | int(socket.MSG_CTRUNC)
_PEEK_NOWAIT = int(socket.MSG_PEEK) | int(socket.MSG_DONTWAIT)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_SCM_CREDENTIALS = 0x02  # Linux (include/linux/socket.h): other kernels use 2 for other records
_NO_FDS: list[int] = []  # never mutated: returned for reads without fds
_NO_RECORD = (-1, -1, b"")  # stands for the control record of a read that came with none


#: How `receive_many` tells end of stream from an empty message, per socket kind.
EOF_NEVER = 0  # SOCK_DGRAM: a 0-byte read is an empty datagram
EOF_ON_EMPTY = 1  # SOCK_STREAM: a 0-byte read without fds is the end
EOF_NO_CREDENTIALS = 2  # SOCK_SEQPACKET with SO_PASSCRED (Linux): every message has a record
EOF_PEEK = 3  # SOCK_SEQPACKET elsewhere: ask the socket (peek_is_eof)

#: How `receive_many` stopped.
AGAIN = 0  # the socket would block
LIMIT = 1  # ``limit`` reads done; more may be waiting
END = 2  # end of stream
FAILED = 3  # an error, returned beside the reads that came before it


def _recv_error(exc: OSError) -> Exception:
    if exc.errno == errno.EMFILE:
        # macOS fails the whole recvmsg when the fds do not fit the fd table.
        error = FdTruncatedError(
            "recvmsg failed with EMFILE: the process is at its RLIMIT_NOFILE and the "
            "kernel discarded the fds of a message. Close unused fds or raise the limit"
        )
        error.__cause__ = exc
        return error
    return exc


def _fds_of(
    ancdata: AncData,
    msg_flags: int,
    recv_flags: int,
    platform: Platform,
    *,
    buffer: memoryview | bytearray | mmap.mmap,
    nbytes: int,
) -> list[int]:
    """The fds of one ``recvmsg``, owned by the caller; on error every one is closed first."""
    if not msg_flags & _TRUNCATED and recv_flags & platform.cmsg_cloexec:
        # The common case, without the general parser: one SCM_RIGHTS record of whole
        # ints (the kernel never hands out negative numbers), close-on-exec already, maybe
        # beside Linux's SCM_CREDENTIALS. Anything else takes the general path below.
        creds = _SCM_CREDENTIALS if platform.name == "linux" else -1
        found: list[int] | None = None
        for level, kind, payload in ancdata:
            if level != _SOL_SOCKET:
                break
            if kind == _SCM_RIGHTS:
                if found is not None or len(payload) % 4:
                    break
                ints = array.array("i")
                ints.frombytes(payload)
                found = ints.tolist()
            elif kind != creds:
                break
        else:
            return found or _NO_FDS
    try:
        fds = extract_fds(ancdata, msg_flags, recv_flags, platform)
    except FdTruncatedError as exc:
        exc.data = bytes(buffer[:nbytes])  # copied only on this rare path
        raise
    if msg_flags & _MSG_TRUNC:
        close_raw(fds)  # the message is incomplete; its fds cannot be used safely
        raise DataTruncatedError(
            f"a message did not fit the {len(buffer)}-byte receive buffer and was cut "
            f"(MSG_TRUNC); its tail is lost and its {len(fds)} fd(s) were closed. Receive "
            "with a larger buffer",
            data=bytes(buffer[:nbytes]),
            closed_fds=len(fds),
        )
    return fds


def receive_into(
    sock: socket.socket,
    buffer: memoryview | bytearray | mmap.mmap,
    flags: int,
    platform: Platform,
    ancbufsize: int = 0,
) -> tuple[int, list[int], bool]:
    """One ``recvmsg_into`` with a control buffer no message can overflow.

    Returns ``(nbytes, fds, ancillary)``: ``fds`` are raw numbers the caller owns from the moment
    this returns (and must close); ``ancillary`` tells whether the kernel attached any control
    record (with ``SO_PASSCRED`` every message carries one, end of stream none). ``ancbufsize`` is
    the platform's [`Platform.receive_ancbufsize`][aioancillary.Platform.receive_ancbufsize],
    precomputed by a caller that reads in a loop (0: computed here, as it must be per call on
    macOS). Every error raised after the kernel delivered fds has closed them first.

    Raises:
        BlockingIOError: a non-blocking socket has nothing to read.
        FdTruncatedError: the kernel dropped fds (MSG_CTRUNC; EMFILE on macOS).
        DataTruncatedError: a datagram/seqpacket message did not fit ``buffer`` (MSG_TRUNC).
        CloexecError: ``FD_CLOEXEC`` could not be set.
    """
    recv_flags = flags | platform.cmsg_cloexec
    try:
        nbytes, ancdata, msg_flags, _addr = sock.recvmsg_into(
            [buffer], ancbufsize or platform.receive_ancbufsize(), recv_flags
        )
    except OSError as exc:
        error = _recv_error(exc)
        if error is exc:
            raise
        raise error from exc
    if not ancdata and not msg_flags & _TRUNCATED:
        return nbytes, _NO_FDS, False
    fds = _fds_of(ancdata, msg_flags, recv_flags, platform, buffer=buffer, nbytes=nbytes)
    return nbytes, fds, True


class Receiver:
    """Reads many messages per call from one non-blocking socket: a read loop's syscall layer.

    Everything that does not change between reads (the socket's ``recvmsg_into``, the buffer,
    the flags, the control-buffer size, how end of stream is told from an empty message) is
    worked out once here, because `read` is the receive hot path: one call per wake-up
    instead of one per message.

    Args:
        sock: The non-blocking socket.
        buffer: Where each read lands (its bytes are copied out per read).
        platform: Kernel facts.
        eof: How a 0-byte read is told from end of stream (``EOF_*``).
    """

    __slots__ = (
        "_ancbufsize",
        "_buffer",
        "_buffers",
        "_creds",
        "_eof",
        "_platform",
        "_recv",
        "_recv_flags",
        "_sock",
    )

    def __init__(self, sock: socket.socket, buffer: memoryview, platform: Platform, eof: int):
        self._sock = sock
        self._recv = sock.recvmsg_into
        self._buffer = buffer
        self._buffers = [buffer]
        self._platform = platform
        self._recv_flags = platform.cmsg_cloexec
        self._creds = _SCM_CREDENTIALS if platform.name == "linux" else -1
        # Fixed where the kernel's cap is (Linux, BSD); 0: sized per read by RLIMIT (macOS).
        self._ancbufsize = platform.receive_ancbufsize() if platform.scm_max_fd else 0
        self._eof = eof

    def read(
        self, limit: int, max_fds: int
    ) -> tuple[list[tuple[bytes, list[int] | None]], int, Exception | None]:
        """Up to ``limit`` reads; stop early (`LIMIT`) once they hold ``max_fds`` fds.

        Returns ``(reads, how, error)``: each read is ``(bytes, fds or None)`` with the fds
        owned by the caller; ``how`` is `AGAIN`, `LIMIT`, `END` (end of
        stream, told from an empty message by the ``eof`` rule) or `FAILED`, with
        ``error`` the exception (the fds of the read that failed are closed; the reads before
        it are kept). The fd bound lets the caller check its fd budget at least that often.
        """
        recv = self._recv
        buffers = self._buffers
        buffer = self._buffer
        recv_flags = self._recv_flags
        creds = self._creds
        ancbufsize = self._ancbufsize or self._platform.receive_ancbufsize()
        reads: list[tuple[bytes, list[int] | None]] = []
        append = reads.append
        nfds = 0
        for _ in range(limit):
            try:
                nbytes, ancdata, msg_flags, _addr = recv(buffers, ancbufsize, recv_flags)
            except (BlockingIOError, InterruptedError):
                return reads, AGAIN, None
            except OSError as exc:
                return reads, FAILED, _recv_error(exc)
            if ancdata or msg_flags & _TRUNCATED:
                # _fds_of's common case inline, for every fd-carrying message: one SCM_RIGHTS
                # record of whole ints, close-on-exec already, alone or after Linux's
                # SCM_CREDENTIALS (SO_PASSCRED: the kernel puts the credentials first).
                # (A datagram cut short may come with no record at all: MSG_TRUNC alone.)
                record = ancdata[-1] if ancdata else _NO_RECORD
                if (
                    record[1] == _SCM_RIGHTS
                    and record[0] == _SOL_SOCKET
                    and not len(record[2]) % 4
                    and not msg_flags & _TRUNCATED
                    and recv_flags
                    and (
                        len(ancdata) == 1
                        or (
                            len(ancdata) == 2
                            and ancdata[0][1] == creds
                            and ancdata[0][0] == _SOL_SOCKET
                        )
                    )
                ):
                    ints = array.array("i")
                    ints.frombytes(record[2])
                    fds = ints.tolist()
                else:
                    try:
                        fds = _fds_of(
                            ancdata,
                            msg_flags,
                            recv_flags,
                            self._platform,
                            buffer=buffer,
                            nbytes=nbytes,
                        )
                    except (AncillaryError, OSError) as exc:
                        return reads, FAILED, exc  # _fds_of closed the fds of this read
                    if not nbytes and not fds and self._at_eof(True):
                        return reads, END, None
                append((buffer[:nbytes].tobytes(), fds or None))
                nfds += len(fds)
                if nfds >= max_fds:
                    return reads, LIMIT, None
            elif nbytes or not self._at_eof(False):
                append((buffer[:nbytes].tobytes(), None))
            else:
                return reads, END, None
        return reads, LIMIT, None

    def _at_eof(self, ancillary: bool) -> bool:
        """After a read of 0 bytes and no fds: the end of the stream, or an empty message?

        ``ancillary``: the read came with a control record (with SO_PASSCRED, every message
        does and the end of the stream does not).
        """
        eof = self._eof
        if eof == EOF_NEVER:
            return False
        if eof == EOF_NO_CREDENTIALS:
            return not ancillary
        if eof == EOF_PEEK:
            return peek_is_eof(self._sock)
        return True


def peek_is_eof(sock: socket.socket) -> bool:
    """After a 0-byte read on SOCK_SEQPACKET: end of stream (True) or an empty message?

    ``recvmsg`` returns 0 bytes for both. Peek without a control buffer (a peek without one
    installs no fd, ``unix(7)``): at end of stream a non-blocking read returns 0 again at
    once, while after a message it either finds nothing yet (EAGAIN) or the next message's
    bytes. Another 0 is ambiguous (an empty message followed by another, or by the close) and
    is taken as end of stream, so empty messages right before the peer closes may be lost.
    """
    try:
        return not sock.recv(1, _PEEK_NOWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def translate_send_error(exc: OSError, nfds: int) -> Exception:
    """Turn an ``OSError`` from ``sendmsg`` into the library's error where one fits."""
    if exc.errno == errno.EBADF and nfds:
        return InvalidFdError(
            f"sendmsg failed with EBADF: one of the {nfds} fd(s) to send is not open. Nothing "
            "was sent"
        )
    if exc.errno == errno.EMSGSIZE:
        return MessageTooLargeError(
            "sendmsg failed with EMSGSIZE: the message is larger than the kernel takes in one "
            "datagram (the socket's send buffer). Nothing was sent; send smaller messages or "
            "raise SO_SNDBUF"
        )
    if exc.errno == errno.ETOOMANYREFS:
        return FdsInFlightError(
            exc.errno,
            "sendmsg failed with ETOOMANYREFS: too many fds are in flight (unread in Unix "
            "sockets) for this user. Let the peer read, or raise RLIMIT_NOFILE, and retry",
        )
    return exc


def send_message(
    sock: socket.socket, buffers: list[bytes | bytearray | memoryview], fds: list[int]
) -> int:
    """One ``sendmsg`` of ``buffers`` with ``fds``; library errors for EBADF/EMSGSIZE/...

    Raises:
        BlockingIOError: a non-blocking socket's buffer is full (nothing was sent).
        InvalidFdError, MessageTooLargeError, FdsInFlightError: nothing was sent.
        OSError: any other failure of the socket itself.
    """
    try:
        return sock.sendmsg(buffers, rights(fds))
    except BlockingIOError:
        raise
    except OSError as exc:
        translated = translate_send_error(exc, len(fds))
        if translated is exc:
            raise
        raise translated from exc


def send_all(sock: socket.socket, data: bytes | bytearray | memoryview, fds: list[int]) -> int:
    """Send all of ``data`` with ``fds`` on a blocking socket; return the bytes sent.

    On a stream socket the fds ride with the first byte and a partial write is completed
    without resending them; datagram sockets send once (the kernel takes all or nothing).
    """
    view = memoryview(data)
    sent = send_message(sock, [view], fds)
    if sock.type == socket.SOCK_STREAM:
        while sent < len(view):
            # The fds went with the first chunk; resending them would duplicate them.
            sent += send_message(sock, [view[sent:]], [])
    return sent


_dup = os.dup  # one global lookup per fd, not two (a sender's per-message path)


def duplicates(nums: list[int]) -> list[int]:
    """Close-on-exec duplicates of the borrowed ``nums``, for a sender that queues them.

    Args:
        nums: Fd numbers the caller keeps; the copies are the new owner's.

    Returns:
        One copy per number, in order (``os.dup``: the lowest free numbers).

    Raises:
        InvalidFdError: a number is not open (EBADF), including when a copy got one of the
            numbers to send (that entry had been closed). No copy is left open.
        OSError: duplicating failed otherwise (at ``RLIMIT_NOFILE``: EMFILE). No copy is left
            open.
    """
    copies: list[int] = []
    try:
        for num in nums:
            copy = _dup(num)  # non-inheritable (CLOEXEC), as every fd this library holds
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
