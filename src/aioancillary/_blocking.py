"""The one receive path over a socket, and the blocking helpers built on it.

:func:`receive_into` works on blocking and non-blocking sockets alike: the blocking helpers
here call it directly, and the asyncio transport calls it from its readiness callbacks. There is
no second receive path. :func:`translate_send_error` is shared by both send paths.
"""

from __future__ import annotations

import errno
import mmap
import socket
from collections.abc import Iterable
from typing import NamedTuple

from ._cmsg import SocketAncillary, extract_fds
from ._errors import (
    DataTruncatedError,
    FdsInFlightError,
    FdTruncatedError,
    InvalidFdError,
    MessageTooLargeError,
)
from ._fd import FdLike, OwnedFd, close_all
from ._message import AncillaryMessage
from ._platform import Platform, current_platform

__all__ = ["ReceivedInto", "receive_into", "recv_fds", "recv_fds_into", "send_fds"]

# Plain ints: the socket module's MsgFlag members are IntFlag enums, whose | and & run Python
# code (several per message on the receive path).
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_PEEK = int(socket.MSG_PEEK)
_TRUNCATED = _MSG_TRUNC | int(socket.MSG_CTRUNC)


class ReceivedInto(NamedTuple):
    """What :func:`recv_fds_into` returns: bytes written into the buffer, and the owned fds."""

    nbytes: int
    fds: tuple[OwnedFd, ...]


