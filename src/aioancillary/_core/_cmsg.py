"""Sans-I/O building and parsing of ancillary data (``cmsg(3)``), with owned fds.

Nothing here touches a socket: [`SocketAncillary`][aioancillary.SocketAncillary] builds the
``ancdata`` list that ``socket.sendmsg`` takes and parses the ``(ancdata, msg_flags)`` that
``socket.recvmsg`` returns.
"""

from __future__ import annotations

import array
import fcntl
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ._errors import CloexecError, FdTruncatedError, TooManyFdsError
from ._fd import FdLike, OwnedFd, close_all, fd_number
from ._platform import Platform, current_platform

__all__ = ["AncData", "Credentials", "SendAncData", "SocketAncillary", "extract_fds", "rights"]

#: The ``ancdata`` shape of ``socket.sendmsg`` / ``socket.recvmsg``.
AncData = Sequence[tuple[int, int, bytes]]
#: The ``ancdata`` list built for ``socket.sendmsg``.
SendAncData = list[tuple[int, int, bytes]]

_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
# Linux values (include/linux/socket.h), interpreted only on a Linux platform: elsewhere the
# same SOL_SOCKET numbers mean other records (FreeBSD: 2 SCM_TIMESTAMP, 4 SCM_BINTIME; macOS: 2
# SCM_TIMESTAMP, 4 SCM_TIMESTAMP_MONOTONIC), whose bytes must never be taken for fds to close.
_SCM_CREDENTIALS = 0x02
_SCM_PIDFD = 0x04
_CTRUNC = int(socket.MSG_CTRUNC)  # a plain int: IntFlag arithmetic is slow
_FD_SIZE = array.array("i").itemsize
_UCRED = struct.Struct("iII")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_UCRED_SIZE = _UCRED.size
_pack_fd = struct.Struct("i").pack
_NO_ANCDATA: SendAncData = []  # never mutated: the ancdata of a message without fds


def rights(fds: list[int]) -> SendAncData:
    """The ``sendmsg`` ancillary data carrying ``fds``: one ``SCM_RIGHTS`` record, or none.

    The one place the package builds ``SCM_RIGHTS`` records (``cmsg(3)``: an array of ints
    after the ``cmsghdr``, which ``socket.sendmsg`` lays out). A message without fds gets a
    shared empty list: callers must not change what this returns. Runs once per message
    sent, so a single fd is packed without an ``array``.
    """
    if not fds:
        return _NO_ANCDATA
    if len(fds) == 1:
        return [(_SOL_SOCKET, _SCM_RIGHTS, _pack_fd(fds[0]))]
    return [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())]


class Credentials(NamedTuple):
    """Process credentials: from ``SO_PEERCRED`` and friends, or an ``SCM_CREDENTIALS`` record."""

    pid: int
    uid: int
    gid: int


def _fd_ints(data: bytes) -> array.array[int]:
    # A record cut short by truncation may end in a partial int (cmsg(3)): drop the tail,
    # never read past it.
    whole = len(data) - len(data) % _FD_SIZE
    fds = array.array("i")
    fds.frombytes(data[:whole])
    return fds


def _set_cloexec(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)


class _Parsed(NamedTuple):
    rights: list[OwnedFd]
    pidfds: list[OwnedFd]
    credentials: Credentials | None
    other: list[tuple[int, int, bytes]]


def _wrap(ancdata: AncData, platform: Platform) -> _Parsed:
    rights: list[OwnedFd] = []
    pidfds: list[OwnedFd] = []
    credentials = None
    other: list[tuple[int, int, bytes]] = []
    linux = platform.name == "linux"
    for level, kind, payload in ancdata:
        # Wrap first: nothing may fail while an fd from the kernel is still a bare int.
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            rights.extend([OwnedFd(fd) for fd in _fd_ints(payload) if fd >= 0])
        elif linux and level == _SOL_SOCKET and kind == _SCM_PIDFD:
            # Linux 6.5+ with SO_PASSPIDFD: the kernel adds a pidfd of the sender. It is an
            # fd too, to be owned and closed, but not one the peer sent.
            pidfds.extend([OwnedFd(fd) for fd in _fd_ints(payload) if fd >= 0])
        elif (
            linux
            and level == _SOL_SOCKET
            and kind == _SCM_CREDENTIALS
            and len(payload) >= _UCRED_SIZE
        ):
            credentials = Credentials(*_UCRED.unpack_from(payload))
        else:
            other.append((level, kind, bytes(payload)))  # unknown records carry no fds
    return _Parsed(rights, pidfds, credentials, other)


