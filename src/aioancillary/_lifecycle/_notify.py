"""``sd_notify``: tell the service manager about state changes, and park fds in its fd store.

The protocol (``sd_notify(3)``): one ``SOCK_DGRAM`` datagram to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (a filesystem path, or an abstract name written with a leading ``@``),
holding newline-separated ``VARIABLE=value`` assignments such as ``READY=1``. A datagram may
carry fds (``SCM_RIGHTS``) with ``FDSTORE=1``: the manager keeps them across restarts of the
service (``FileDescriptorStoreMax=``) and passes them back at the next start through
``LISTEN_FDS``, named by ``FDNAME=`` (see `aioancillary.listen_fds`).

The fds go through the library's blocking `aioancillary.send_fds` on a socket connected
to the manager's, so they are validated, capped and translated to library errors like every
other send. They go only to a socket file of root or of this process's user (the user who
binds a socket file owns it, and a service manager's is one of those): never to an abstract
name, which any local process may have bound first. Outside a service manager (no
``$NOTIFY_SOCKET``) every call is a no-op returning ``False``, so the same code runs under
systemd and in a terminal.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, TypeGuard

from .._core._errors import AncillaryError, InvalidFdError, NotifyError, TooManyFdsError
from .._core._fd import FdLike, fd_number
from .._core._platform import SCM_MAX_FD
from .._kernel._blocking import send_fds
from .._kernel._fork import track
from ._systemd import check_fdname

__all__ = ["NotifyError", "notify", "notify_async", "watchdog_interval"]

_VARIABLE = re.compile(r"[A-Z][A-Z0-9_]*\Z")


def _value(name: str, value: object) -> str:
    text = str(value)
    if "\n" in text or "\0" in text:
        raise ValueError(
            f"{name} value {text!r} contains a newline or NUL: it would end the assignment "
            "early (sd_notify separates assignments with newlines); remove it"
        )
    return text


def _monotonic_usec() -> int:
    # The reload timestamp systemd compares with its own CLOCK_MONOTONIC (Type=notify-reload).
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _build(
    *,
    ready: bool,
    reloading: bool,
    stopping: bool,
    status: str | None,
    watchdog: bool,
    mainpid: int | None,
    fdstore: Sequence[FdLike],
    fdname: str | None,
    fdstore_remove: bool,
    fdpoll: bool,
    extra: Mapping[str, object] | None,
) -> tuple[bytes, list[int]]:
    """Validate the arguments and return the datagram's bytes and the fd numbers to send."""
    fds = [fd_number(fd) for fd in fdstore]
    if len(fds) > SCM_MAX_FD:
        raise TooManyFdsError(
            f"one notification carries at most {SCM_MAX_FD} fds (SCM_MAX_FD), got {len(fds)}: "
            "store them in several calls"
        )
    for num in fds:
        # Checked now, before the notification socket is opened: it could take the number of
        # an fd the caller already closed, and send itself to the manager in its place.
        try:
            os.fstat(num)
        except OSError as exc:
            raise InvalidFdError(
                f"cannot store fd {num}: {exc.strerror}; nothing was sent"
            ) from exc
    if fdname is not None:
        check_fdname(fdname)
        if not fds and not fdstore_remove:
            raise ValueError("fdname= names fds to store (fdstore=) or to remove (fdstore_remove=)")
    if fdstore_remove and (fdname is None or fds):
        raise ValueError("fdstore_remove=True needs fdname= (the fds to drop) and no fdstore=")
    if not fdpoll and not fds:
        raise ValueError("fdpoll=False applies to fds being stored: pass them in fdstore=")
    if mainpid is not None and mainpid <= 0:
        raise ValueError(f"mainpid must be a positive pid, got {mainpid}")
    lines: list[str] = []
    if ready:
        lines.append("READY=1")
    if reloading:
        lines += ["RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}"]
    if stopping:
        lines.append("STOPPING=1")
    if status is not None:
        lines.append(f"STATUS={_value('STATUS', status)}")
    if watchdog:
        lines.append("WATCHDOG=1")
    if mainpid is not None:
        lines.append(f"MAINPID={mainpid}")
    if fds:
        lines.append("FDSTORE=1")
    if fdstore_remove:
        lines.append("FDSTOREREMOVE=1")
    if fdname is not None:
        lines.append(f"FDNAME={fdname}")
    if not fdpoll:
        lines.append("FDPOLL=0")
    for name, value in (extra or {}).items():
        if not _VARIABLE.match(name):
            raise ValueError(
                f"extra variable name {name!r}: sd_notify variables are upper-case letters, "
                "digits and '_' (e.g. ERRNO, EXTEND_TIMEOUT_USEC)"
            )
        lines.append(f"{name}={_value(name, value)}")
    if not lines:
        raise ValueError("nothing to notify: pass ready=True, status=..., fdstore=... or extra=")
    return "\n".join(lines).encode(), fds