def receive_into(
    sock: socket.socket,
    buffer: memoryview | bytearray | mmap.mmap,
    flags: int,
    platform: Platform,
    ancbufsize: int = 0,
) -> tuple[int, list[OwnedFd], bool]:
    """One ``recvmsg_into`` with a control buffer no message can overflow; fds owned at once.

    Returns ``(nbytes, fds, ancillary)``: ``ancillary`` tells whether the kernel attached any
    control record (with ``SO_PASSCRED`` every message carries one, end of stream none).
    ``ancbufsize`` is the platform's :meth:`Platform.receive_ancbufsize`, precomputed by a
    caller that reads in a loop (0: computed here, as it must be per call on macOS).

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
        close_all(fds)  # the message is incomplete; its fds cannot be used safely
        raise DataTruncatedError(
            f"a message did not fit the {len(buffer)}-byte receive buffer and was cut "
            f"(MSG_TRUNC); its tail is lost and its {len(fds)} fd(s) were closed. Receive "
            "with a larger buffer",
            data=bytes(buffer[:nbytes]),
            closed_fds=len(fds),
        )
    return nbytes, fds, True


def _check_args(flags: int, maxfds: int) -> None:
    # Checked before receiving: an error raised after recvmsg would drop the message and
    # leave its fds to the garbage collector.
    if maxfds < 0:
        raise ValueError(f"maxfds must be >= 0, got {maxfds}")
    if flags & _MSG_PEEK:
        raise ValueError(
            "MSG_PEEK with a control buffer makes the kernel install duplicate fds on every "
            "peek; peek without fds (sock.recv) instead"
        )


def _limit(fds: list[OwnedFd], maxfds: int) -> int:
    if len(fds) <= maxfds:
        return 0
    surplus = fds[maxfds:]
    del fds[maxfds:]
    close_all(surplus)  # the caller asked for fewer: an fd nobody will read is closed now
    return len(surplus)


def recv_fds(
    sock: socket.socket,
    bufsize: int,
    maxfds: int,
    flags: int = 0,
    *,
    platform: Platform | None = None,
) -> AncillaryMessage:
    """Receive one message and up to ``maxfds`` fds from ``sock``, leak-proof.

    Unlike :func:`socket.recv_fds`, the control buffer is sized for the kernel's per-message
    cap, not for ``maxfds``: a peer sending more cannot make the kernel drop fds into this
    process. Surplus fds are closed on arrival (counted in ``discarded_fds``). Received fds are
    close-on-exec.

    At end of stream (or an empty datagram) the message has empty ``data`` and no fds.

    Example::

        with recv_fds(sock, 1024, 1) as msg:
            conn = msg.take_fd().into_socket()

    Raises:
        FdTruncatedError: the kernel dropped fds (receiver at RLIMIT_NOFILE); the rest are closed.
        DataTruncatedError: a datagram/seqpacket message exceeded ``bufsize``; its fds are closed.
        CloexecError: ``FD_CLOEXEC`` could not be set; the fds are closed.
        ValueError: ``flags`` has ``MSG_PEEK``, or ``maxfds`` is negative.
    """
    _check_args(flags, maxfds)
    buf = bytearray(bufsize)
    nbytes, fds, _ = receive_into(sock, buf, flags, platform or current_platform())
    discarded = _limit(fds, maxfds)
    return AncillaryMessage(bytes(memoryview(buf)[:nbytes]), tuple(fds), discarded)


def recv_fds_into(
    sock: socket.socket,
    buffer: bytearray | memoryview,
    maxfds: int,
    flags: int = 0,
    *,
    platform: Platform | None = None,
) -> ReceivedInto:
    """Receive one message into a caller-owned ``buffer``; return ``(nbytes, fds)``.

    The bring-your-own-buffer form of :func:`recv_fds`, with the same guarantees. Fds beyond
    ``maxfds`` are closed on arrival.

    Example::

        buf = bytearray(65536)
        nbytes, fds = recv_fds_into(sock, buf, 4)

    Raises:
        The same errors as :func:`recv_fds`.
    """
    _check_args(flags, maxfds)
    nbytes, fds, _ = receive_into(sock, buffer, flags, platform or current_platform())
    _limit(fds, maxfds)
    return ReceivedInto(nbytes, tuple(fds))


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
    sock: socket.socket, data: bytes | memoryview, ancdata: list[tuple[int, int, bytes]]
) -> int:
    """One ``sendmsg`` of ``data`` with ``ancdata``; library errors for EBADF/ETOOMANYREFS.

    Raises:
        BlockingIOError: a non-blocking socket's buffer is full (nothing was sent).
    """
    try:
        return sock.sendmsg([data], ancdata)
    except BlockingIOError:
        raise
    except OSError as exc:
        nfds = len(ancdata[0][2]) // 4 if ancdata else 0
        translated = translate_send_error(exc, nfds)
        if translated is exc:
            raise
        raise translated from exc


def send_fds(
    sock: socket.socket,
    data: bytes,
    fds: Iterable[FdLike],
    *,
    platform: Platform | None = None,
) -> int:
    """Send ``data`` with ``fds`` on a blocking socket; return the bytes sent (all of ``data``).

    The fds are borrowed: they stay open, and the caller may close them once this returns (the
    kernel holds its own references). On a stream socket the fds ride with the first byte; a
    partial write is completed without resending them.

    Example::

        send_fds(sock, b"client", [client_sock])

    Raises:
        TooManyFdsError: more fds than one message may carry (253 on Linux/BSD).
        InvalidFdError: an fd is not open; nothing was sent.
        FdsInFlightError: the kernel refused more fds in flight (ETOOMANYREFS).
        MessageTooLargeError: a datagram/seqpacket message over the kernel's limit (EMSGSIZE).
        ValueError: fds with empty ``data`` on a stream socket (the kernel would drop them).
    """
    anc = SocketAncillary(platform=platform)
    anc.add_fds(fds)
    ancdata = anc.ancdata()
    if ancdata and not data and sock.type == socket.SOCK_STREAM:
        raise ValueError(
            "a stream socket sends nothing, fds included, for an empty write: "
            "send at least one byte with the fds"
        )
    view = memoryview(data)
    sent = send_message(sock, view, ancdata)
    if sock.type == socket.SOCK_STREAM:
        while sent < len(view):
            # The fds went with the first chunk; resending them would duplicate them.
            sent += send_message(sock, view[sent:], [])
    return sent