def _check(parsed: _Parsed, msg_flags: int, recv_flags: int, platform: Platform) -> None:
    everything = parsed.rights + parsed.pidfds
    if msg_flags & _CTRUNC:
        close_all(everything)  # the set is incomplete: no fd can be matched to its message
        parsed.rights.clear()
        parsed.pidfds.clear()
        raise FdTruncatedError(
            "the kernel dropped file descriptors of a received message (MSG_CTRUNC); "
            f"the {len(everything)} fd(s) that did arrive were closed. The receiver is "
            "probably at its RLIMIT_NOFILE (close unused fds or raise the limit), or the "
            "ancillary buffer was too small (size it with buffer_size_for_rights(SCM_MAX_FD))",
            closed_fds=len(everything),
        )
    if everything and not recv_flags & platform.cmsg_cloexec:
        # No MSG_CMSG_CLOEXEC (macOS, or the caller did not pass it): a concurrent fork+exec
        # between recvmsg and here can still inherit the fds; nothing closes that window.
        try:
            for fd in everything:
                _set_cloexec(fd.fileno())
        except OSError as exc:
            close_all(everything)  # an fd that may leak across exec must not be handed out
            parsed.rights.clear()
            parsed.pidfds.clear()
            raise CloexecError(
                exc.errno,
                f"could not set FD_CLOEXEC on received fds ({exc.strerror}); all "
                f"{len(everything)} were closed",
            ) from exc


def extract_fds(
    ancdata: AncData,
    msg_flags: int,
    recv_flags: int,
    platform: Platform,
) -> list[int]:
    """Return every fd the peer sent in ``ancdata`` as raw numbers, or close them all and raise.

    The lean internal form of [`SocketAncillary.parse`][aioancillary.SocketAncillary.parse] used by
    the I/O layers: the caller owns the returned numbers (and must close them); kernel-added pidfds
    are closed here. On every error path, every fd found in ``ancdata`` has been closed before the
    error is raised.

    Raises:
        FdTruncatedError: ``MSG_CTRUNC`` is set in ``msg_flags``.
        CloexecError: ``FD_CLOEXEC`` could not be set where ``MSG_CMSG_CLOEXEC`` was not used.
    """
    if not msg_flags & _CTRUNC and recv_flags & platform.cmsg_cloexec:
        # The common case: only SCM_RIGHTS (and, on Linux, SO_PASSCRED's credentials), the
        # fds already close-on-exec. Every record is checked before any number is returned,
        # so the general path below never sees a half-taken list.
        fds: list[int] = []
        linux = platform.name == "linux"
        for level, kind, payload in ancdata:
            if level != _SOL_SOCKET:
                break
            if kind == _SCM_RIGHTS:
                ints = _fd_ints(payload)
                if ints and min(ints) < 0:
                    break
                fds += ints
            elif not (linux and kind == _SCM_CREDENTIALS):
                break
        else:
            return fds
    parsed = _wrap(ancdata, platform)
    _check(parsed, msg_flags, recv_flags, platform)
    close_all(parsed.pidfds)
    return [fd.detach() for fd in parsed.rights]


