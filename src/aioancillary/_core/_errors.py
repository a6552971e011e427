"""The exception tree of aioancillary.

Every error the library raises on purpose derives from
[`AncillaryError`][aioancillary.AncillaryError]::

    AncillaryError
    ├── FdTruncatedError        fds were dropped by the kernel (MSG_CTRUNC, EMFILE)
    ├── DataTruncatedError      a datagram/seqpacket message was cut (MSG_TRUNC)
    ├── TooManyFdsError         more fds than one message may carry (also ValueError)
    ├── MessageTooLargeError    a message over max_message_size or the kernel's limit (ValueError)
    ├── InvalidFdError          an fd to send is not open (also ValueError)
    ├── CloexecError            FD_CLOEXEC could not be set on a received fd (also OSError)
    ├── FdsInFlightError        the kernel refused more fds in flight (ETOOMANYREFS; OSError)
    ├── ProtocolError           the peer broke the framing protocol (bad frame, fd count)
    ├── ConnectionClosedError   the connection is closed (also ConnectionError)
    ├── PeerRejectedError       the peer's credentials failed authorization (PermissionError)
    ├── ActivationError         LISTEN_FDS/LISTEN_PID unusable (another process's, malformed)
    ├── FdNameError             no fd (or several) under the name asked for (LookupError)
    ├── FdTypeError             the fd is not the socket asked for (TypeError)
    ├── NotifyError             NOTIFY_SOCKET set but unreachable (OSError)
    ├── HandoffError            a reload handoff failed; the old generation serves on
    │   ├── HandoffTimeoutError     a handoff step timed out (TimeoutError)
    │   └── HandoffBusyError        another upgrade is in progress: retry later
    ├── SpawnError              a program could not be started with its named fds (OSError)
    ├── FdHolderError           the fd holder refused a request, or broke its protocol
    │   ├── FdHolderRefusedError    the holder does not admit this process (PermissionError)
    │   ├── FdHolderNotFoundError   no entry of that name (LookupError)
    │   ├── FdHolderExistsError     an entry of that name is already stored
    │   └── FdHolderFullError       the holder's store is at its bound (entries or fds)
    ├── WorkerStartError        a pool's worker process exited or hung before it was ready
    └── AppStartupError         an application served in a worker failed its startup

Whenever one of these is raised on the receive path, every fd that arrived with the faulty
message has already been closed: catching the error never leaves an fd open in the process.
"""

from __future__ import annotations

__all__ = [
    "ActivationError",
    "AncillaryError",
    "AppStartupError",
    "CloexecError",
    "ConnectionClosedError",
    "DataTruncatedError",
    "FdHolderError",
    "FdHolderExistsError",
    "FdHolderFullError",
    "FdHolderNotFoundError",
    "FdHolderRefusedError",
    "FdNameError",
    "FdTruncatedError",
    "FdTypeError",
    "FdsInFlightError",
    "HandoffBusyError",
    "HandoffError",
    "HandoffTimeoutError",
    "InvalidFdError",
    "MessageTooLargeError",
    "NotifyError",
    "PeerRejectedError",
    "ProtocolError",
    "SpawnError",
    "TooManyFdsError",
    "WorkerStartError",
]


class AncillaryError(Exception):
    """Root of every error raised by aioancillary.

    Catch this to handle any failure of the library in one place::

        try:
            msg = recv_fds(sock, 1024, 4)
        except AncillaryError as exc:
            log.warning("fd passing failed: %s", exc)
    """


class FdTruncatedError(AncillaryError):
    """The kernel dropped file descriptors of a received message (``MSG_CTRUNC``).

    On Linux this happens when the receiver reaches ``RLIMIT_NOFILE`` (EMFILE) or a security
    module denies an fd; on macOS ``recvmsg`` fails with EMFILE instead. Every fd that did arrive
    with the message has been closed. The message's bytes are kept in `data` so that a
    framing layer can stay in sync.
    """

    def __init__(self, message: str, *, data: bytes = b"", closed_fds: int = 0) -> None:
        super().__init__(message)
        #: The bytes that came with the truncated message.
        self.data = data
        #: How many fds that did arrive were closed because of the truncation.
        self.closed_fds = closed_fds


class DataTruncatedError(AncillaryError):
    """A datagram or seqpacket message was longer than the receive buffer (``MSG_TRUNC``).

    The tail of the message is lost (the kernel discards it). Any fds that came with the message
    have been closed. Receive with a larger buffer to avoid it.
    """

    def __init__(self, message: str, *, data: bytes = b"", closed_fds: int = 0) -> None:
        super().__init__(message)
        #: The part of the message that fit in the buffer.
        self.data = data
        #: How many fds that came with the message were closed.
        self.closed_fds = closed_fds


class TooManyFdsError(AncillaryError, ValueError):
    """More file descriptors than one message may carry (``SCM_MAX_FD``, 253 on Linux/BSD)."""


class MessageTooLargeError(AncillaryError, ValueError):
    """A message to send is larger than allowed: over ``max_message_size`` (the peer would
    refuse it), or over what the kernel takes in one datagram (EMSGSIZE). Nothing was sent."""


