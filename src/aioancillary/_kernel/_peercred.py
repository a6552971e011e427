"""Credentials of the process at the other end of a connected ``AF_UNIX`` socket.

Every kernel records the peer's credentials when the connection is made (``connect()`` or
``socketpair()``), and each exposes them through its own ``getsockopt`` option and struct:

============  =====================================  =========================================
platform      option (level, name)                   struct
============  =====================================  =========================================
Linux         ``SOL_SOCKET, SO_PEERCRED``            ``struct ucred {pid; uid; gid}``
macOS         ``SOL_LOCAL, LOCAL_PEERCRED``          ``struct xucred`` (no pid), plus
              ``SOL_LOCAL, LOCAL_PEERPID``           a ``pid_t``
FreeBSD       ``SOL_LOCAL, LOCAL_PEERCRED``          ``struct xucred`` (pid appended in 13+)
OpenBSD       ``SOL_SOCKET, SO_PEERCRED``            ``struct sockpeercred {uid; gid; pid}``
NetBSD        ``SOL_LOCAL, LOCAL_PEEREID``           ``struct unpcbid {pid; uid; gid}``
============  =====================================  =========================================

The decoding of each struct is a pure function of its bytes, and the ``getsockopt`` dispatch
takes a platform name, so that every path runs on Linux under test with simulated sockets
(the same pattern as `aioancillary._core._platform.Platform`).

Layouts and constants checked against the kernels' own sources (read through the ``search`` tool):

* FreeBSD ``sys/sys/ucred.h``: ``struct xucred`` = ``u_int cr_version; uid_t cr_uid;
  short cr_ngroups; gid_t cr_groups[XU_NGROUPS = 16]; union { void *_cr_unused1; pid_t
  cr_pid; }``, ``XUCRED_VERSION`` 0. ``sys/kern/kern_prot.c``: ``cru2x`` zeroes the whole
  struct first and ``cru2xt`` then sets ``cr_pid`` (so a kernel without ``cr_pid`` reports 0).
  ``sys/sys/un.h``: ``LOCAL_PEERCRED`` 1. Not checked: the release that added ``cr_pid``
  (taken to be 13.0); the decoding does not depend on it.
* macOS (XNU ``bsd/sys/ucred.h``, ``bsd/sys/un.h``, ``bsd/sys/syslimits.h``): ``struct
  xucred`` = ``u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[NGROUPS]``
  with ``NGROUPS`` = ``NGROUPS_MAX`` = 16; ``SOL_LOCAL`` 0, ``LOCAL_PEERCRED`` 0x001,
  ``LOCAL_PEERPID`` 0x002.
* OpenBSD ``sys/sys/socket.h``: ``struct sockpeercred { uid_t uid; gid_t gid; pid_t pid; }``,
  ``SOL_SOCKET`` 0xffff, ``SO_PEERCRED`` 0x1022.
* NetBSD ``sys/sys/un.h``: ``struct unpcbid { pid_t unp_pid; uid_t unp_euid; gid_t
  unp_egid; }``, ``LOCAL_PEEREID`` 0x0003; level 0 as NetBSD's own users (perfuse) call it.
* Linux: ``struct ucred`` and the ``SO_PEERCRED`` results (including ``(0, -1, -1)`` for a
  socket without credentials) were checked on a running kernel, not against its source.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Callable
from typing import Protocol

from .._core._cmsg import Credentials
from .._core._platform import current_platform

__all__ = ["peer_credentials"]

# Linux: take the running kernel's values where we run on Linux, because SOL_SOCKET and
# SO_PEERCRED differ between architectures (asm-generic/socket.h has 1 and 17; MIPS, SPARC,
# PA-RISC and Alpha use others). Simulations elsewhere use the asm-generic numbers.
_ON_LINUX = sys.platform.startswith("linux")
_LINUX_SOL_SOCKET = socket.SOL_SOCKET if _ON_LINUX else 1
_LINUX_SO_PEERCRED = getattr(socket, "SO_PEERCRED", 17) if _ON_LINUX else 17

# macOS, FreeBSD, NetBSD: the option level for AF_UNIX sockets (SOL_LOCAL in macOS's
# <sys/un.h>; FreeBSD's and NetBSD's callers of their LOCAL_* options pass 0 as well).
_SOL_LOCAL = 0
_LOCAL_PEERCRED = 0x001  # <sys/un.h> on macOS and FreeBSD
_LOCAL_PEERPID = 0x002  # macOS <sys/un.h>
_NETBSD_LOCAL_PEEREID = 0x0003  # NetBSD <sys/un.h>
_OPENBSD_SOL_SOCKET = 0xFFFF  # OpenBSD <sys/socket.h>
_OPENBSD_SO_PEERCRED = 0x1022  # OpenBSD <sys/socket.h>

# Native sizes and alignment ("@"), as the kernel of the running machine lays the structs out.
_UCRED = struct.Struct("@iII")  # Linux struct ucred { pid_t pid; uid_t uid; gid_t gid; }
_XU_NGROUPS = 16  # XU_NGROUPS (FreeBSD <sys/ucred.h>), NGROUPS_MAX (macOS <sys/syslimits.h>)
# struct xucred up to and including cr_groups[]; short cr_ngroups is followed by 2 bytes of
# padding before the gid_t array, which "@" inserts. 76 bytes: the whole struct on macOS.
_XUCRED = struct.Struct(f"@IIh{_XU_NGROUPS}I")
_XUCRED_VERSION = 0  # XUCRED_VERSION in <sys/ucred.h> (macOS and FreeBSD)
# FreeBSD appends union { void *_cr_unused1; pid_t cr_pid; }: pointer-aligned, so cr_pid sits
# at offset 80 on 64-bit machines (76 on 32-bit) and the struct is 88 (80) bytes long.
_FREEBSD_PID_OFFSET = struct.calcsize(f"@IIh{_XU_NGROUPS}I0P")
_FREEBSD_XUCRED_SIZE = struct.calcsize(f"@IIh{_XU_NGROUPS}IP")
_PID = struct.Struct("@i")  # pid_t
_SOCKPEERCRED = struct.Struct("@IIi")  # OpenBSD: uid_t uid; gid_t gid; pid_t pid;
_UNPCBID = struct.Struct("@iII")  # NetBSD: pid_t unp_pid; uid_t unp_euid; gid_t unp_egid;

_NO_ID = 0xFFFFFFFF  # (uid_t)-1: what Linux reports for a socket that has no peer credentials

# getsockopt errors that mean "no credentials here", not a fault of the caller: the socket is
# not connected (ENOTCONN; EINVAL on BSD datagram sockets), or the kernel lacks the option.
_NO_CREDENTIALS_ERRNOS = frozenset(
    {errno.ENOTCONN, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENOTSUP}
)


class _PeerSocket(Protocol):
    """What the dispatch needs of a socket: a real one, or a simulated one in tests."""

    @property
    def family(self) -> int: ...

    def getpeername(self) -> object: ...

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...


def _credentials(pid: int, uid: int, gid: int) -> Credentials:
    # pid 0 is never a peer: Linux gives it for a peer outside our pid namespace, FreeBSD
    # before cr_pid leaves the zeroed union. Both mean "unknown", spelled -1 here.
    return Credentials(pid if pid > 0 else -1, uid, gid)


def _need(raw: bytes, size: int, what: str) -> None:
    if len(raw) < size:
        raise ValueError(f"{what}: need {size} bytes, got {len(raw)}")


def _decode_linux(raw: bytes) -> Credentials:
    """Decode Linux's ``struct ucred`` (``SO_PEERCRED``)."""
    _need(raw, _UCRED.size, "struct ucred")
    return _credentials(*_UCRED.unpack_from(raw))


