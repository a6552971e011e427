"""``accept(2)`` for every accept loop of the package: a bounded burst, and what an error means.

An accept loop is a readiness callback on a listening socket that accepts until the kernel's
queue is empty (``EAGAIN``). Three kinds of failure need three different answers, and getting
one wrong either drops a healthy listener or spins on a broken one (the reader stays
registered, the poller reports the socket ready at once, the call fails again):

* **transient**: one pending client went away or failed before it was taken (``accept(2)``:
  "Linux accept() passes already-pending network errors on the new socket as an error code";
  ``ECONNABORTED``, ``EPROTO``, ``EPERM``, the network errors, ``EINTR``). That client is gone
  and the next one may be fine: go on.
* **resource**: this process or the system is out of fds or memory (``EMFILE``, ``ENFILE``,
  ``ENOBUFS``, ``ENOMEM``). The client stays in the backlog; retrying at once fails again.
  Stop reading the listener and retry after a pause (``RETRY_DELAY``); log the episode once
  (``ResourcePause``), not every retry.
* **fatal**: anything else (``EINVAL``: the socket no longer listens, e.g. it was shut down
  underneath the loop; ``EBADF``, ``ENOTSOCK``...). The listener will never accept again: stop
  serving it (remove its reader) and say so once.

A Unix listener shut down underneath the loop (``SHUT_RD`` or ``SHUT_RDWR``) fails without an
error: ``accept()`` says ``EAGAIN`` while the poller keeps reporting it ready (``unix_poll``
sets ``EPOLLIN | EPOLLRDHUP`` once ``RCV_SHUTDOWN`` is set). Given the listener's fd,
``accept_burst`` checks for that (``_unix.listener_shut_down``) when the queue was empty at the
first try, and reports it as fatal (``ESHUTDOWN``).

A burst in which *every* attempt failed with a transient error is not about one client (a
seccomp filter or an LSM can fail every ``accept4`` the same way, leaving the queue as it is):
``accept_burst`` reports it as a resource failure, so the loop pauses instead of spinning.

Sans-loop: the callers own their readers and timers; this module only calls ``accept`` and
decides.
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from .._core._fd import close_raw
from ._unix import listener_shut_down

__all__ = [
    "RESOURCE_ERRNOS",
    "RETRY_DELAY",
    "TRANSIENT_ERRNOS",
    "AcceptErrorKind",
    "AcceptFailure",
    "ResourcePause",
    "accept_burst",
    "accepted_kind",
    "classify_accept_error",
    "sockets_of",
]

T = TypeVar("T")


def _errnos(*names: str) -> frozenset[int]:
    # Some names exist only on some platforms (ENONET, ENOSR are Linux's).
    return frozenset(getattr(errno, name) for name in names if hasattr(errno, name))


#: ``accept(2)`` errors about one pending client: skip it and accept the next. The network
#: errors are those Linux's ``accept(2)`` lists as "already-pending network errors on the new
#: socket", to be treated "like EAGAIN by retrying".
TRANSIENT_ERRNOS = _errnos(
    "ECONNABORTED",
    "ECONNRESET",
    "EINTR",
    "EPERM",
    "EPROTO",
    "ETIMEDOUT",
    "ENETDOWN",
    "ENETUNREACH",
    "EHOSTDOWN",
    "EHOSTUNREACH",
    "ENONET",
    "ENOPROTOOPT",
    "EOPNOTSUPP",
)
#: ``accept(2)`` errors about this process's or the system's resources: pause, then retry.
RESOURCE_ERRNOS = _errnos("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "ENOSR")

#: Seconds between tries while accepting fails for lack of resources.
RETRY_DELAY = 0.1


class AcceptErrorKind(enum.Enum):
    """What an ``accept()`` error means for the loop that got it."""

    #: One pending client is gone: go on with the next.
    TRANSIENT = "transient"
    #: Out of fds or memory: stop reading the listener, retry after `RETRY_DELAY`.
    RESOURCE = "resource"
    #: The listener is broken for good: stop serving it.
    FATAL = "fatal"


def classify_accept_error(exc: OSError) -> AcceptErrorKind:
    """The kind of the error ``accept()`` raised (``EAGAIN`` is not an error: never passed)."""
    code = exc.errno
    if code in TRANSIENT_ERRNOS:
        return AcceptErrorKind.TRANSIENT
    if code in RESOURCE_ERRNOS:
        return AcceptErrorKind.RESOURCE
    return AcceptErrorKind.FATAL


class AcceptFailure(NamedTuple):
    """Why `accept_burst` stopped before the queue was empty (a resource or fatal error)."""

    kind: AcceptErrorKind
    error: OSError


def accept_burst(
    accept: Callable[[], T], limit: int, into: list[T], fd: int | None = None
) -> AcceptFailure | None:
    """Call ``accept()`` up to ``limit`` times, appending what it returns to ``into``.

    Stops early when the kernel's queue is empty (``EAGAIN``). Transient errors skip their
    client; a resource or fatal error ends the burst and is returned, with what was accepted
    before it already in ``into``. A burst of nothing but transient errors is returned as a
    resource failure (see the module's docstring).

    Args:
        accept: A non-blocking listener's ``accept`` (``sock.accept``, or ``sock._accept``
            for ``(fd, address)`` without a socket object).
        limit: The most clients to take now (so that one busy listener cannot starve others).
        into: Where the accepted clients go; the caller owns them, even if this raises.
        fd: The listener's fd: if its queue was empty at the first try, it is polled for
            ``POLLRDHUP`` (shut down underneath the loop), reported as a fatal failure.

    Returns:
        ``None`` if the burst ended at ``EAGAIN`` or at ``limit``, else the failure.
    """
    append = into.append
    transient = 0
    last: OSError | None = None
    for tries in range(limit):
        try:
            append(accept())
        except BlockingIOError:
            if not tries and fd is not None and listener_shut_down(fd):
                shut = OSError(errno.ESHUTDOWN, "the listening socket was shut down")
                return AcceptFailure(AcceptErrorKind.FATAL, shut)
            return None
        except OSError as exc:
            if exc.errno in TRANSIENT_ERRNOS:
                transient += 1
                last = exc
                continue
            kind = (
                AcceptErrorKind.RESOURCE if exc.errno in RESOURCE_ERRNOS else AcceptErrorKind.FATAL
            )
            return AcceptFailure(kind, exc)
    if transient == limit and last is not None:
        return AcceptFailure(AcceptErrorKind.RESOURCE, last)
    return None


#: ``socket.socket``'s type flag for a non-blocking fd (0 where there is none: setblocking).
_NONBLOCK: int = getattr(socket, "SOCK_NONBLOCK", 0)

#: What `sockets_of` makes sockets of: (family, type, proto).
SocketKind = tuple[int, int, int]


def accepted_kind(listener: socket.socket) -> SocketKind | None:
    """The ``(family, type, proto)`` of the sockets `sockets_of` makes for ``listener``'s
    clients (ints, computed once: ``socket.family`` and ``.type`` build enums on each read).

    ``None`` for an instance of a subclass of ``socket.socket``: its own ``accept()`` is
    called (the Python burst), never bypassed by the C one.
    """
    if type(listener) is not socket.socket:
        return None
    return int(listener.family), int(listener.type) | _NONBLOCK, listener.proto


def sockets_of(fds: list[int], kind: SocketKind) -> list[socket.socket]:
    """Socket objects for the fds the C burst (``_accel.accept_into``) accepted.

    The fds are non-blocking (``accept4(SOCK_NONBLOCK)``) and their objects say so (timeout
    0). If one cannot be made, every fd of ``fds`` is closed before the error propagates: each
    was the caller's, and no object would be left to close it.
    """
    family, kind_type, proto = kind
    socks: list[socket.socket] = []
    try:
        for fd in fds:
            sock = socket.socket(family, kind_type, proto, fd)
            socks.append(sock)
            if not _NONBLOCK:
                sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        close_raw(fds[len(socks) :])
        raise
    return socks


class ResourcePause:
    """The log of one listener's (or one loop's) resource episodes: one line when accepting
    starts failing for lack of resources, one when it works again, nothing per retry.

    Args:
        logger: Where the two lines go (the start at ERROR, the end at WARNING).
        what: Names the loop in those lines (e.g. ``"the acceptor"``).
    """

    __slots__ = ("_logger", "_since", "_what", "active", "episodes", "failures")

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._since = 0.0
        #: True between a resource failure and the next burst that did not fail (an
        #: attribute, not a property: accept loops read it on every wake-up).
        self.active = False
        #: Episodes so far (each one logged once).
        self.episodes = 0
        #: Failed tries in the current episode.
        self.failures = 0

    def failed(self, exc: OSError) -> float:
        """Record a resource failure; return the seconds to wait before trying again."""
        self.failures += 1
        if not self.active:
            self.active = True
            self._since = time.monotonic()
            self.episodes += 1
            self._logger.error(
                "%s cannot accept (%s): clients wait in the listen backlog; retrying every "
                "%d ms until it works (free fds or memory, or raise RLIMIT_NOFILE)",
                self._what,
                exc,
                RETRY_DELAY * 1000,
            )
        return RETRY_DELAY

    def recovered(self) -> None:
        """A burst went through without a resource failure: end the episode (if any)."""
        if not self.active:
            return
        self.active = False
        self._logger.warning(
            "%s accepts again after %d failed tries over %.1f s",
            self._what,
            self.failures,
            time.monotonic() - self._since,
        )
        self.failures = 0
