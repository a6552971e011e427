"""Client entry points: [`open_unix_connection`][aioancillary.open_unix_connection],
[`create_unix_connection`][aioancillary.create_unix_connection],
[`connection_pair`][aioancillary.connection_pair]."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TypeVar

from .._core._framing import DEFAULT_MAX_FRAME_SIZE
from .._kernel._authorize import CLIENT_DEFAULT
from .._kernel._unix import Authorize, PathArg, check_connected, check_peer, policy_for
from ._connect import connect
from ._connection import DEFAULT_MAX_QUEUED_BYTES, AncillaryConnection
from ._options import ConnectionOptions, closed_on_error, path_or_sock
from ._protocol import AncillaryProtocol, protocol_from
from ._transport import AncillaryTransport

__all__ = ["connection_pair", "create_unix_connection", "open_unix_connection"]

_P = TypeVar("_P", bound=AncillaryProtocol)


async def _connected(
    path: PathArg | None, sock: socket.socket | None, sock_type: int, authorize: Authorize | None
) -> socket.socket:
    """The connected, authorized socket: made from ``path``, or the caller's ``sock`` checked.

    The socket is the caller's (closed on failure) only once it passed the checks.
    """
    fspath = path_or_sock(path, sock)
    if sock is None:
        assert fspath is not None
        sock = socket.socket(socket.AF_UNIX, sock_type)
        with closed_on_error(sock):
            await connect(sock, fspath)
    else:
        check_connected(sock)
    with closed_on_error(sock):
        # A sock= handed in was connected by the caller, who chose its peer: the default
        # checks only a server found by an abstract name (anyone may have bound it first).
        check_peer(sock, policy_for(authorize, fspath, None))
    return sock


async def open_unix_connection(
    path: PathArg | None = None,
    *,
    sock: socket.socket | None = None,
    sock_type: int = socket.SOCK_STREAM,
    framed: bool | None = None,
    authorize: Authorize | None = CLIENT_DEFAULT,
    max_message_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    max_queued_fds: int | None = None,
    max_fds_per_send: int | None = None,
) -> AncillaryConnection:
    """Connect to a Unix socket at ``path``, or wrap the connected socket ``sock``.

    A listener whose backlog is full makes ``connect()`` fail with EAGAIN; the connection is
    then retried with a capped backoff until it goes through, so wrap the call in
    ``asyncio.timeout()`` to bound the wait.

    Args:
        path: Filesystem path, or a Linux abstract name starting with ``"\\0"``.
        sock: An already-connected AF_UNIX socket (e.g. inherited from a parent process); the
            connection takes ownership of it once it is accepted (a socket refused because
            it cannot work stays the caller's).
        sock_type: ``SOCK_STREAM`` (default), ``SOCK_SEQPACKET`` or ``SOCK_DGRAM`` (with
            ``path``).
        framed: Message framing on SOCK_STREAM (default ``True``); ``False`` for peers that do
            not frame (stdlib ``socket.send_fds``, anyio, C programs).
        authorize: Called with the peer's credentials before anything is exchanged; a false result
            closes the socket and raises [`PeerRejectedError`][aioancillary.PeerRejectedError].
            By default a server found by an abstract name (which any user may have bound
            first) must run as this user or as root
            ([`root_or_same_user`][aioancillary.root_or_same_user]); other servers are not
            checked. ``None`` talks to any server.
        max_message_size: Largest message accepted or sent.
        max_queued_bytes: Receive-queue byte budget before reading pauses.
        max_queued_fds: Receive-queue fd budget before reading pauses (default: a quarter
            of RLIMIT_NOFILE, at most ``DEFAULT_MAX_QUEUED_FDS``, at least ``SCM_MAX_FD``).
        max_fds_per_send: Most fds one ``sendmsg`` carries (default and maximum: the kernel's
            cap, 253). Lower it for a receiver with few free fds: one ``sendmsg`` with more
            fds than the receiver has room for fails its read (``FdTruncatedError``).

    Example::

        conn = await open_unix_connection("/run/acceptor.sock")
        await conn.send_fds(b"hello", [some_file])

    Raises:
        ValueError: both or neither of ``path`` and ``sock``; ``sock`` is not a connected
            AF_UNIX socket (listening, unconnected, another family).
        PeerRejectedError: ``authorize`` refused the peer.
        OSError: the connection failed (e.g. ``FileNotFoundError``, ``ConnectionRefusedError``;
            the message names the path).
    """
    options = ConnectionOptions(
        framed, max_message_size, max_fds_per_send, max_queued_bytes, max_queued_fds
    )
    conn_sock = await _connected(path, sock, sock_type, authorize)
    with closed_on_error(conn_sock):
        return options.connection(conn_sock)


async def create_unix_connection(
    protocol_factory: Callable[[], _P],
    path: PathArg | None = None,
    *,
    sock: socket.socket | None = None,
    sock_type: int = socket.SOCK_STREAM,
    framed: bool | None = None,
    authorize: Authorize | None = CLIENT_DEFAULT,
    max_message_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_fds_per_send: int | None = None,
) -> tuple[AncillaryTransport, _P]:
    """Connect to ``path`` (or wrap ``sock``) with a protocol from ``protocol_factory``.

    The protocol-level form of [`open_unix_connection`][aioancillary.open_unix_connection], as
    `loop.create_unix_connection` is for asyncio:
    messages arrive in the protocol's callbacks; no task, no queue.

    Example::

        class Client(AncillaryProtocol):
            def connection_made(self, transport):
                transport.write_fds(b"hello", [sys.stdin])

            def message_received(self, msg):
                with msg:
                    print(msg.data)

        transport, protocol = await create_unix_connection(Client, "/run/echo.sock")

    Args:
        protocol_factory: Returns the [`AncillaryProtocol`][aioancillary.AncillaryProtocol].
        path: As for [`open_unix_connection`][aioancillary.open_unix_connection].
        sock: As for [`open_unix_connection`][aioancillary.open_unix_connection].
        sock_type: As for [`open_unix_connection`][aioancillary.open_unix_connection].
        framed: As for [`open_unix_connection`][aioancillary.open_unix_connection].
        authorize: As for [`open_unix_connection`][aioancillary.open_unix_connection].
        max_message_size: As for [`open_unix_connection`][aioancillary.open_unix_connection].
        max_fds_per_send: As for [`open_unix_connection`][aioancillary.open_unix_connection].

    Raises the same errors as [`open_unix_connection`][aioancillary.open_unix_connection].
    """
    options = ConnectionOptions(framed, max_message_size, max_fds_per_send)
    conn_sock = await _connected(path, sock, sock_type, authorize)
    with closed_on_error(conn_sock):
        protocol = protocol_from(protocol_factory)
        return options.transport(conn_sock, protocol), protocol


async def connection_pair(
    sock_type: int = socket.SOCK_STREAM,
    *,
    framed: bool | None = None,
    max_message_size: int = DEFAULT_MAX_FRAME_SIZE,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    max_queued_fds: int | None = None,
    max_fds_per_send: int | None = None,
) -> tuple[AncillaryConnection, AncillaryConnection]:
    """Return two connected [`AncillaryConnection`][aioancillary.AncillaryConnection] objects over a
    ``socketpair``.

    Example::

        a, b = await connection_pair()
        await a.send_fds(b"pipe", [r])
        msg = await b.recv()
    """
    options = ConnectionOptions(
        framed, max_message_size, max_fds_per_send, max_queued_bytes, max_queued_fds
    )
    left, right = socket.socketpair(socket.AF_UNIX, sock_type)
    with closed_on_error(right), closed_on_error(left):
        a = options.connection(left)
    with closed_on_error(right):
        try:
            b = options.connection(right)
        except BaseException:
            a.abort()
            raise
    return a, b
