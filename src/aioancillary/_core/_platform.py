"""Per-kernel facts the send and receive paths depend on.

Everything platform-specific lives in one [`Platform`][aioancillary.Platform] value, so that the
code paths for macOS and the BSDs can be exercised on Linux by passing a simulated platform (tests
do so).
"""

from __future__ import annotations

import functools
import resource
import socket
import sys
from dataclasses import dataclass

__all__ = ["SCM_MAX_FD", "Platform", "buffer_size_for_rights", "current_platform"]

#: Linux's and the BSDs' cap on fds in one ``sendmsg`` (``SCM_MAX_FD`` in
#: ``include/net/scm.h``). Sending more fails with EINVAL before anything is sent.
SCM_MAX_FD = 253

_FD_SIZE = 4  # sizeof(int): one fd in an SCM_RIGHTS payload

# Headroom for other control messages the kernel may add to the same buffer, so that they can
# never push SCM_RIGHTS out of it: SCM_CREDENTIALS (struct ucred, 12 bytes) when SO_PASSCRED is
# on, SCM_PIDFD (an int; Linux 6.5+), SCM_SECURITY (a label string). Generous on purpose: the
# buffer is allocated per call and a few hundred bytes cost nothing.
_EXTRA_CMSG_SPACE = 512

# Bound for platforms that size the buffer by RLIMIT_NOFILE (macOS): an infinite limit must not
# become an unbounded allocation on every receive.
_RLIMIT_FD_CAP = 1 << 16


def buffer_size_for_rights(n: int) -> int:
    """Return the ancillary buffer size (bytes) that holds one SCM_RIGHTS record of ``n`` fds.

    This is ``CMSG_SPACE(n * sizeof(int))``: what ``recvmsg``'s ``ancbufsize`` needs for ``n``
    fds in one control message.

    Example::

        >>> buffer_size_for_rights(1) > 0
        True
    """
    if n < 0:
        raise ValueError(f"fd count must be >= 0, got {n}")
    if n == 0:
        return 0
    return socket.CMSG_SPACE(n * _FD_SIZE)


@dataclass(frozen=True, slots=True)
class Platform:
    """The kernel behaviour aioancillary adapts to.

    Attributes:
        name: ``sys.platform``-style name (``"linux"``, ``"darwin"``, ``"freebsd"``, ...).
        scm_max_fd: Per-message fd cap enforced by the kernel, or ``None`` where the only bound
            is the receiver's fd table (macOS).
        cmsg_cloexec: The ``MSG_CMSG_CLOEXEC`` flag value, or ``0`` where it does not exist and
            ``fcntl`` must set ``FD_CLOEXEC`` after ``recvmsg``.
        extra_cmsg_space: Bytes added to the receive buffer for non-fd control messages.
    """

    name: str
    scm_max_fd: int | None
    cmsg_cloexec: int
    extra_cmsg_space: int = _EXTRA_CMSG_SPACE

    def receive_fd_capacity(self) -> int:
        """How many fds the receive buffer must hold so that the kernel never truncates.

        Linux/BSD: the fixed per-message cap. macOS: the current ``RLIMIT_NOFILE`` soft limit,
        queried on every call because the process may change it.
        """
        if self.scm_max_fd is not None:
            return self.scm_max_fd
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft > _RLIMIT_FD_CAP:
            return _RLIMIT_FD_CAP
        return max(int(soft), 1)

    def receive_ancbufsize(self) -> int:
        """The ``ancbufsize`` to pass to ``recvmsg``: past the kernel cap, plus headroom."""
        if self.scm_max_fd is not None:  # fixed: computed once (this runs on every read)
            return _fixed_ancbufsize(self.scm_max_fd, self.extra_cmsg_space)
        return buffer_size_for_rights(self.receive_fd_capacity()) + self.extra_cmsg_space


@functools.lru_cache(maxsize=8)
def _fixed_ancbufsize(cap: int, extra: int) -> int:
    return buffer_size_for_rights(cap) + extra


def _detect() -> Platform:
    cloexec = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))  # int, not IntFlag: used per read
    if sys.platform == "darwin":
        return Platform("darwin", None, 0)
    if sys.platform.startswith("linux"):
        return Platform("linux", SCM_MAX_FD, cloexec)
    # FreeBSD, NetBSD, OpenBSD, DragonFly: a fixed cap like Linux, MSG_CMSG_CLOEXEC on all.
    name = "".join(ch for ch in sys.platform if not ch.isdigit())
    return Platform(name, SCM_MAX_FD, cloexec)


_CURRENT = _detect()


def current_platform() -> Platform:
    """The [`Platform`][aioancillary.Platform] of the running kernel."""
    return _CURRENT