class SocketAncillary:
    """Builder and parser of ancillary data for ``sendmsg`` / ``recvmsg``; no I/O.

    Building (send side): fds added here are *borrowed*; they are never closed by this object::

        anc = SocketAncillary()
        anc.add_fds([listener, some_file])           # ints or objects with fileno()
        sock.sendmsg([b"x"], anc.ancdata())

    Parsing (receive side): every fd found is wrapped in an [`OwnedFd`][aioancillary.OwnedFd] at
        once::

        flags = SocketAncillary.receive_flags()
        data, ancdata, msg_flags, _ = sock.recvmsg(4096, SocketAncillary.receive_buffer_size(),
                                                   flags)
        anc = SocketAncillary.parse(ancdata, msg_flags, recv_flags=flags)
        if anc.is_truncated:
            ...                                      # fds were dropped; those that came are closed
        fds = anc.take_fds()

    Attributes:
        is_truncated: The kernel set ``MSG_CTRUNC``: fds were dropped. Every fd that did arrive
            has been closed, and [`fds`][aioancillary.SocketAncillary.fds] is empty.
        truncated_fds: How many fds arrived with a truncated message (all closed).
        discarded_fds: How many fds beyond ``maxfds`` were closed on arrival.
        credentials: The ``SCM_CREDENTIALS`` record, if the kernel added one (``SO_PASSCRED``).
        other: Control records of other levels or types, as ``(level, type, data)``.
    """

    def __init__(self, *, platform: Platform | None = None) -> None:
        """Create an empty builder (or parse result) for ``platform`` (default: this kernel)."""
        self._platform = platform or current_platform()
        self._send: list[int] = []
        self._fds: tuple[OwnedFd, ...] = ()
        self._pidfds: tuple[OwnedFd, ...] = ()
        self.is_truncated = False
        self.truncated_fds = 0
        self.discarded_fds = 0
        self.credentials: Credentials | None = None
        self.other: list[tuple[int, int, bytes]] = []

    # -- building -------------------------------------------------------------------------

    def add_fds(self, fds: Iterable[FdLike]) -> None:
        """Add borrowed fds to send. All are added, or none.

        Raises:
            TooManyFdsError: the message would carry more than the per-message cap.
            InvalidFdError: an fd is negative or its object is closed.
        """
        nums = [fd_number(fd) for fd in fds]
        cap = self._platform.scm_max_fd
        if cap is not None and len(self._send) + len(nums) > cap:
            raise TooManyFdsError(
                f"one message can carry at most {cap} fds on {self._platform.name} "
                f"(SCM_MAX_FD); this one would carry {len(self._send) + len(nums)}. "
                "Split them over several messages"
            )
        self._send.extend(nums)

    def ancdata(self) -> list[tuple[int, int, bytes]]:
        """The ``ancdata`` list for ``socket.sendmsg``: one SCM_RIGHTS record, or empty."""
        return list(rights(self._send))  # a list of the caller's own

    @property
    def fds_to_send(self) -> tuple[int, ...]:
        """The borrowed fd numbers added with [`add_fds`][aioancillary.SocketAncillary.add_fds]."""
        return tuple(self._send)

    def clear(self) -> None:
        """Forget the fds to send (they are borrowed, so nothing is closed)."""
        self._send.clear()

    # -- parsing --------------------------------------------------------------------------

    @staticmethod
    def receive_buffer_size(platform: Platform | None = None) -> int:
        """The ``ancbufsize`` for ``recvmsg`` that no message can truncate.

        ``CMSG_SPACE(SCM_MAX_FD * sizeof(int))`` plus room for the records the kernel may add beside
        the fds (``SCM_CREDENTIALS``, ``SCM_PIDFD``); where there is no fixed cap (macOS) it is
        sized for ``RLIMIT_NOFILE``. See
        [`Platform.receive_ancbufsize`][aioancillary.Platform.receive_ancbufsize].
        """
        return (platform or current_platform()).receive_ancbufsize()

    @staticmethod
    def receive_flags(platform: Platform | None = None) -> int:
        """The ``recvmsg`` flags to use: ``MSG_CMSG_CLOEXEC`` where the platform has it."""
        return (platform or current_platform()).cmsg_cloexec

    @classmethod
    def parse(
        cls,
        ancdata: AncData,
        msg_flags: int,
        *,
        recv_flags: int = 0,
        maxfds: int | None = None,
        platform: Platform | None = None,
    ) -> SocketAncillary:
        """Parse what ``recvmsg`` returned; every fd is owned before anything else happens.

        Args:
            ancdata: The ``ancdata`` list from ``recvmsg``.
            msg_flags: The ``msg_flags`` from ``recvmsg``.
            recv_flags: The flags *passed to* ``recvmsg``. Unless they include
                ``MSG_CMSG_CLOEXEC``, ``FD_CLOEXEC`` is set here with ``fcntl``.
            maxfds: Keep at most this many fds; the rest are closed (see `discarded_fds`).
            platform: The platform to parse for (default: this kernel).

        Raises:
            CloexecError: ``FD_CLOEXEC`` could not be set; every fd was closed.
            ValueError: ``maxfds`` is negative; every fd was closed.
        """
        anc = cls(platform=platform)
        parsed = _wrap(ancdata, anc._platform)
        if maxfds is not None and maxfds < 0:
            close_all(parsed.rights + parsed.pidfds)  # wrapped first, so none is left open
            raise ValueError(f"maxfds must be >= 0, got {maxfds}")
        anc.credentials = parsed.credentials
        anc.other = parsed.other
        try:
            _check(parsed, msg_flags, recv_flags, anc._platform)
        except FdTruncatedError as exc:
            anc.is_truncated = True
            anc.truncated_fds = exc.closed_fds
            return anc
        rights = parsed.rights
        if maxfds is not None and len(rights) > maxfds:
            surplus = rights[maxfds:]
            del rights[maxfds:]
            close_all(surplus)  # the caller asked for fewer: an fd nobody will read is closed
            anc.discarded_fds = len(surplus)
        anc._fds = tuple(rights)
        anc._pidfds = tuple(parsed.pidfds)
        return anc

    @property
    def fds(self) -> tuple[OwnedFd, ...]:
        """The owned fds the peer sent (still owned by this object)."""
        return self._fds

    @property
    def pidfd(self) -> OwnedFd | None:
        """The sender's pidfd, if the kernel added ``SCM_PIDFD`` (Linux 6.5+), still owned."""
        return self._pidfds[0] if self._pidfds else None

    def take_fds(self) -> tuple[OwnedFd, ...]:
        """Take the received fds out; the caller owns (and must close) them."""
        fds = self._fds
        self._fds = ()
        return fds

    def close(self) -> None:
        """Close every received fd still held (including a pidfd)."""
        fds = self._fds + self._pidfds
        self._fds = ()
        self._pidfds = ()
        close_all(fds)

    def __enter__(self) -> SocketAncillary:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
