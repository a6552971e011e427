"""Unix socket plumbing for the entry points: listen, and checking a caller's socket.

Errors at bind and connect name the path; a socket handed in with ``sock=`` that cannot work
(not AF_UNIX, not connected, listening when a connection is wanted, or the reverse) is refused
with a message that says what was expected.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import stat
import sys

from .._core._errors import PeerRejectedError
from ._authorize import Authorize, UnprotectedOnly
from ._peercred import peer_credentials

__all__ = [
    "Authorize",
    "PathArg",
    "check_connected",
    "check_listening",
    "check_peer",
    "is_abstract",
    "listen",
    "listener_shut_down",
    "named_error",
    "policy_for",
    "set_socket_mode",
]

PathArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]
_LISTENABLE = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)


def is_abstract(path: str | bytes) -> bool:
    """True for a Linux abstract name (``unix(7)``: a leading NUL byte, no file)."""
    return len(path) > 0 and path[0] in ("\0", 0)


def named_error(exc: OSError, path: str | bytes) -> OSError:
    """``exc`` with the path in its message (``connect``/``bind`` leave it out)."""
    if exc.filename is not None:
        return exc
    return OSError(exc.errno, exc.strerror, os.fsdecode(path))  # the errno's own subclass


def policy_for(
    authorize: Authorize | None, path: str | bytes | None, sock: socket.socket | None
) -> Authorize | None:
    """The policy an entry point applies: ``authorize`` as given, except for a default
    (`UnprotectedOnly`), which applies where no file permission protects the socket (an
    abstract name, or a ``sock=`` whose file mode someone else chose) and nowhere else."""
    if not isinstance(authorize, UnprotectedOnly):
        return authorize
    if sock is not None or (path is not None and is_abstract(path)):
        return authorize.policy
    return None


def check_peer(sock: socket.socket, authorize: Authorize | None) -> None:
    """Run ``authorize`` on the peer's credentials.

    Raises:
        PeerRejectedError: ``authorize`` returned a false value.
    """
    if authorize is None:
        return
    creds = peer_credentials(sock)
    if not authorize(creds):
        raise PeerRejectedError(
            f"peer {creds} was refused by the authorize callback; the connection was closed "
            "before any fd was exchanged"
        )


def check_connected(sock: socket.socket) -> None:
    """Refuse a socket that cannot carry a connection (the caller keeps it).

    Raises:
        ValueError: not AF_UNIX, listening, or not connected.
    """
    if sock.family != socket.AF_UNIX:
        raise ValueError(f"sock must be an AF_UNIX socket, got {sock.family!r}")
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ValueError(
            "sock is a listening socket: pass a connected one (from connect(), accept() or "
            "socketpair()), or serve it with start_unix_server(sock=...)"
        )
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        raise ValueError(
            "sock is not connected: connect it first, or pass the path instead of sock="
        ) from None


def check_listening(sock: socket.socket) -> None:
    """Refuse a socket a server cannot accept on (the caller keeps it).

    Raises:
        ValueError: not AF_UNIX, not SOCK_STREAM/SOCK_SEQPACKET, or not listening.
    """
    if sock.family != socket.AF_UNIX:
        raise ValueError(f"sock must be an AF_UNIX socket, got {sock.family!r}")
    if sock.type not in _LISTENABLE:
        raise ValueError(
            f"sock must be a SOCK_STREAM or SOCK_SEQPACKET socket to accept on, got {sock.type!r}"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ValueError(
            "sock is not listening: bind() and listen() it first (or pass a path), or use "
            "open_unix_connection(sock=...) for a connected socket"
        )


_POLLRDHUP = getattr(select, "POLLRDHUP", 0)


def listener_shut_down(sock: socket.socket | int) -> bool:
    """After a wake-up that found nothing to accept: was the listening socket (or fd) shut down?

    ``shutdown()`` on a listening AF_UNIX socket makes the poller report it readable for good
    (``unix_poll``: ``EPOLLIN | EPOLLRDHUP`` once ``RCV_SHUTDOWN`` is set) while ``accept()``
    finds nothing (``EAGAIN``) and ``connect()`` to it is refused: a readiness callback would
    run again at once, forever. A listening socket reports ``POLLRDHUP`` only then (Linux;
    elsewhere this says False).
    """
    if not _POLLRDHUP:
        return False
    poller = select.poll()
    poller.register(sock, _POLLRDHUP)
    return bool(poller.poll(0))


def _remove_stale(path: str | bytes) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(
            errno.EEXIST,
            "refusing to replace a file that is not a socket; remove it or choose another path",
            os.fsdecode(path),
        )
    # Non-blocking: a live server with a full backlog would block a blocking connect() (and
    # the event loop with it) until it accepts.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: a stale file left by a crashed server
        return
    except (BlockingIOError, InterruptedError):
        pass  # EAGAIN: a live server whose backlog is full
    except OSError as exc:
        if exc.errno != errno.EPROTOTYPE:  # EPROTOTYPE: a live seqpacket/dgram server
            raise named_error(exc, path) from None
    finally:
        probe.close()
    raise OSError(
        errno.EADDRINUSE,
        "a server is already listening on this path; stop it or choose another path",
        os.fsdecode(path),
    )


def listen(path: str | bytes, sock_type: int, mode: int, backlog: int) -> socket.socket:
    """A non-blocking socket listening on ``path``, its file created with permissions ``mode``.

    A stale socket file left by a dead server is replaced; a live server's path, or a file
    that is not a socket, is refused. The process umask is left alone (it is process-wide:
    another thread's new files would get the server's mode): ``bind()`` creates the file with
    ``0o777 & ~umask``, and `set_socket_mode` sets ``mode`` before ``listen()``. Until
    ``listen()``, ``connect()`` to the file is refused (``ECONNREFUSED``: ``unix(7)``,
    ``unix_stream_connect`` wants a listening socket), so the file's mode before that lets
    nobody in.

    Raises:
        OSError: binding failed, or the socket file was replaced before its mode was set;
            the message names the path.
    """
    sock = socket.socket(socket.AF_UNIX, sock_type)
    try:
        if is_abstract(path):
            sock.bind(path)
        else:
            _remove_stale(path)
            sock.bind(path)
            set_socket_mode(sock, path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise named_error(exc, path) from None
    except BaseException:
        sock.close()
        raise
    return sock


def set_socket_mode(sock: socket.socket, path: str | bytes, mode: int) -> None:
    """Give the socket file that ``sock`` was just bound to at ``path`` the permissions ``mode``.

    Never through the path: ``chmod(path)`` follows a symlink, so another user who can write
    the directory could swap the new socket for a link and have a file of ours changed (and
    ``fchmod`` on the socket fd changes the socket's own inode, not the file). The file is
    opened as itself (``O_PATH``): the very inode the socket is bound to where the kernel
    gives it (``SIOCUNIXFILE``, Linux 4.19+ with ``CAP_NET_ADMIN``), else the path with
    ``O_NOFOLLOW`` (a link is opened as the link), checked to be the socket just made (a
    socket, ours, one link); its mode is then set through that handle
    (``/proc/self/fd/N``). Where there is no ``O_PATH`` (macOS, the BSDs),
    ``lchmod`` does not follow links either.

    Raises:
        FileExistsError: the file at ``path`` is no longer the socket just bound (another
            user swapped it): nothing was changed.
        OSError: the mode could not be set.
    """
    if not _O_PATH:
        _refuse_unless_ours(os.lstat(path), path)
        os.chmod(path, mode, follow_symlinks=False)
        return
    fd = _bound_file(sock)
    exact = fd >= 0
    if not exact:
        fd = os.open(path, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not exact:
            _refuse_unless_ours(st, path)
        os.chmod(f"/proc/self/fd/{fd}", mode)  # the open inode itself, not a path walk
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            # SIOCUNIXFILE changed our own file; the path names another one now.
            raise FileExistsError(errno.EEXIST, _REPLACED, os.fsdecode(path))
    finally:
        os.close(fd)


# The socket file at a path was swapped between bind() and setting its mode.
_REPLACED = (
    "the socket file was replaced by another file right after it was created (can another "
    "user write its directory?); its mode was not set and the server does not listen. Use a "
    "directory only this user can write"
)
_O_PATH = getattr(os, "O_PATH", 0)
_SIOCUNIXFILE = 0x89E0  # SIOCPROTOPRIVATE + 0, include/uapi/linux/un.h


def _bound_file(sock: socket.socket) -> int:
    """An ``O_PATH`` fd of the file ``sock`` is bound to (``SIOCUNIXFILE``), or -1 where the
    kernel does not give it (no ``CAP_NET_ADMIN``, an older kernel, not Linux)."""
    if sys.platform != "linux":
        return -1
    try:
        # unix_open_file: the bound dentry opened O_PATH | O_CLOEXEC; no path lookup.
        return int(fcntl.ioctl(sock.fileno(), _SIOCUNIXFILE))
    except OSError:
        return -1


def _refuse_unless_ours(st: os.stat_result, path: str | bytes) -> None:
    """Refuse a file that cannot be the socket just bound: not a socket (a symlink swapped in,
    say), another user's, or with several links (a hard link to some other socket)."""
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        raise FileExistsError(errno.EEXIST, _REPLACED, os.fsdecode(path))
