"""The transport's outgoing queue: batches of bytes with the fds that ride with them.

Queued fds are raw numbers the transport owns (duplicates of borrowed fds, or fds handed over
with ``close_fds=True``), not :class:`OwnedFd` objects: this is a sender's per-message hot path.
Everything here that takes or creates such numbers also closes them on every failure.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
from collections.abc import Iterable

from ._errors import AncillaryError, InvalidFdError
from ._fd import FdLike, OwnedFd, close_all, fd_number

__all__ = ["Batch", "ancdata", "close_given", "close_numbers", "duplicates", "take_ownership"]

_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)


class Batch:
    """Bytes queued for one ``sendmsg`` and the fds that must ride with the first byte.

    ``fds`` are raw numbers owned by the transport (duplicates, or fds handed over with
    ``close_fds=True``): closed once sent, or when the queue is dropped. Plain ints rather than
    :class:`OwnedFd` objects because this is the per-message hot path of a sender; the
    transport's queue-dropping paths and ``__del__`` close them.
    """

    __slots__ = ("data", "fds", "offset", "sealed")

    def __init__(self, data: bytes | bytearray | memoryview, fds: list[int]) -> None:
        self.data = bytearray(data)
        self.fds = fds
        self.offset = 0
        # True once sending began or fds went out: no fds may join (they would arrive late).
        self.sealed = False


def ancdata(fds: Iterable[int]) -> list[tuple[int, int, bytes]]:
    """The ``sendmsg`` ancillary list carrying ``fds`` in one SCM_RIGHTS record."""
    return [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())]


def duplicates(nums: list[int]) -> list[int]:
    """Duplicates of the borrowed ``nums``, owned by the transport while queued."""
    copies: list[int] = []
    try:
        for num in nums:
            copy = os.dup(num)  # non-inheritable (CLOEXEC), as every fd this library holds
            copies.append(copy)
            if copy in nums and len(nums) > 1:
                # dup() returns the lowest free number: if that is one of the numbers to
                # send, that entry was closed, and would otherwise send our copy instead.
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    except OSError as exc:
        close_numbers(copies)  # none of them was queued
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


def close_numbers(fds: list[int]) -> None:
    """Close fds the transport owns as raw numbers (queued duplicates, or handed over).

    ``dup()`` hands out the lowest free numbers, so a batch's copies are mostly runs of
    consecutive numbers: each run is closed with one ``os.closerange`` (``close_range(2)`` on
    Linux 5.9+) instead of one ``close`` per fd. Only numbers in ``fds`` are ever closed.
    """
    if len(fds) < 8:
        for fd in fds:
            try:  # noqa: SIM105 - contextlib.suppress costs more than the close itself
                os.close(fd)
            except OSError:
                pass
        return
    ordered = sorted(fds)
    start = prev = ordered[0]
    for fd in ordered:
        if fd > prev + 1:
            os.closerange(start, prev + 1)
            start = fd
        prev = fd
    os.closerange(start, prev + 1)


def take_ownership(fds: Iterable[FdLike]) -> list[OwnedFd]:
    """Take ownership of fds given with ``close_fds=True``, all or none."""
    items = list(fds)
    nums = [fd_number(item) for item in items]  # validates before anything is taken
    if len(set(nums)) != len(nums):
        raise ValueError(
            "close_fds=True with the same fd listed twice: it would be closed twice. List "
            "each fd once, or send without close_fds"
        )
    for item in items:
        if not isinstance(item, (OwnedFd, socket.socket, int)):
            raise TypeError(
                f"close_fds=True needs OwnedFd, socket.socket or int items, got {type(item)!r}: "
                "the transport cannot take ownership away from other objects"
            )
    owned: list[OwnedFd] = []
    for item in items:
        if isinstance(item, (OwnedFd, socket.socket)):
            owned.append(OwnedFd(item.detach()))
        else:
            assert isinstance(item, int)
            owned.append(OwnedFd(item))
    return owned


def close_given(fds: Iterable[FdLike]) -> None:
    with contextlib.suppress(TypeError, ValueError, AncillaryError):
        close_all(take_ownership(fds))
