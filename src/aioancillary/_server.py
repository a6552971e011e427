"""Entry points: ``open_unix_connection``, ``start_unix_server``, ``connection_pair``."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from ._cmsg import Credentials
from ._connection import DEFAULT_MAX_QUEUED_BYTES, AncillaryConnection
from ._errors import ConnectionClosedError, PeerRejectedError
from ._framing import DEFAULT_MAX_FRAME_SIZE
from ._peercred import peer_credentials

__all__ = [
    "AncillaryServer",
    "Authorize",
    "Handler",
    "connection_pair",
    "open_unix_connection",
    "start_unix_server",
]

logger = logging.getLogger("aioancillary")

#: ``authorize(credentials) -> bool``: decides, before any fd moves, whether a peer may talk.
#: ``credentials`` is ``None`` where the platform cannot tell.
Authorize = Callable[[Credentials | None], bool]
#: ``async def handler(conn)``: serves one accepted connection; it is closed when this returns.
Handler = Callable[[AncillaryConnection], Awaitable[None]]

_PathArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def _is_abstract(path: str | bytes) -> bool:
    # Linux abstract namespace (unix(7)): a leading NUL byte, no file in the filesystem.
    return len(path) > 0 and path[0] in ("\0", 0)


def _check_peer(sock: socket.socket, authorize: Authorize | None) -> None:
    if authorize is None:
        return
    creds = peer_credentials(sock)
    if not authorize(creds):
        raise PeerRejectedError(
            f"peer {creds} was refused by the authorize callback; the connection was closed "
            "before any fd was exchanged"
        )


def _connection(
    sock: socket.socket,
    framed: bool | None,
    max_message_size: int,
    max_queued_bytes: int,
    max_queued_fds: int | None,
) -> AncillaryConnection:
    return AncillaryConnection(
        sock,
        framed=framed,
        max_message_size=max_message_size,
        max_queued_bytes=max_queued_bytes,
        max_queued_fds=max_queued_fds,
    )


async def open_unix_connection(
    path: _PathArg | None = None,
    *,
    sock: socket.socket | None = None,
    sock_type: int = socket.SOCK_STREAM,
    framed: bool | None = None,
    authorize: Authorize | None = None,
    max_message_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    max_queued_fds: int | None = None,
) -> AncillaryConnection:
    """Connect to a Unix socket at ``path``, or wrap the connected socket ``sock``.

    A listener whose backlog is full makes ``connect()`` fail with EAGAIN; the connection is
    then retried with a capped backoff until it goes through, so wrap the call in
    ``asyncio.timeout()`` to bound the wait.

    Args:
        path: Filesystem path, or a Linux abstract name starting with ``"\\0"``.
        sock: An already-connected AF_UNIX socket (e.g. inherited from a parent process); the
            connection takes ownership of it.
        sock_type: ``SOCK_STREAM`` (default), ``SOCK_SEQPACKET`` or ``SOCK_DGRAM`` (with
            ``path``).
        framed: Message framing on SOCK_STREAM (default ``True``); ``False`` for peers that do
            not frame (stdlib ``socket.send_fds``, anyio, C programs).
        authorize: Called with the peer's credentials before anything is exchanged; a false
            result closes the socket and raises :class:`PeerRejectedError`.
        max_message_size: Largest message accepted or sent.
        max_queued_bytes: Receive-queue byte budget before reading pauses.
        max_queued_fds: Receive-queue fd budget before reading pauses (default: a quarter
            of RLIMIT_NOFILE, at most ``DEFAULT_MAX_QUEUED_FDS``, at least ``SCM_MAX_FD``).

    Example::

        conn = await open_unix_connection("/run/acceptor.sock")
        await conn.send_fds(b"hello", [some_file])

    Raises:
        PeerRejectedError: ``authorize`` refused the peer.
        OSError: the connection failed (e.g. ``FileNotFoundError``, ``ConnectionRefusedError``).
    """
    if (path is None) == (sock is None):
        raise ValueError("give exactly one of path= or sock=")
    if sock is None:
        assert path is not None
        sock = socket.socket(socket.AF_UNIX, sock_type)
        try:
            await _connect(sock, os.fspath(path))
        except BaseException:
            sock.close()
            raise
    elif sock.family != socket.AF_UNIX:
        raise ValueError(f"sock must be an AF_UNIX socket, got {sock.family!r}")
    try:
        _check_peer(sock, authorize)
        return _connection(sock, framed, max_message_size, max_queued_bytes, max_queued_fds)
    except BaseException:
        sock.close()  # unread fds the peer may have sent are closed by the kernel with it
        raise


async def _connect(sock: socket.socket, path: str | bytes) -> None:
    # Not loop.sock_connect: a non-blocking AF_UNIX connect() fails with EAGAIN when the
    # listener's backlog is full, with nothing in progress, and the socket polls writable,
    # so sock_connect would report a connection that does not exist. Nothing signals room in
    # the backlog either: retry with a capped backoff (wrap in asyncio.timeout to bound it).
    sock.setblocking(False)
    delay = 0.001
    while True:
        try:
            sock.connect(path)
        except (BlockingIOError, InterruptedError):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        except OSError as exc:
            if exc.errno != errno.EISCONN:  # a kernel that did connect asynchronously
                raise
            return
        else:
            return


async def connection_pair(
    sock_type: int = socket.SOCK_STREAM,
    *,
    framed: bool | None = None,
    max_message_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    max_queued_fds: int | None = None,
) -> tuple[AncillaryConnection, AncillaryConnection]:
    """Return two connected :class:`AncillaryConnection` objects over a ``socketpair``.

    Example::

        a, b = await connection_pair()
        await a.send_fds(b"pipe", [r])
        msg = await b.recv()
    """
    left, right = socket.socketpair(socket.AF_UNIX, sock_type)
    try:
        a = _connection(left, framed, max_message_size, max_queued_bytes, max_queued_fds)
    except BaseException:
        left.close()
        right.close()
        raise
    try:
        b = _connection(right, framed, max_message_size, max_queued_bytes, max_queued_fds)
    except BaseException:
        a.abort()
        right.close()
        raise
    return a, b


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
            raise
    finally:
        probe.close()
    raise OSError(
        errno.EADDRINUSE,
        "a server is already listening on this path; stop it or choose another path",
        os.fsdecode(path),
    )


def _listen(path: str | bytes, sock_type: int, mode: int, backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, sock_type)
    try:
        if _is_abstract(path):
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
    except BaseException:
        sock.close()
        raise
    return sock


class AncillaryServer:
    """A listening Unix socket that serves each connection with a handler task.

    Made by :func:`start_unix_server`. Like :class:`asyncio.Server`: :meth:`close`,
    :meth:`wait_closed`, :meth:`serve_forever`, and ``async with``.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        *,
        path: str | bytes | None,
        authorize: Authorize | None,
        options: dict[str, Any],
    ) -> None:
        """Serve the listening ``sock``; use :func:`start_unix_server` instead."""
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = sock
        self._handler = handler
        self._authorize = authorize
        self._options = options
        self._path = path
        self._inode = os.stat(path).st_ino if path is not None else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[AncillaryConnection] = set()
        self._closed = self._loop.create_future()
        self._accepting = True
        self._loop.add_reader(sock.fileno(), self._on_accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening socket (empty once closed); send it to a successor to hand over."""
        return () if self._sock is None else (self._sock,)

    def is_serving(self) -> bool:
        """True while the server accepts connections."""
        return self._sock is not None

    def _on_accept(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(64):
            try:
                conn_sock, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds: stop accepting for a moment instead of spinning on the
                    # readiness callback; pending clients wait in the backlog.
                    logger.error("accept failed (%s); retrying in 100 ms", exc)
                    self._loop.remove_reader(sock.fileno())
                    self._loop.call_later(0.1, self._resume_accepting)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            self._serve(conn_sock)

    def _resume_accepting(self) -> None:
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_accept)

    def _serve(self, conn_sock: socket.socket) -> None:
        try:
            _check_peer(conn_sock, self._authorize)
            conn = _connection(conn_sock, **self._options)
        except PeerRejectedError as exc:
            conn_sock.close()  # any fds the peer already sent are closed by the kernel
            logger.warning("%s", exc)
            return
        except BaseException:
            conn_sock.close()
            raise
        self._conns.add(conn)
        task = self._loop.create_task(self._run_handler(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, conn: AncillaryConnection) -> None:
        try:
            async with conn:
                await self._handler(conn)
        except ConnectionClosedError as exc:
            # The peer left, or the server closed its clients: not a failure of the server.
            logger.debug("connection handler ended: %s", exc)
        except Exception as exc:  # a failing handler must not stop the server
            self._loop.call_exception_handler(
                {"message": "aioancillary connection handler failed", "exception": exc}
            )
        finally:
            self._conns.discard(conn)

    def close(self, *, unlink: bool = True) -> None:
        """Stop listening. Running handlers go on; see :meth:`close_clients`.

        Args:
            unlink: Remove the socket file this server created (if it is still the same
                file). Pass ``False`` after handing the listening socket to a successor.
        """
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self._loop.remove_reader(sock.fileno())
        sock.close()
        if unlink and self._path is not None and not _is_abstract(self._path):
            with contextlib.suppress(OSError):
                if os.stat(self._path).st_ino == self._inode:
                    os.unlink(self._path)
        if not self._closed.done():
            self._closed.set_result(None)

    def close_clients(self) -> None:
        """Close every open connection (queued outgoing messages are still sent)."""
        for conn in list(self._conns):
            conn.close()

    def abort_clients(self) -> None:
        """Abort every open connection at once."""
        for conn in list(self._conns):
            conn.abort()

    async def wait_closed(self) -> None:
        """Wait until the server is closed and every handler has returned."""
        await asyncio.shield(self._closed)
        while True:
            # Only unfinished tasks: a finished one leaves the set in a done callback that
            # may not have run yet (and gather() over finished tasks completes without
            # yielding on 3.12+, which would spin here).
            pending = [task for task in self._tasks if not task.done()]
            if not pending:
                return
            await asyncio.wait(pending)

    async def serve_forever(self) -> None:
        """Serve until cancelled (or until :meth:`close`); cancelling closes the server."""
        try:
            await asyncio.shield(self._closed)
        except asyncio.CancelledError:
            self.close()
            raise

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        self.close_clients()
        await self.wait_closed()

    def __repr__(self) -> str:
        where = self._path if self._path is not None else "inherited socket"
        return f"<AncillaryServer {where!r} serving={self.is_serving()}>"


async def start_unix_server(
    handler: Handler,
    path: _PathArg | None = None,
    *,
    sock: socket.socket | None = None,
    sock_type: int = socket.SOCK_STREAM,
    framed: bool | None = None,
    mode: int = 0o600,
    backlog: int = 128,
    authorize: Authorize | None = None,
    max_message_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    max_queued_fds: int | None = None,
) -> AncillaryServer:
    """Listen on ``path`` (or the listening ``sock``) and run ``handler(conn)`` per connection.

    The socket file is created with permissions ``mode`` (default ``0o600``: owner only); a
    stale socket file left by a dead server is replaced, a live one or a non-socket file is
    refused. Paths starting with ``"\\0"`` are Linux abstract names (no file). Each connection
    is closed when its handler returns.

    Args:
        handler: ``async def handler(conn: AncillaryConnection) -> None``.
        path: Where to listen.
        sock: A listening AF_UNIX socket instead (e.g. inherited from a predecessor).
        sock_type: ``SOCK_STREAM`` (default) or ``SOCK_SEQPACKET`` (with ``path``).
        framed: As for :func:`open_unix_connection`.
        mode: Permissions of the socket file.
        backlog: ``listen()`` backlog.
        authorize: Called with each peer's credentials on accept; refused peers are
            disconnected before any fd moves.
        max_message_size: As for :func:`open_unix_connection`.
        max_queued_bytes: As for :func:`open_unix_connection`.
        max_queued_fds: As for :func:`open_unix_connection`.

    Example::

        async def handler(conn):
            async for msg in conn:
                with msg:
                    ...

        async with await start_unix_server(handler, "/run/worker.sock") as server:
            await server.serve_forever()
    """
    if (path is None) == (sock is None):
        raise ValueError("give exactly one of path= or sock=")
    fspath: str | bytes | None = None
    if sock is None:
        assert path is not None
        fspath = os.fspath(path)
        sock = _listen(fspath, sock_type, mode, backlog)
        if _is_abstract(fspath):
            fspath = None
    else:
        if sock.family != socket.AF_UNIX:
            raise ValueError(f"sock must be an AF_UNIX socket, got {sock.family!r}")
        sock.setblocking(False)
    options: dict[str, Any] = {
        "framed": framed,
        "max_message_size": max_message_size,
        "max_queued_bytes": max_queued_bytes,
        "max_queued_fds": max_queued_fds,
    }
    try:
        return AncillaryServer(sock, handler, path=fspath, authorize=authorize, options=options)
    except BaseException:
        sock.close()
        raise
