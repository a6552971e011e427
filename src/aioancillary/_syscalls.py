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
import socket
import struct

from ._cmsg import extract_fds
from ._errors import (
    DataTruncatedError,
    FdsInFlightError,
    FdTruncatedError,
    InvalidFdError,
    MessageTooLargeError,
)
from ._fd import close_raw
from ._platform import Platform

__all__ = [
    "AncData",
    "peek_is_eof",
    "receive_into",
    "rights",
    "send_all",
    "send_message",
    "translate_send_error",
]

#: The ``ancdata`` list that ``socket.sendmsg`` takes.
AncData = list[tuple[int, int, bytes]]

# Plain ints: the socket module's MsgFlag members are IntFlag enums, whose | and & run Python
# code (several per message on the receive path).
_MSG_TRUNC = int(socket.MSG_TRUNC)
_TRUNCATED = _MSG_TRUNC | int(socket.MSG_CTRUNC)
_PEEK_NOWAIT = int(socket.MSG_PEEK) | int(socket.MSG_DONTWAIT)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_pack_fd = struct.Struct("i").pack
_NO_ANCDATA: AncData = []


def rights(fds: list[int]) -> AncData:
    """The ``sendmsg`` ancillary list carrying ``fds`` in one SCM_RIGHTS record (or none)."""
    if not fds:
        return _NO_ANCDATA
    if len(fds) == 1:
        return [(_SOL_SOCKET, _SCM_RIGHTS, _pack_fd(fds[0]))]
    return [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())]


def receive_into(
    sock: socket.socket,
    buffer: memoryview | bytearray | mmap.mmap,
    flags: int,
    platform: Platform,
    ancbufsize: int = 0,
) -> tuple[int, list[int], bool]:
    """One ``recvmsg_into`` with a control buffer no message can overflow.

    Returns ``(nbytes, fds, ancillary)``: ``fds`` are raw numbers the caller owns from the
    moment this returns (and must close); ``ancillary`` tells whether the kernel attached any
    control record (with ``SO_PASSCRED`` every message carries one, end of stream none).
    ``ancbufsize`` is the platform's :meth:`Platform.receive_ancbufsize`, precomputed by a
    caller that reads in a loop (0: computed here, as it must be per call on macOS). Every
    error raised after the kernel delivered fds has closed them first.

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
        if exc.errno == errno.EMFILE:
            # macOS fails the whole recvmsg when the fds do not fit the fd table.
            raise FdTruncatedError(
                "recvmsg failed with EMFILE: the process is at its RLIMIT_NOFILE and the "
                "kernel discarded the fds of a message. Close unused fds or raise the limit"
            ) from exc
        raise
    if not ancdata and not msg_flags & _TRUNCATED:
        return nbytes, [], False
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
    return nbytes, fds, True


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
