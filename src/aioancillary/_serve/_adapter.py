"""Serve handed clients with an application: the part every interface shares.

A [`ClientAdapter`][aioancillary.ClientAdapter] takes the clients of a
[`Worker`][aioancillary.Worker] (``serve``) and serves each
one with the application until the connection ends, then reports it finished: a keep-alive
HTTP connection is one client until it closes. When the worker's client stream ends (the
acceptor retired it: a reload, a smaller pool, a shutdown), the adapter stops gracefully:

* requests in progress finish, and their responses say ``Connection: close``;
* a connection that sends another request gets its answer, also with ``Connection: close``;
* a connection that stays quiet for ``drain_idle`` seconds (nothing received, no request in
  progress) is closed;
* whatever is left at the deadline is aborted.

Closing a keep-alive connection that looks idle is what loses requests under load in other
servers' graceful stops: the client may be sending its next request at that very moment, and
gets the end of the connection instead of a response. Waiting for a quiet period first, and
ending busy connections only after a response that announced it, leaves no such window for a
client that keeps sending.

Protocol-based interfaces wrap the application's protocol in a `_Tracked` protocol
that forwards every callback and reports the client when the connection is lost.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from functools import partial
from itertools import repeat
from types import TracebackType
from typing import Any, Self

from .._core._errors import AncillaryError, ConnectionClosedError
from .._handoff._client import HandedClient
from .._handoff._worker import Worker

__all__ = ["ClientAdapter", "ProtocolAdapter"]

logger = logging.getLogger("aioancillary.serve")


#: Default quiet period after which a draining connection is closed, in seconds.
DRAIN_IDLE = 1.0
#: Loop turns for accepted connections to be counted once the servers closed (asyncio: two
#: for a protocol, three for a stream handler, whose task counts it; uvloop: one; see
#: ClientAdapter._settled).
_SETTLE_TURNS = 4
_INET = (socket.AF_INET, socket.AF_INET6)


class ClientAdapter:
    """Serves the clients a [`Worker`][aioancillary.Worker] receives with one application (base
    class).

    Use it as an async context manager around the worker's life: entering runs the
    application's startup, [`serve`][aioancillary.ClientAdapter.serve] serves until the acceptor
    ends the client stream and then stops gracefully, leaving runs the application's shutdown::

        async with AsgiAdapter(app) as adapter:
            async with await pool_worker.connect() as worker:
                await adapter.serve(worker, graceful_timeout=30)

    Args:
        drain_idle: While stopping, a connection that received nothing for this many seconds
            and has no request in progress is closed.
    """

    def __init__(self, *, drain_idle: float = DRAIN_IDLE) -> None:
        self._drain_idle = drain_idle
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._emptied: asyncio.Future[None] | None = None  # drain() waits on it
        self._servers: list[asyncio.AbstractServer] = []  # accept_on()'s
        self._settle = False  # servers were closed: see _settled()
        self._closing: list[asyncio.AbstractServer] = []  # not accepting; closed by close()

    # -- the application's life -------------------------------------------------------------

    async def start(self) -> None:
        """Run the application's startup (lifespan, ``on_startup``...).

        Raises:
            AppStartupError: the startup failed.
        """
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Run the application's shutdown (after [`serve`][aioancillary.ClientAdapter.serve] has
        returned)."""
        self._stop_accepting()
        closing, self._closing = self._closing, []
        for server in closing:
            server.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- clients ----------------------------------------------------------------------------

    def serve_client(self, client: HandedClient) -> None:
        """Start serving ``client``; it is reported finished when its connection ends."""
        raise NotImplementedError

    async def accept_on(self, listeners: Sequence[socket.socket], *, backlog: int = 2048) -> None:
        """Also serve the clients this process accepts itself on ``listeners`` (listening
        sockets, e.g. shared by every worker: ``WorkerPool(share=...)``), until the graceful
        stop begins ([`begin_drain`][aioancillary.ClientAdapter.begin_drain]): then this process
        accepts no more, and those connections drain like handed ones. Its copies of the
        listeners are closed then on uvloop, and by [`close`][aioancillary.ClientAdapter.close]
        on asyncio (whose server, closed at once, would reset what it had just accepted).

        Args:
            listeners: Listening stream sockets; the adapter owns them from then on.
            backlog: Passed to ``listen()`` again by the loop: keep the listener's own.
        """
        assert self._loop is not None, "start() was not called"
        taken = list(listeners)
        try:
            while taken:
                sock = taken[0]
                self._servers.append(await self._serve_listener(sock, backlog))
                taken.pop(0)
        finally:
            for sock in taken:
                sock.close()
        if self._draining:
            self._stop_accepting()

    async def _serve_listener(self, sock: socket.socket, backlog: int) -> asyncio.AbstractServer:
        """A server of the loop accepting on ``sock`` with this adapter's connections."""
        raise NotImplementedError

    def _stop_accepting(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            if isinstance(server, asyncio.base_events.Server) and self._loop is not None:
                # asyncio's own server: closing it fails the transport of every connection
                # accepted but not yet set up ("Error on transport creation": Server._attach
                # asserts the server is open), which resets those clients. Stop reading the
                # listener instead, and close the server after the drain (close()).
                for sock in server.sockets:
                    self._loop.remove_reader(sock.fileno())
                self._closing.append(server)
            else:
                server.close()  # this process's copy of the listener; its connections go on
        if servers:
            self._settle = True

    async def _settled(self) -> None:
        """Let the connections the loop accepted before its servers closed be counted.

        A connection is counted when its protocol's ``connection_made`` runs (a stream
        handler's: when its task starts), a few loop turns after the loop accepted it: asyncio
        runs a task per accepted connection whose first step makes the protocol and the
        transport, and the transport schedules ``connection_made``; uvloop schedules it at
        once. Without these turns a stop could find nothing to wait for and end the process
        under them (a reset for their clients).
        """
        if self._settle:
            self._settle = False
            for _ in range(_SETTLE_TURNS):
                await asyncio.sleep(0)

    @property
    def connections(self) -> int:
        """How many clients are being served now."""
        raise NotImplementedError

    @property
    def draining(self) -> bool:
        """Whether [`begin_drain`][aioancillary.ClientAdapter.begin_drain] was called (every
        response now closes its connection)."""
        return self._draining

    async def serve(
        self,
        worker: Worker,
        *,
        graceful_timeout: float = 30.0,
        stop: asyncio.Event | None = None,
    ) -> bool:
        """Serve every client of ``worker`` until its client stream ends, then stop gracefully.

        Args:
            worker: The worker's link to its acceptor.
            graceful_timeout: Once stopping, how long connections may take to finish before
                they are aborted, in seconds.
            stop: Setting it starts the graceful stop before the stream ends (e.g. on
                SIGTERM); clients that still arrive are served in the same way, until the
                stream ends or the deadline passes.

        Returns:
            ``True`` if every connection finished by itself before the deadline.
        """
        loop = asyncio.get_running_loop()
        pulling = loop.create_task(self._pull(worker))
        if stop is None:
            await asyncio.shield(pulling)
        else:
            stopping = loop.create_task(stop.wait())
            try:
                await asyncio.wait((pulling, stopping), return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
        deadline = loop.time() + graceful_timeout
        self.begin_drain()
        if not pulling.done():  # stopped early: keep serving what still arrives
            try:
                await asyncio.wait_for(asyncio.shield(pulling), graceful_timeout)
            except TimeoutError:
                pulling.cancel()
        clean = await self.drain(max(0.0, deadline - loop.time()))
        if not pulling.done():
            pulling.cancel()
        await asyncio.wait((pulling,))
        return clean

    #: Whether `serve_client` gives each client's socket to a loop transport at once (which
    #: makes it non-blocking itself). A subclass that uses ``client.sock`` directly keeps
    #: the default: its sockets arrive non-blocking, as documented.
    _adopts_sockets = False

    async def _pull(self, worker: Worker) -> None:
        try:
            await worker._deliver(self.serve_client, adopting=self._adopts_sockets)
        except (AncillaryError, ConnectionClosedError) as exc:
            logger.error("the link to the acceptor failed (%s): stopping", exc)

    # -- stopping -------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Start the graceful stop: responses close their connections, quiet ones close, and
        [`accept_on`][aioancillary.ClientAdapter.accept_on]'s listeners accept no more."""
        self._draining = True
        self._stop_accepting()

    # A deadline that answers "did they finish in time?" instead of raising: the stop goes on.
    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until every connection has ended; abort those left at the deadline.

        Returns:
            ``True`` if none had to be aborted.
        """
        assert self._loop is not None, "start() was not called"
        if not self._draining:
            self.begin_drain()
        try:
            async with asyncio.timeout(timeout):
                await self._until_empty()
            return True
        except TimeoutError:
            count = self.connections
            logger.warning("aborting %d connection(s) still open after the graceful timeout", count)
            self._abort_all()
            try:
                async with asyncio.timeout(5.0):  # their connection_lost, a loop turn or two
                    await self._until_empty()
            except TimeoutError:
                logger.error("%d connection(s) did not end when aborted", self.connections)
            return False

    async def _until_empty(self) -> None:
        await self._settled()
        while self.connections:
            assert self._loop is not None
            self._emptied = self._loop.create_future()
            try:
                await self._emptied
            finally:
                self._emptied = None

    def _on_empty(self) -> None:
        """The last connection ended (called by the subclasses)."""
        emptied = self._emptied
        if emptied is not None and not emptied.done():
            emptied.set_result(None)

    def _abort_all(self) -> None:
        raise NotImplementedError


class _Tracked(asyncio.Protocol):
    """Forwards a connection's callbacks to the application's protocol and reports the
    handed client finished when the connection is lost."""

    __slots__ = ("_adapter", "_live", "active", "client", "inner", "transport")

    def __init__(self, adapter: ProtocolAdapter, client: HandedClient | None, inner: Any) -> None:
        self._adapter = adapter
        self._live = adapter._tracked
        self.client = client
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        #: Something arrived since the last look (the drain's idle check clears it).
        self.active = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self._live.add(self)
        # Counted from here on, so drained from here on: begin_drain() drains the connections
        # counted before it, this the ones counted after. The protocol may have been made
        # before the stop began (its connection_made was still scheduled when it did) and
        # would otherwise keep a keep-alive connection open until the deadline's abort.
        if self._adapter._draining:
            self._adapter._drain_protocol(self.inner)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.active = True
        self.inner.data_received(data)
        # An upgrade (uvicorn's websocket) hands the transport to another protocol with
        # set_protocol(): follow it, or the end of the connection would go unreported.
        transport = self.transport
        if transport is not None and transport.get_protocol() is not self:
            self._follow(transport)

    def _follow(self, transport: asyncio.Transport) -> None:
        if transport.is_closing():
            return
        self.inner = transport.get_protocol()
        transport.set_protocol(self)

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            live = self._live
            live.discard(self)
            if self.client is not None:  # None: accepted here, nobody to report to
                self.client.done()
            if not live:
                self._adapter._on_empty()


class _TrackedBuffered(_Tracked, asyncio.BufferedProtocol):
    """`_Tracked` for an application protocol that reads into its own buffer."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> Any:
        return self.inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.active = True
        self.inner.buffer_updated(nbytes)
        transport = self.transport
        if transport is not None and transport.get_protocol() is not self:
            self._follow(transport)


class ProtocolAdapter(ClientAdapter):
    """Serves each client with a new protocol from ``protocol_factory`` (the ``protocol``
    interface; also the base of the HTTP adapters).

    A plain protocol has no notion of a request: stopping gracefully waits for its
    connections to end by themselves, and aborts what is left at the deadline.

    Args:
        protocol_factory: Called with no argument for each client, like the factory given to
            ``loop.create_server``.
        drain_idle: See [`ClientAdapter`][aioancillary.ClientAdapter].
    """

    _adopts_sockets = True

    def __init__(self, protocol_factory: Any = None, *, drain_idle: float = DRAIN_IDLE) -> None:
        super().__init__(drain_idle=drain_idle)
        self._factory = protocol_factory
        self._tracked: set[_Tracked] = set()
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def connections(self) -> int:
        return len(self._tracked)

    def serve_client(self, client: HandedClient) -> None:
        loop = self._loop
        assert loop is not None, "start() was not called"
        try:
            protocol = self._new_protocol()
        except Exception:
            logger.exception("the protocol factory failed; closing the client")
            client.done()
            return
        if isinstance(protocol, asyncio.BufferedProtocol):
            tracked: _Tracked = _TrackedBuffered(self, client, protocol)
        else:
            tracked = _Tracked(self, client, protocol)
        # repeat(tracked).__next__: the factory, without a Python frame per client.
        client._adopt(repeat(tracked).__next__, partial(self._connect_failed, tracked))

    async def _serve_listener(self, sock: socket.socket, backlog: int) -> asyncio.AbstractServer:
        assert self._loop is not None
        return await self._loop.create_server(self._accepted, sock=sock, backlog=backlog)

    def _accepted(self) -> _Tracked:
        """The protocol of a connection this process accepted itself (``accept_on``)."""
        protocol = self._new_protocol()
        if isinstance(protocol, asyncio.BufferedProtocol):
            return _TrackedBuffered(self, None, protocol)
        return _Tracked(self, None, protocol)

    def _connect_failed(self, tracked: _Tracked, exc: Exception) -> None:
        # The client left before its transport was made (or the loop refused the socket).
        logger.debug("could not serve %r: %s", tracked.client, exc)
        if tracked in self._tracked:
            self._lost(tracked)
        elif tracked.client is not None:
            tracked.client.done()

    # -- hooks of the interfaces --------------------------------------------------------------

    def _new_protocol(self) -> Any:
        """The application's protocol for one connection."""
        return self._factory()

    def _drain_protocol(self, protocol: Any) -> None:
        """The stop began: make this connection's next response close it."""

    def _is_idle(self, protocol: Any) -> bool:
        """No request in progress: the connection may be closed if it stays quiet."""
        return False

    def _close_idle(self, protocol: Any, transport: asyncio.Transport) -> None:
        transport.close()

    # -- bookkeeping ---------------------------------------------------------------------------

    def _lost(self, tracked: _Tracked) -> None:
        self._tracked.discard(tracked)
        if tracked.client is not None:
            tracked.client.done()
        if not self._tracked:
            self._on_empty()

    def begin_drain(self) -> None:
        if self._draining:
            return
        super().begin_drain()
        for tracked in list(self._tracked):
            tracked.active = False
            self._drain_protocol(tracked.inner)
        assert self._loop is not None
        self._idle_timer = self._loop.call_later(self._drain_idle, self._close_quiet)

    def _close_quiet(self) -> None:
        """Close the connections that stayed quiet and idle for a whole ``drain_idle``."""
        for tracked in list(self._tracked):
            transport = tracked.transport
            if transport is None or transport.is_closing():
                continue
            if not tracked.active and self._is_idle(tracked.inner):
                self._close_idle(tracked.inner, transport)
            tracked.active = False
        if self._tracked:
            assert self._loop is not None
            self._idle_timer = self._loop.call_later(self._drain_idle, self._close_quiet)

    def _abort_all(self) -> None:
        for tracked in list(self._tracked):
            if tracked.transport is not None:
                tracked.transport.abort()

    async def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        await super().close()
