"""Unix socket plumbing for the entry points: listen, and checking a caller's socket.

Errors at bind and connect name the path; a socket handed in with ``sock=`` that cannot work
(not AF_UNIX, not connected, listening when a connection is wanted, or the reverse) is refused
with a message that says what was expected.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable

from .._core._cmsg import Credentials
from .._core._errors import PeerRejectedError
from ._peercred import peer_credentials

__all__ = [
    "Authorize",
    "PathArg",
    "check_connected",
    "check_listening",
    "check_peer",
    "is_abstract",
    "listen",
    "named_error",
]

#: ``authorize(credentials) -> bool``: decides, before any fd moves, whether a peer may talk.
#: ``credentials`` is ``None`` where the platform cannot tell.
Authorize = Callable[[Credentials | None], bool]

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
    that is not a socket, is refused.

    Raises:
        OSError: binding failed; the message names the path.
    """
    sock = socket.socket(socket.AF_UNIX, sock_type)
    try:
        if is_abstract(path):
            sock.bind(path)
        else:
            _remove_stale(path)
            # The socket file is created by bind() with 0777 & ~umask: narrow the umask so it
            # is never, even for an instant, more open than ``mode``. umask is process-wide;
            # the window is one syscall.
            old = os.umask(0o777 & ~mode)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise named_error(exc, path) from None
    except BaseException:
        sock.close()
        raise
    return sock