def _decode_xucred(raw: bytes, pid: int) -> Credentials:
    """Decode a macOS/FreeBSD ``struct xucred`` (``LOCAL_PEERCRED``); ``pid`` comes separately.

    Raises:
        ValueError: ``raw`` is too short, has an unknown ``cr_version``, or no groups.
    """
    _need(raw, _XUCRED.size, "struct xucred")
    version, uid, ngroups, *groups = _XUCRED.unpack_from(raw)
    if version != _XUCRED_VERSION:
        raise ValueError(f"struct xucred: unknown cr_version {version}")
    if ngroups < 1:
        # cr_ngroups counts the effective gid, which is cr_groups[0]: it is never 0.
        raise ValueError(f"struct xucred: cr_ngroups is {ngroups}")
    return _credentials(pid, uid, groups[0])


def _decode_freebsd(raw: bytes) -> Credentials:
    """Decode FreeBSD's ``struct xucred``, with ``cr_pid`` when the kernel returned it."""
    pid = -1
    if len(raw) >= _FREEBSD_PID_OFFSET + _PID.size:
        (pid,) = _PID.unpack_from(raw, _FREEBSD_PID_OFFSET)
    return _decode_xucred(raw, pid)


def _decode_pid(raw: bytes) -> int:
    """Decode a bare ``pid_t`` (macOS ``LOCAL_PEERPID``)."""
    _need(raw, _PID.size, "pid_t")
    pid: int = _PID.unpack_from(raw)[0]
    return pid


def _decode_openbsd(raw: bytes) -> Credentials:
    """Decode OpenBSD's ``struct sockpeercred``: uid, gid, pid (not Linux's order)."""
    _need(raw, _SOCKPEERCRED.size, "struct sockpeercred")
    uid, gid, pid = _SOCKPEERCRED.unpack_from(raw)
    return _credentials(pid, uid, gid)