def _prepare(
    environ: Mapping[str, str] | None, **fields: Any
) -> tuple[bytes, list[int], str | None]:
    """The datagram, its fds and the manager's address (None: not under a manager)."""
    data, fds = _build(**fields)
    return data, fds, _address(os.environ if environ is None else environ)


def _address(env: Mapping[str, str]) -> str | None:
    """The AF_UNIX address of ``$NOTIFY_SOCKET`` (abstract names with a leading NUL), or None."""
    value = env.get("NOTIFY_SOCKET")
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # unix(7): an abstract name starts with a NUL byte
    raise NotifyError(
        f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an @abstract name (the "
        "AF_UNIX forms sd_notify(3) defines; vsock addresses are not supported): fix or unset it"
    )


def _shown(address: str) -> str:
    return "@" + address[1:] if address.startswith("\0") else address


#: ``sizeof(sun_path)`` on Linux (``unix(7)``): an address that does not fit cannot be used.
_SUN_PATH_MAX = 108
#: ``open(2)``'s O_PATH (Linux): a reference to a file that can be checked and connected to.
_O_PATH: int = getattr(os, "O_PATH", 0)
#: Where an open fd has a name that ``connect(2)`` follows to its file.
_PROC_FDS = "/proc/self/fd"


def _socket_error(exc: BaseException) -> TypeGuard[OSError]:
    """True when ``exc`` is the notification socket's own error, raised by a system call.

    Anything else passes through unchanged: a signal handler that raises while the blocking
    call waits (a caller bounding it with ``SIGALRM``) surfaces at the same call, but with no
    errno (a ``TimeoutError()``), or with its own frame innermost in the traceback, where a
    system call's error has the frame that made the call.
    """
    if not isinstance(exc, OSError) or exc.errno is None:
        return False
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(tb.tb_frame.f_globals.get("__name__", "")).startswith("aioancillary.")


def _check_length(address: str) -> None:
    size = len(os.fsencode(address))
    if size > _SUN_PATH_MAX:
        raise NotifyError(
            errno.ENAMETOOLONG,
            f"NOTIFY_SOCKET={_shown(address)!r} is {size} bytes long: an AF_UNIX address "
            f"holds at most {_SUN_PATH_MAX} (sun_path, unix(7)), so nothing can be sent "
            "there; use a shorter address",
        )


def _unreachable(address: str, exc: OSError) -> NotifyError:
    return NotifyError(
        exc.errno,
        f"NOTIFY_SOCKET={_shown(address)!r} is unreachable ({exc.strerror}): the service "
        "manager is gone or the variable is stale; unset NOTIFY_SOCKET when not running "
        "under systemd",
    )


def _connected(target: str, address: str, *, blocking: bool) -> socket.socket:
    """A datagram socket connected to ``target`` (``address``, or a name of the same file)."""
    _check_length(target)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec, like SOCK_CLOEXEC
    try:
        sock.setblocking(blocking)
        # A connected datagram socket lets send_fds (which takes no address) reach the manager,
        # and turns "nobody listens there" into an error now (ENOENT, ECONNREFUSED).
        sock.connect(target)
    except OSError as exc:
        sock.close()
        if not _socket_error(exc):
            raise
        raise _unreachable(address, exc) from exc
    except BaseException:
        sock.close()
        raise
    return sock


def _check_owner(address: str, uid: int) -> None:
    if uid not in (0, os.geteuid()):
        raise NotifyError(
            f"NOTIFY_SOCKET={address!r} is a socket file of uid {uid}, not of root or of this "
            f"process's user ({os.geteuid()}), as a service manager's is: another user may "
            "have bound it to receive the fds. Nothing was sent; check the variable"
        )


def _connect(address: str, *, blocking: bool, with_fds: bool) -> socket.socket:
    """A datagram socket connected to the manager; with fds, only to one it can trust.

    The owner of a socket file is the user who bound it, so a file of root or of this user
    was bound by a manager of this service, not by another local user. An abstract name
    (``unix(7)``) has no owner: any process may bind it first, so fds never go there.
    """
    if address.startswith("\0"):
        if with_fds:
            raise NotifyError(
                f"NOTIFY_SOCKET={_shown(address)!r} is an abstract address: any local "
                "process may have bound that name first, and nothing tells who did, so fds "
                "are not sent there (systemd's notification socket is a path, "
                "/run/systemd/notify). Nothing was sent"
            )
        return _connected(address, address, blocking=blocking)
    pinned = None
    try:
        if _O_PATH and os.path.isdir(_PROC_FDS):
            # O_PATH pins the file that is checked; connecting through /proc/self/fd/N reaches
            # the socket bound to that very file (as systemd's connect_unix_path does),
            # whatever happens to the path meanwhile, and lifts sun_path's length limit.
            pinned = os.open(address, _O_PATH | os.O_CLOEXEC)
            owner = os.fstat(pinned).st_uid
        else:
            # Checked, then connected by name: replacing the file in between takes write
            # access to a directory of the path (for /run/systemd/notify, root's).
            owner = os.stat(address).st_uid
    except BaseException as exc:
        if pinned is not None:
            os.close(pinned)
        if _socket_error(exc):
            raise _unreachable(address, exc) from exc
        raise
    try:
        if with_fds:
            _check_owner(address, owner)
        target = address if pinned is None else f"{_PROC_FDS}/{pinned}"
        return _connected(target, address, blocking=blocking)
    finally:
        if pinned is not None:
            os.close(pinned)


def _send(sock: socket.socket, address: str, data: bytes, fds: list[int]) -> None:
    try:
        send_fds(sock, data, fds)
    except (AncillaryError, BlockingIOError):
        raise  # the library's own errors (a closed fd, too big) say what to do already
    except OSError as exc:
        if not _socket_error(exc):
            raise  # e.g. a caller's SIGALRM handler bounding the wait: not ours to rewrite
        raise NotifyError(
            exc.errno,
            f"sending to NOTIFY_SOCKET={_shown(address)!r} failed ({exc.strerror}): the "
            "service manager stopped listening",
        ) from exc


def notify(
    *,
    ready: bool = False,
    reloading: bool = False,
    stopping: bool = False,
    status: str | None = None,
    watchdog: bool = False,
    mainpid: int | None = None,
    fdstore: Sequence[FdLike] = (),
    fdname: str | None = None,
    fdstore_remove: bool = False,
    fdpoll: bool = True,
    extra: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Send one notification to the service manager (``sd_notify(3)``); blocking.

    The assignments are sent in one datagram, in the order of the parameters below. A full
    manager queue blocks the call, as ``sd_notify`` does; from a coroutine use
    [`notify_async`][aioancillary.notify_async].

    Example::

        notify(ready=True, status="serving on :8080")
        notify(fdstore=[state_file], fdname="state", fdpoll=False)   # park an fd
        notify(fdstore_remove=True, fdname="state")                   # drop it again

    Args:
        ready: ``READY=1``: start-up (or a reload) is complete.
        reloading: ``RELOADING=1`` with ``MONOTONIC_USEC=`` (``CLOCK_MONOTONIC`` now, in µs),
            which ``Type=notify-reload`` requires since systemd 253 (older versions ignore it).
            Send ``ready=True`` when the reload is done.
        stopping: ``STOPPING=1``: shutting down.
        status: ``STATUS=``: one line of free text shown by ``systemctl status``.
        watchdog: ``WATCHDOG=1``: the keep-alive ping (see
            [`watchdog_interval`][aioancillary.watchdog_interval]).
        mainpid: ``MAINPID=``: the service's main process is now this pid (e.g. after a
            reload into a new process; the unit needs ``NotifyAccess=all``).
        fdstore: Fds to store (``FDSTORE=1``), sent with ``SCM_RIGHTS``. Borrowed: they stay
            open here; the manager keeps its own copies. Sent only to a socket file owned by
            root or by this process's user, never to an abstract ``@name``.
        fdname: ``FDNAME=``: the name of the stored fds (systemd's default is ``"stored"``),
            or of the fds to remove. Printable ASCII without ``:``, at most 255 characters.
        fdstore_remove: ``FDSTOREREMOVE=1``: drop the stored fds named ``fdname``.
        fdpoll: ``False`` sends ``FDPOLL=0``: the manager does not drop the stored fds when
            they report ``EPOLLHUP``/``EPOLLERR`` (needed for fds that cannot be polled).
        extra: Further assignments, e.g. ``{"ERRNO": 2}`` or ``{"EXTEND_TIMEOUT_USEC": ...}``.
        environ: Where to read ``NOTIFY_SOCKET`` (default `os.environ`).

    Returns:
        ``True`` once sent; ``False`` when ``$NOTIFY_SOCKET`` is not set (not under a manager).

    Raises:
        ValueError: an argument is invalid (bad ``fdname``, a newline in ``status``...);
            nothing is sent, even outside a service manager.
        NotifyError: ``$NOTIFY_SOCKET`` is set but malformed, too long for an ``AF_UNIX``
            address, or unreachable, or the send failed: errors of the notification socket
            only; or fds were to go to an abstract address or to another user's socket file
            (nothing was sent). Anything else raised while the call waits (a
            ``TimeoutError`` from the caller's ``SIGALRM`` handler) passes through unchanged.
        InvalidFdError: an fd of ``fdstore`` is not open; nothing was sent.
        TooManyFdsError: more than 253 fds.
        MessageTooLargeError: the datagram is over the socket's size limit.
    """
    # Every parameter goes to _build, which validates all of them before anything is sent.
    data, fds, address = _prepare(**locals())
    if address is None:
        return False
    with _connect(address, blocking=True, with_fds=bool(fds)) as sock:
        _send(sock, address, data, fds)
    return True


async def notify_async(
    *,
    ready: bool = False,
    reloading: bool = False,
    stopping: bool = False,
    status: str | None = None,
    watchdog: bool = False,
    mainpid: int | None = None,
    fdstore: Sequence[FdLike] = (),
    fdname: str | None = None,
    fdstore_remove: bool = False,
    fdpoll: bool = True,
    extra: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """[`notify`][aioancillary.notify] for coroutines: never blocks the event loop.

    When the manager's queue is full the datagram waits for room (the socket polls writable
    once the manager reads) while the loop runs other tasks; wrap the call in
    ``asyncio.timeout()`` to bound that wait. Cancelling it sends nothing. The fds are
    borrowed until the call returns.

    Example::

        await notify_async(ready=True, status="serving")

    Returns and raises as [`notify`][aioancillary.notify].
    """
    # Every parameter goes to _build, which validates all of them before anything is sent.
    data, fds, address = _prepare(**locals())
    if address is None:
        return False
    loop = asyncio.get_running_loop()
    with _connect(address, blocking=False, with_fds=bool(fds)) as sock:
        while True:
            try:
                _send(sock, address, data, fds)
            except BlockingIOError:
                # unix_dgram_poll reports a connected datagram socket writable once the
                # peer's receive queue has room: wait for that, then send again.
                await _writable(loop, sock)
            else:
                return True


class _WaitingSocket:
    """A notification socket registered with the loop while its datagram waits for room.

    Fork-aware (see ``_fork``): a child that inherits the wait closes its copy of the socket
    and never touches the loop, so its loop cannot remove the parent's registration.
    """

    __slots__ = ("__weakref__", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def _forked(self) -> None:
        self.sock.close()


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    fd = sock.fileno()
    guard = _WaitingSocket(sock)
    pid = track(guard)
    loop.add_writer(fd, wake)
    try:
        await waiter
    finally:
        if os.getpid() == pid:  # a forked child's loop must not touch the parent's epoll
            loop.remove_writer(fd)


def watchdog_interval(
    *, unset_environment: bool = False, environ: MutableMapping[str, str] | None = None
) -> float | None:
    """The service watchdog timeout in seconds, or ``None`` when the watchdog is off.

    Reads ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` as ``sd_watchdog_enabled(3)`` does: a
    ``WATCHDOG_PID`` naming another process means the watchdog is not this process's
    business (``None``). Send ``notify(watchdog=True)`` at about half this interval.

    Example::

        interval = watchdog_interval()
        while interval is not None:
            await notify_async(watchdog=True)
            await asyncio.sleep(interval / 2)

    Args:
        unset_environment: Remove both variables afterwards (children do not inherit them).
        environ: The environment to read (default `os.environ`).

    Raises:
        ValueError: a variable is not a positive integer.
    """
    env = os.environ if environ is None else environ
    try:
        usec_text = env.get("WATCHDOG_USEC")
        if usec_text is None:
            return None
        usec = _positive(usec_text, "WATCHDOG_USEC")
        pid_text = env.get("WATCHDOG_PID")
        if pid_text is not None and _positive(pid_text, "WATCHDOG_PID") != os.getpid():
            return None
        return usec / 1_000_000
    finally:
        if unset_environment:
            env.pop("WATCHDOG_USEC", None)
            env.pop("WATCHDOG_PID", None)


def _positive(text: str, name: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise ValueError(f"{name}={text!r} is not a positive integer: fix or unset it")
    return int(text)
