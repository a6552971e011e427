"""[`AncillaryServer`][aioancillary.AncillaryServer]: a listening socket, its accept loop, and
the connections it serves, known only through the callback that serves each one.

The server accepts, checks the peer (``authorize``), and hands the socket to the ``serve``
callback it was given; what comes back is anything it can close (a transport, a connection).
The callback tells the server when that connection has ended. So the server knows nothing of
transports, protocols or handlers: [`start_unix_server`][aioancillary.start_unix_server] and
[`create_unix_server`][aioancillary.create_unix_server] (``_server.py``, above it) decide
what a connection is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .._core._errors import AncillaryError, ConnectionClosedError, PeerRejectedError
from .._kernel import _accel, _fork
from .._kernel._accept import (
    AcceptErrorKind,
    ResourcePause,
    accept_burst,
    accepted_kind,
    sockets_of,
)
from .._kernel._unix import Authorize, check_peer, is_abstract
from ._closing import AsyncClosing

__all__ = ["AncillaryServer", "Ended", "Serve", "Served", "ServerStats"]

logger = logging.getLogger("aioancillary")

# The most connections one readiness callback accepts: others' callbacks get their turn.
_ACCEPT_BURST = 64


class Served(Protocol):
    """One connection as its server sees it: something to close, and its peer's details."""

    def close(self) -> None:
        """Close it once what is queued was sent."""

    def abort(self) -> None:
        """Close it at once."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Transport information (the server logs ``"peercred"``)."""


#: ``ended(served, exc, failure)``: a served connection is over. ``exc`` is why its socket
#: closed (``None``: closed normally); ``failure`` is what the application's code serving it
#: raised (a handler), if anything.
Ended = Callable[[Served, Exception | None, Exception | None], None]
#: ``serve(sock, ended) -> served``: set up a connection on an accepted socket (which it owns
#: from then on, unless it raises) and call ``ended`` once when it is over, never before it
#: returned.
Serve = Callable[[socket.socket, Ended], Served]


@dataclass(frozen=True, slots=True)
class ServerStats:
    """Counters of an [`AncillaryServer`][aioancillary.AncillaryServer] since it started.

    Attributes:
        accepted: Connections accepted (including those then refused by ``authorize``).
        rejected: Connections refused by ``authorize``.
        peer_errors: Connections closed because the peer broke the protocol or sent what
            could not be received (``ProtocolError``, ``FdTruncatedError``, ...).
        handler_errors: Handlers that raised, and connections that could not be set up
            because the application's code raised (``authorize``, a protocol factory,
            ``connection_made``); each is reported once to the loop's exception handler.
        active: Connections being served now.
        listener_error: Why the server stopped listening on its own: ``accept()`` failed
            for good on its socket (for example once the socket was shut down underneath
            it); the fact is logged once. ``None`` while it listens, or after ``close()``.
    """

    accepted: int
    rejected: int
    peer_errors: int
    handler_errors: int
    active: int
    listener_error: OSError | None = None