def _decode_netbsd(raw: bytes) -> Credentials:
    """Decode NetBSD's ``struct unpcbid`` (``LOCAL_PEEREID``)."""
    _need(raw, _UNPCBID.size, "struct unpcbid")
    return _credentials(*_UNPCBID.unpack_from(raw))


def _read_linux(sock: _PeerSocket) -> Credentials | None:
    # A listening socket reports its *own* credentials (unix_listen() sets them for the
    # connections it will accept): only a socket with a peer may answer. Linux keeps the peer
    # (and getpeername working) after the peer closes, so the check costs nothing there.
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return None
        raise
    return _decode_linux(sock.getsockopt(_LINUX_SOL_SOCKET, _LINUX_SO_PEERCRED, _UCRED.size))


def _read_darwin(sock: _PeerSocket) -> Credentials | None:
    raw = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED.size)
    try:
        pid = _decode_pid(sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERPID, _PID.size))
    except OSError:
        pid = -1  # LOCAL_PEERPID is newer than LOCAL_PEERCRED (macOS 10.8): uid/gid still hold
    return _decode_xucred(raw, pid)


def _read_freebsd(sock: _PeerSocket) -> Credentials | None:
    return _decode_freebsd(sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _FREEBSD_XUCRED_SIZE))


def _read_openbsd(sock: _PeerSocket) -> Credentials | None:
    return _decode_openbsd(
        sock.getsockopt(_OPENBSD_SOL_SOCKET, _OPENBSD_SO_PEERCRED, _SOCKPEERCRED.size)
    )


def _read_netbsd(sock: _PeerSocket) -> Credentials | None:
    return _decode_netbsd(sock.getsockopt(_SOL_LOCAL, _NETBSD_LOCAL_PEEREID, _UNPCBID.size))


_READERS: dict[str, Callable[[_PeerSocket], Credentials | None]] = {
    "linux": _read_linux,
    "darwin": _read_darwin,
    "freebsd": _read_freebsd,
    "openbsd": _read_openbsd,
    "netbsd": _read_netbsd,
}


def _normalize(name: str) -> str:
    # Accept sys.platform spellings ("freebsd14", "linux2") as well as Platform.name.
    return "".join(ch for ch in name.lower() if not ch.isdigit())


def _query(sock: _PeerSocket, platform_name: str) -> Credentials | None:
    reader = _READERS.get(_normalize(platform_name))
    if reader is None or sock.family != socket.AF_UNIX:
        return None
    try:
        creds = reader(sock)
    except OSError as exc:
        if exc.errno in _NO_CREDENTIALS_ERRNOS:
            return None
        raise
    except ValueError:
        # A layout we cannot read (a new cr_version, a short answer): report "no credentials"
        # rather than guess; callers that authorize peers then refuse, which is the safe side.
        return None
    if creds is None or creds.uid == _NO_ID:
        return None  # e.g. Linux, a datagram socket connected with connect(): nothing recorded
    return creds


def peer_credentials(
    sock: socket.socket, *, platform_name: str | None = None
) -> Credentials | None:
    """Return the credentials of the process at the other end of a connected Unix socket.

    The kernel records them when the connection is made (``connect()``, ``socketpair()``), so
    they describe the peer as it was then: a peer that later changes its ids, or passes the
    socket to another process, is still reported as it connected. ``uid`` and ``gid`` are the
    effective ids. Treat ``pid`` as a hint, not an identity: it can be reused once the peer
    exits (on Linux, ``SO_PEERPIDFD`` gives a pidfd that cannot).

    Example::

        a, b = socket.socketpair()
        creds = peer_credentials(a)          # Credentials(pid=<ours>, uid=..., gid=...)

    Args:
        sock: A connected ``AF_UNIX`` socket of any type.
        platform_name: The kernel whose mechanism to use (``"linux"``, ``"darwin"``,
            ``"freebsd"``, ``"openbsd"``, ``"netbsd"``; ``sys.platform`` spellings work too).
            Defaults to the running kernel; other values exist for tests that simulate one.

    Returns:
        ``Credentials(pid, uid, gid)``, with ``pid`` -1 where the kernel does not tell it
        (FreeBSD before 13, a peer in another pid namespace). ``None`` if ``sock`` is not an
        ``AF_UNIX`` socket, is not connected (a listening socket included), the kernel recorded
        no credentials, or the platform has no mechanism this module knows.

    Raises:
        OSError: ``getsockopt`` failed for another reason, e.g. ``EBADF`` for a closed socket.
    """
    return _query(sock, platform_name or current_platform().name)
