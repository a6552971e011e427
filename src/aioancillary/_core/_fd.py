"""Owned file descriptors, and the borrowed forms accepted when sending."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import warnings
from collections.abc import Iterable
from typing import IO, Any, Protocol, Self, TypeAlias

from ._errors import InvalidFdError

__all__ = ["FD_MAX", "FdLike", "HasFileno", "OwnedFd", "close_all", "close_raw", "fd_number"]


class HasFileno(Protocol):
    """Anything with a ``fileno()`` method: sockets, files, [`OwnedFd`][aioancillary.OwnedFd]."""

    def fileno(self) -> int:
        """Return the open fd number (or -1, or raise ``ValueError``, once closed)."""
        ...


#: What may be passed wherever fds are *sent*: an ``int`` or an object with ``fileno()``.
#: Such fds are borrowed: aioancillary never closes them.
FdLike: TypeAlias = int | HasFileno


#: The largest fd number the kernel's ``int`` fd fields can hold (``SCM_RIGHTS`` carries C ints).
FD_MAX = 2**31 - 1


def fd_number(fd: FdLike) -> int:
    """Return the fd number of ``fd`` (an int or an object with ``fileno()``), validated.

    Raises:
        TypeError: ``fd`` is neither an int nor an object with ``fileno()`` (``bool``, ``str``,
            ``float`` and ``None`` are refused), or its ``fileno()`` returned a non-int.
        InvalidFdError: the number is negative or too large for an fd, or the object is closed
            (``fileno()`` is -1 or raises ``ValueError``).
    """
    kind = type(fd)
    if kind is int:
        num: object = fd
    elif kind is not bool and isinstance(fd, int):
        num = int(fd)  # an int subclass such as an IntEnum member
    elif kind is not bool and hasattr(fd, "fileno"):
        try:
            num = fd.fileno()
        except ValueError as exc:  # a closed file or OwnedFd (io.UnsupportedOperation too)
            raise InvalidFdError(f"cannot send {fd!r}: it has no open fd ({exc})") from exc
        if type(num) is not int:
            raise TypeError(
                f"cannot send {fd!r}: its fileno() returned {num!r}, not an int fd number"
            )
    else:
        raise TypeError(
            f"cannot send {fd!r}: an fd must be an int or an object with a fileno() method, "
            f"not {kind.__name__}"
        )
    assert isinstance(num, int)
    if not 0 <= num <= FD_MAX:
        raise InvalidFdError(
            f"cannot send fd {num}: it is not an open file descriptor number "
            f"(is {fd!r} already closed?)"
        )
    return num


def close_raw(fds: Iterable[int]) -> None:
    """Close fds owned as raw numbers (received, queued or handed over), ignoring EBADF.

    Received fds and queued duplicates are mostly runs of consecutive numbers (the kernel and
    ``dup()`` hand out the lowest free ones), so long lists are closed run by run with
    ``os.closerange`` (``close_range(2)`` on Linux 5.9+) instead of one ``close`` per fd. Only
    numbers in ``fds`` are ever closed.
    """
    nums = fds if isinstance(fds, list) else list(fds)
    count = len(nums)
    if 1 < count < 8 and nums == list(range(nums[0], nums[0] + count)):
        os.closerange(nums[0], nums[0] + count)  # one run, as received fds usually are
        return
    if count < 8:
        close = os.close
        for fd in nums:
            try:  # noqa: SIM105 - contextlib.suppress costs more than the close itself
                close(fd)
            except OSError:
                pass
        return
    ordered = sorted(nums)
    start = prev = ordered[0]
    for fd in ordered:
        if fd > prev + 1:
            os.closerange(start, prev + 1)
            start = fd
        prev = fd
    os.closerange(start, prev + 1)


class OwnedFd:
    """One open file descriptor that this object owns and will close.

    An ``OwnedFd`` closes its fd on [`close`][aioancillary.OwnedFd.close], on leaving a ``with``
    block, and, as a last resort, when garbage collected (emitting a `ResourceWarning` naming the
    fd, like an unclosed file). [`detach`][aioancillary.OwnedFd.detach] hands the raw int out and
    gives up ownership; [`into_socket`][aioancillary.OwnedFd.into_socket] and
    [`into_file`][aioancillary.OwnedFd.into_file] move ownership into a stdlib object.

    Example::

        with msg.take_fds()[0] as fd:          # an OwnedFd received from a peer
            os.write(fd.fileno(), b"hello")
        # closed here

        sock = owned.into_socket()             # the socket now owns the fd
    """

    __slots__ = ("__weakref__", "_fd")

    def __init__(self, fd: int) -> None:
        """Take ownership of the open fd ``fd``.

        Raises:
            InvalidFdError: ``fd`` is negative.
        """
        self._fd = -1  # __del__ runs even when __init__ raises: the slot must be set
        if fd < 0:
            raise InvalidFdError(f"OwnedFd needs an open fd (>= 0), got {fd}")
        self._fd = fd

    @classmethod
    def dup_of(cls, fd: FdLike) -> OwnedFd:
        """Return an ``OwnedFd`` holding a close-on-exec duplicate of a borrowed ``fd``.

        Raises:
            InvalidFdError: ``fd`` is not open.
        """
        num = fd_number(fd)
        try:
            return cls(os.dup(num))  # os.dup makes the copy non-inheritable (CLOEXEC)
        except OSError as exc:
            raise InvalidFdError(f"cannot duplicate fd {num}: {exc.strerror}") from exc

    def fileno(self) -> int:
        """Return the fd number, still owned by this object.

        Raises:
            ValueError: the fd was closed or detached.
        """
        fd = self._fd
        if fd < 0:
            raise ValueError("I/O operation on closed OwnedFd")
        return fd

    @property
    def closed(self) -> bool:
        """``True`` once the fd has been closed or detached."""
        return self._fd < 0

    def close(self) -> None:
        """Close the fd. Calling it again does nothing."""
        fd = self._fd
        if fd >= 0:
            self._fd = -1
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership and return the raw fd; the caller must close it.

        Raises:
            ValueError: the fd was already closed or detached.
        """
        fd = self.fileno()
        self._fd = -1
        return fd

    def dup(self) -> OwnedFd:
        """Return a new ``OwnedFd`` for a close-on-exec duplicate of this fd."""
        return OwnedFd(os.dup(self.fileno()))

    def into_socket(self) -> socket.socket:
        """Move the fd into a `socket.socket`; family, type and protocol are detected.

        This object is detached afterwards. If the fd is not a socket, it stays owned here and
        `OSError` (ENOTSOCK) is raised.
        """
        sock = socket.socket(fileno=self.fileno())
        self._fd = -1
        return sock

    def into_file(self, mode: str = "r+b", buffering: int = -1, **kwargs: Any) -> IO[Any]:
        """Move the fd into a file object, as `open` would on an fd.

        Args:
            mode: File mode, as for `open` (must match how the fd was opened).
            buffering: As for `open`.
            **kwargs: ``encoding``, ``errors``, ``newline`` for text modes.

        The file object owns and closes the fd; this object is detached afterwards. If the
        arguments are refused (bad mode, unknown encoding, ...), the fd stays owned here.
        """
        fd = self.fileno()
        # io.open closes the fd itself when it fails after wrapping it (an unknown encoding
        # fails in TextIOWrapper, after FileIO took the fd), which would leave this object owning
        # a closed, maybe reused, number. Build the same stack without closefd first, so every
        # argument error is raised while the fd is untouched.
        probe = io.open(fd, mode, buffering, closefd=False, **kwargs)  # noqa: UP020, SIM115
        probe.close()  # closefd=False: flushes nothing (nothing written), leaves the fd open
        fobj = io.open(fd, mode, buffering, closefd=True, **kwargs)  # noqa: UP020, SIM115
        self._fd = -1
        return fobj

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        fd = self._fd
        return "<OwnedFd closed>" if fd < 0 else f"<OwnedFd fd={fd}>"

    def __del__(self) -> None:
        fd = self._fd
        if fd >= 0:
            self._fd = -1
            # Closed before warning: with warnings turned into errors, warn() raises.
            with contextlib.suppress(OSError):
                os.close(fd)
            warnings.warn(
                f"unclosed OwnedFd fd={fd}: close it, use 'with', or detach() it",
                ResourceWarning,
                stacklevel=2,
                source=self,
            )


def close_all(fds: Iterable[OwnedFd]) -> None:
    """Close every fd in ``fds``, even if closing one of them fails."""
    close = os.close
    for fd in fds:
        # OwnedFd.close inlined: this runs for every received fd on the hot path.
        num = fd._fd
        if num >= 0:
            fd._fd = -1
            try:  # noqa: SIM105 - contextlib.suppress costs more than the close itself
                close(num)
            except OSError:
                pass