class AncillaryServer(AsyncClosing):
    """A listening Unix socket; each connection gets a handler task or a protocol.

    Made by [`start_unix_server`][aioancillary.start_unix_server] and
    [`create_unix_server`][aioancillary.create_unix_server]. Like `asyncio.Server`:
    [`close`][aioancillary.AncillaryServer.close],
    [`wait_closed`][aioancillary.AncillaryServer.wait_closed],
    [`serve_forever`][aioancillary.AncillaryServer.serve_forever], and ``async with``. A peer's
    faults (garbage frames, a refused ``authorize``) are not the server's errors: each is logged
    once per connection on the ``"aioancillary"`` logger at ``peer_error_level`` and counted in
    [`stats`][aioancillary.AncillaryServer.stats]; they never reach the loop's exception handler.
    """

    def __init__(
        self,
        sock: socket.socket,
        serve: Serve,
        *,
        path: str | bytes | None,
        authorize: Authorize | None,
        peer_error_level: int,
    ) -> None:
        """Serve the listening ``sock``; use [`start_unix_server`][aioancillary.start_unix_server]
        instead."""
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = sock
        self._fileno = sock.fileno()
        self._kind = accepted_kind(sock)
        self._serve = serve
        self._authorize = authorize
        self._peer_level = peer_error_level
        self._path = path
        self._inode = os.lstat(path).st_ino if path is not None else None
        self._served: set[Served] = set()
        self._idle: asyncio.Future[None] | None = None
        self._closed = self._loop.create_future()
        self._accepted = self._rejected = self._peer_errors = self._handler_errors = 0
        self._listener_error: OSError | None = None
        self._resource = ResourcePause(logger, f"the server on {self._where()}")
        self._pid = _fork.track(self)
        self._loop.add_reader(self._fileno, self._on_accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening socket (empty once closed); send it to a successor to hand over."""
        return () if self._sock is None else (self._sock,)

    @property
    def stats(self) -> ServerStats:
        """A snapshot of the server's counters."""
        return ServerStats(
            self._accepted,
            self._rejected,
            self._peer_errors,
            self._handler_errors,
            len(self._served),
            self._listener_error,
        )

    def is_serving(self) -> bool:
        """True while the server accepts connections (not after ``close()``, nor once its
        listener failed for good: logged once, the listener closed)."""
        return self._sock is not None

    def _forked(self) -> None:
        # In a child process after fork(): drop this process's copy; the loop is the parent's.
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # -- accepting --------------------------------------------------------------------------------

    def _on_accept(self) -> None:
        sock = self._sock
        if sock is None:
            return
        accept_into = _accel.accept_into
        kind = self._kind
        # The C burst accepts on the fd; a socket object standing in for the listener (a
        # subclass, or one put in its place) has its own accept() called instead.
        if accept_into is not None and kind is not None and type(sock) is socket.socket:
            fds: list[int] = []  # the C burst: raw fds, no address tuples
            failure = accept_into(self._fileno, _ACCEPT_BURST, fds, None)
            self._admit_all(sockets_of(fds, kind))
        else:
            accepted: list[tuple[socket.socket, object]] = []
            # fd=: a listener shut down underneath the server polls readable for good while
            # accept() finds nothing; accept_burst reports it as fatal instead of letting the
            # reader fire again at once, forever.
            failure = accept_burst(sock.accept, _ACCEPT_BURST, accepted, fd=self._fileno)
            self._admit_all([conn_sock for conn_sock, _addr in accepted])
        if failure is None:
            if self._resource.active:
                self._resource.recovered()
        elif failure.kind is AcceptErrorKind.RESOURCE:
            # Out of fds or memory: stop accepting for a moment instead of spinning on the
            # readiness callback; pending clients wait in the backlog. Logged once an episode.
            delay = self._resource.failed(failure.error)
            self._loop.remove_reader(self._fileno)
            self._loop.call_later(delay, self._resume_accepting)
        else:
            self._listener_failed(failure.error)

    def _admit_all(self, socks: list[socket.socket]) -> None:
        """`_admit` each socket of a burst; if one raises past it, the rest are closed."""
        for index, conn_sock in enumerate(socks):
            try:
                self._admit(conn_sock)
            except BaseException:
                for rest in socks[index + 1 :]:
                    rest.close()  # KeyboardInterrupt, SystemExit: never served
                raise

    def _admit(self, conn_sock: socket.socket) -> None:
        """Authorize and serve one accepted socket; a failure closes it and serves on."""
        self._accepted += 1
        try:
            check_peer(conn_sock, self._authorize)
            served = self._serve(conn_sock, self._ended)
        except PeerRejectedError as exc:
            conn_sock.close()  # any fds the peer already sent are closed by the kernel
            self._rejected += 1
            logger.log(self._peer_level, "%s", exc)
        except Exception as exc:
            # The application's code failed on this connection (authorize, the protocol
            # factory, connection_made): close it, report it once, serve the next one.
            conn_sock.close()
            self._handler_errors += 1
            self._loop.call_exception_handler(
                {
                    "message": "aioancillary server could not set up a connection "
                    "(authorize, the protocol factory or connection_made raised); the "
                    "connection was closed",
                    "exception": exc,
                    "server": self,
                }
            )
        except BaseException:
            conn_sock.close()
            raise
        else:
            self._served.add(served)

    def _listener_failed(self, exc: OSError) -> None:
        # accept() will never work on this socket again (EINVAL: it was shut down and no
        # longer listens; EBADF...): the poller would report it ready at once, forever. Stop
        # listening as close() does; the connections being served go on.
        self._listener_error = exc
        logger.error(
            "the server on %s stopped listening: accept() failed for good (%s); its "
            "connections go on, new ones are refused: start a new server",
            self._where(),
            exc,
        )
        self.close()

    def _resume_accepting(self) -> None:
        if self._sock is not None and os.getpid() == self._pid:
            self._loop.add_reader(self._fileno, self._on_accept)

    # -- connections ------------------------------------------------------------------------------

    def _ended(self, served: Served, exc: Exception | None, failure: Exception | None) -> None:
        self._served.discard(served)
        peer = served.get_extra_info("peercred")
        if isinstance(exc, AncillaryError) and not isinstance(exc, ConnectionClosedError):
            self._peer_errors += 1
            logger.log(self._peer_level, "closed the connection from peer %s: %s", peer, exc)
        elif exc is not None:
            logger.debug("connection from %s lost: %s", peer, exc)
        if failure is not None:  # a failing handler must not stop the server
            self._handler_errors += 1
            self._loop.call_exception_handler(
                {"message": "aioancillary connection handler failed", "exception": failure}
            )
        if not self._served and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    # -- closing ----------------------------------------------------------------------------------

    def close(self, *, unlink: bool = True) -> None:
        """Stop listening. Running handlers and connections go on; see
        [`close_clients`][aioancillary.AncillaryServer.close_clients].

        Args:
            unlink: Remove the socket file this server created (if it is still the same
                file). Pass ``False`` after handing the listening socket to a successor.
        """
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        if os.getpid() == self._pid:
            self._loop.remove_reader(self._fileno)
        sock.close()
        if unlink and self._path is not None and not is_abstract(self._path):
            with contextlib.suppress(OSError):
                if os.lstat(self._path).st_ino == self._inode:
                    os.unlink(self._path)
        if not self._closed.done():
            self._closed.set_result(None)

    def close_clients(self) -> None:
        """Close every open connection (queued outgoing messages are still sent)."""
        for served in list(self._served):
            served.close()

    def abort_clients(self) -> None:
        """Abort every open connection at once."""
        for served in list(self._served):
            served.abort()

    async def wait_closed(self) -> None:
        """Wait until the server is closed, every handler has returned and every connection
        is closed."""
        await asyncio.shield(self._closed)
        while self._served:
            if self._idle is None or self._idle.done():
                self._idle = self._loop.create_future()  # shared by every waiter
            await asyncio.shield(self._idle)

    async def serve_forever(self) -> None:
        """Serve until cancelled, or until the server is closed; cancelling closes it.

        Raises:
            OSError: the server stopped listening because ``accept()`` failed for good on
                its socket (see ``stats.listener_error``).
        """
        try:
            await asyncio.shield(self._closed)
        except asyncio.CancelledError:
            self.close()
            raise
        failure = self._listener_error
        if failure is not None:
            raise OSError(
                failure.errno,
                f"the server on {self._where()} stopped listening: accept() failed "
                f"({failure.strerror}). Start a new server to serve that address again",
            ) from failure

    async def _close_and_wait(self, cancelled: bool) -> None:
        self.close()
        self.close_clients()
        await self.wait_closed()

    def _where(self) -> str:
        return repr(self._path) if self._path is not None else "an inherited socket"

    def __repr__(self) -> str:
        return f"<AncillaryServer {self._where()} serving={self.is_serving()}>"