class InvalidFdError(AncillaryError, ValueError):
    """A file descriptor given to send is not a valid open fd (negative, or EBADF)."""


class CloexecError(AncillaryError, OSError):
    """``FD_CLOEXEC`` could not be set on received fds; all of them have been closed."""


class FdsInFlightError(AncillaryError, OSError):
    """The kernel refused the send: too many fds are in flight for this user (ETOOMANYREFS).

    Linux counts fds sitting unread in Unix sockets against the sender's ``RLIMIT_NOFILE``.
    Let the peer read what is queued, or raise the limit, and send again.
    """


class ProtocolError(AncillaryError):
    """The peer broke the framing protocol: garbage, an oversized frame, or wrong fd counts.

    The connection is closed when this is raised, and every fd involved has been closed.
    """


class ConnectionClosedError(AncillaryError, ConnectionError):
    """The connection is closed (locally, or by the peer); nothing more can be sent."""


class PeerRejectedError(AncillaryError, PermissionError):
    """The peer's credentials were refused by the ``authorize`` callback; no fd was exchanged."""


class ActivationError(AncillaryError, RuntimeError):
    """The ``LISTEN_*`` variables cannot be used: meant for another process, or malformed.

    No fd was taken or closed: the process's fds 3 and up are left as they were.
    """


class FdNameError(AncillaryError, LookupError):
    """No fd has the name asked for, or several do where exactly one was asked for."""


class FdTypeError(AncillaryError, TypeError):
    """The fd is not what was asked for: not a socket, or a socket of another family/type.

    The fd stays in its [`NamedFds`][aioancillary.NamedFds] (closed with it) and can still be taken
    as an [`OwnedFd`][aioancillary.OwnedFd].
    """


class NotifyError(AncillaryError, OSError):
    """``$NOTIFY_SOCKET`` is set but no notification can be delivered there.

    The address is malformed, nothing listens at it, or the send failed; ``errno`` is the
    system's reason where there is one.
    """


class HandoffError(AncillaryError, ConnectionError):
    """A reload handoff failed. The running generation keeps serving; retry, or exit."""


class HandoffTimeoutError(HandoffError, TimeoutError):
    """A handoff step did not complete in time (the peer is stuck or too slow)."""


class HandoffBusyError(HandoffError):
    """The running generation refused the upgrade for now: another successor is taking over,
    or its own predecessor is still draining. Nothing was taken; retry a little later."""


class SpawnError(AncillaryError, OSError):
    """A program could not be started with its named fds
    ([`spawn_with_fds`][aioancillary.spawn_with_fds]).

    The exec wrapper did not start, did not come for its fds in time, or died before running
    the program. The child was killed and reaped; the caller's fds are untouched.
    """


class FdHolderError(AncillaryError):
    """The fd holder refused a request, or the peer broke the fd holder protocol.

    Every fd the request involved has been closed on the side that refused it (the holder
    closes fds it was sent with a refused store). ``code`` is the protocol's error code
    (``"not-found"``, ``"full"``...), ``"protocol"`` when the peer's answer made no sense, or
    ``"closed"`` when the connection ended.
    """

    def __init__(self, message: str, *, code: str = "protocol") -> None:
        super().__init__(message)
        #: The fd holder protocol's error code (see ``docs/reference/protocol.md``).
        self.code = code


class FdHolderRefusedError(FdHolderError, PermissionError):
    """The holder does not admit this process: its credentials (``SO_PEERCRED``) are not
    among the admitted ones, or the socket file's permissions keep it out. No fd moved."""


class FdHolderNotFoundError(FdHolderError, LookupError):
    """The holder has no entry of that name (never stored, deleted, expired, or retrieved
    with ``delete=True``)."""


class FdHolderExistsError(FdHolderError):
    """An entry of that name is already stored: names are unique. Delete it first (or
    retrieve it with ``delete=True``). The holder closed the fds sent with the refused store."""


class FdHolderFullError(FdHolderError):
    """The store is at its bound (``--max-entries`` or ``--max-fds``). The holder closed the
    fds sent with the refused store; delete entries, or run the holder with higher bounds."""


class WorkerStartError(AncillaryError, RuntimeError):
    """A [`WorkerPool`][aioancillary.WorkerPool] worker process exited, or did not become ready in
    time, before it registered with the acceptor (its main failed: an import error, a failing
    startup).

    The workers already serving go on (a failed reload keeps the old ones). The worker's own
    error is on its stderr, which it shares with the pool's process.

    Attributes:
        exit_status: The worker's exit status (negative: the signal that ended it), or
            ``None`` when it was still running at the deadline (it was killed then).
    """

    def __init__(self, message: str, exit_status: int | None = None) -> None:
        super().__init__(message)
        self.exit_status = exit_status


class AppStartupError(AncillaryError, RuntimeError):
    """An application served in a worker failed its startup (an ASGI lifespan startup that
    failed, an aiohttp ``on_startup`` handler that raised): the worker cannot serve it.

    The application's own error is logged (or chained as ``__cause__``).
    """
