"""The blocking API: [`send_fds`][aioancillary.send_fds], [`recv_fds`][aioancillary.recv_fds],
[`recv_fds_into`][aioancillary.recv_fds_into].

Thin wrappers over the one syscall layer (`._syscalls`) that the asyncio transport uses
too, with the same guarantees on both: control buffer sized for the kernel's cap, fds owned the
moment ``recvmsg`` returns, surplus fds closed, send errors translated before anything is sent.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import NamedTuple

from .._core._fd import FdLike, OwnedFd, close_raw
from .._core._framing import Mode
from .._core._message import AncillaryMessage, new_message
from .._core._outbox import borrowed_fds, check_message, payload_of
from .._core._platform import Platform, current_platform
from ._syscalls import receive_into, send_all

__all__ = ["ReceivedInto", "recv_fds", "recv_fds_into", "send_fds"]

_MSG_PEEK = int(socket.MSG_PEEK)


class ReceivedInto(NamedTuple):
    """What [`recv_fds_into`][aioancillary.recv_fds_into] returns: bytes written into the buffer,
    and the owned fds."""

    nbytes: int
    fds: tuple[OwnedFd, ...]


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


def _limit(fds: list[int], maxfds: int) -> int:
    if len(fds) <= maxfds:
        return 0
    surplus = fds[maxfds:]
    del fds[maxfds:]
    close_raw(surplus)  # the caller asked for fewer: an fd nobody will read is closed now
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

    Unlike `socket.recv_fds`, the control buffer is sized for the kernel's per-message
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
    msg = new_message(bytes(memoryview(buf)[:nbytes]), fds)
    msg.discarded_fds = discarded
    return msg


def recv_fds_into(
    sock: socket.socket,
    buffer: bytearray | memoryview,
    maxfds: int,
    flags: int = 0,
    *,
    platform: Platform | None = None,
) -> ReceivedInto:
    """Receive one message into a caller-owned ``buffer``; return ``(nbytes, fds)``.

    The bring-your-own-buffer form of [`recv_fds`][aioancillary.recv_fds], with the same guarantees.
    Fds beyond ``maxfds`` are closed on arrival.

    Example::

        buf = bytearray(65536)
        nbytes, fds = recv_fds_into(sock, buf, 4)

    Raises the same errors as [`recv_fds`][aioancillary.recv_fds].
    """
    _check_args(flags, maxfds)
    nbytes, fds, _ = receive_into(sock, buffer, flags, platform or current_platform())
    _limit(fds, maxfds)
    return ReceivedInto(nbytes, tuple(map(OwnedFd, fds)))


def send_fds(
    sock: socket.socket,
    data: bytes | bytearray | memoryview,
    fds: Iterable[FdLike],
    *,
    platform: Platform | None = None,
) -> int:
    """Send ``data`` with ``fds`` on a blocking socket; return the bytes sent (all of ``data``).

    The fds are borrowed: they stay open, and the caller may close them once this returns (the
    kernel holds its own references). On a stream socket the fds ride with the first byte; a
    partial write is completed without resending them. ``data`` may be any bytes-like object;
    its size in bytes is what is sent.

    Example::

        send_fds(sock, b"client", [client_sock])

    Raises:
        TypeError: ``data`` is not bytes-like, or an fd is not an int or object with fileno().
        TooManyFdsError: more fds than one message may carry (253 on Linux/BSD).
        InvalidFdError: an fd is not open; nothing was sent.
        FdsInFlightError: the kernel refused more fds in flight (ETOOMANYREFS).
        MessageTooLargeError: a datagram/seqpacket message over the kernel's limit (EMSGSIZE).
        ValueError: fds with empty ``data`` on a stream socket (the kernel would drop them).
    """
    payload = payload_of(data)
    nums = borrowed_fds(fds)
    platform = platform or current_platform()
    check_message(
        Mode.RAW if sock.type == socket.SOCK_STREAM else Mode.DATAGRAM,
        len(payload),
        len(nums),
        fd_cap=platform.scm_max_fd,
        max_message_size=len(payload),
        datagram_limit=len(payload),  # the kernel's own limit applies (EMSGSIZE)
        cap_name=f"SCM_MAX_FD on {platform.name}",
    )
    return send_all(sock, payload, nums)
