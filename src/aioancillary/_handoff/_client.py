"""A handed client on the worker side: the socket the acceptor passed, with what it said
about it (listener, peer address), until it is finished and reported.

[`HandedClient`][aioancillary.HandedClient] is made by the [`Worker`][aioancillary.Worker]
(``_worker``) for each client of a ``C`` message; finishing it reports it to the worker, which
coalesces the reports to the acceptor.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, Self, TypeVar

from . import _wire as wire

__all__ = ["HandedClient", "as_enum", "client_socket"]


class _Reports(Protocol):
    """Where a finished client is reported (the worker)."""

    def _complete(self) -> None: ...


#: The protocol type a ``connect_protocol`` factory makes (as ``loop.connect_accepted_socket``).
_ProtocolT = TypeVar("_ProtocolT", bound=asyncio.BaseProtocol)


def as_enum(value: int, kind: Any) -> int:
    """``value`` as a member of the IntEnum ``kind`` (as ``socket.socket`` reports it), or the
    int itself when ``kind`` has no such member."""
    try:
        member: int = kind(value)
    except ValueError:
        return value
    return member


class _ClientSocket(socket.socket):
    """A handed client's socket: a ``socket.socket`` whose ``family`` and ``type`` are stored.

    ``socket.socket`` builds an enum member from the kernel's int on every read of either,
    and the loops read them when they adopt a socket (``connect_accepted_socket``): three
    enum conversions per client, more than a microsecond. Here they are set once, from the
    acceptor's announcement (already enum members), and read like any attribute. Everything
    else is ``socket.socket``'s.

    Use `client_socket` to make one: the attributes are set after ``socket.socket``'s own
    ``__init__`` (a second ``__init__`` frame would cost a quarter of what is saved).
    """

    __slots__ = ("family", "type")

    def dup(self) -> Self:
        # socket.socket.dup() makes a self.__class__ through __init__ alone: set the slots.
        sock = super().dup()
        sock.family = self.family  # type: ignore[misc]
        sock.type = self.type  # type: ignore[misc]
        return sock


def client_socket(family: int, kind: int, proto: int, fd: int) -> socket.socket:
    """A `_ClientSocket` for ``fd`` (``family`` and ``kind``: the listener's enum members).

    Raises:
        OSError: ``fd`` is not an open socket (nothing is closed).
    """
    sock = _ClientSocket(family, kind, proto, fd)
    sock.family = family  # type: ignore[misc,assignment]
    sock.type = kind  # type: ignore[misc,assignment]
    return sock


class HandedClient:
    """One client connection handed over by the acceptor.

    Use it as a context manager: leaving the block closes the connection (if still open) and
    tells the acceptor this client is finished, which is how it keeps its per-worker count::

        async for client in worker:
            with client:
                request = client.sock.recv(4096)
                client.sock.sendall(b"hello\\n")

    Attributes:
        sock: The client's socket, non-blocking, owned by this object until
            [`done`][aioancillary.HandedClient.done].
    """

    __slots__ = ("_addr", "_adopting", "_info", "_transport", "_worker", "_writer", "sock")

    def __init__(
        self, sock: socket.socket, info: wire.ListenerInfo, addr: bytes, worker: _Reports
    ) -> None:
        self.sock = sock
        self._info = info
        self._addr = addr
        self._worker: _Reports | None = worker
        self._transport: asyncio.BaseTransport | None = None
        # The stream writer handed out by open_streams(), kept until done() closes it: a
        # handler that returns drops its own reference first, and a StreamWriter collected
        # while its transport is open warns "unclosed StreamWriter" (ResourceWarning).
        self._writer: asyncio.StreamWriter | None = None
        # _adopt()'s coroutine and failure callback, until the transport is connected.
        self._adopting: (
            tuple[Coroutine[Any, Any, tuple[asyncio.Transport, Any]], Callable[[Exception], object]]
            | None
        ) = None

    @property
    def peername(self) -> Any:
        """The client's address, as ``accept()`` returned it in the acceptor."""
        return wire.decode_address(self._info.family, self._addr)

    @property
    def listener(self) -> str:
        """The name of the acceptor's listener that accepted this client."""
        return self._info.name

    @property
    def metadata(self) -> dict[str, Any]:
        """The listener's metadata dict from the acceptor (shared: do not modify it)."""
        return self._info.metadata

    async def open_streams(
        self, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The client as asyncio streams (``asyncio.open_connection(sock=...)``).

        The streams own the socket from then on, and this object keeps the writer:
        [`done`][aioancillary.HandedClient.done] (leaving ``with client:``, or the handler returning
        under [`Worker.serve`][aioancillary.Worker.serve]) closes it, so a handler need not close
        the writer itself.

        Args:
            **kwargs: Passed to `asyncio.open_connection` (e.g. ``limit``).
        """
        reader, writer = await asyncio.open_connection(sock=self.sock, **kwargs)
        self._transport = writer.transport
        self._writer = writer
        return reader, writer

    async def connect_protocol(
        self, protocol_factory: Callable[[], _ProtocolT]
    ) -> tuple[asyncio.Transport, _ProtocolT]:
        """Serve the client with a protocol (``loop.connect_accepted_socket``).

        The transport owns the socket from then on; [`done`][aioancillary.HandedClient.done] closes
        it. Call [`done`][aioancillary.HandedClient.done] when the protocol is finished (e.g. from
        ``connection_lost``).

        Returns:
            The transport and the protocol ``protocol_factory`` made, typed as the factory's
            return type (``connect_protocol(MyProtocol)`` gives a ``MyProtocol``).
        """
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.connect_accepted_socket(protocol_factory, self.sock)
        self._transport = transport
        return transport, protocol

    def _adopt(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        failed: Callable[[Exception], object],
    ) -> None:
        """`connect_protocol` without awaiting it: the transport is made now, and the
        connection is served from ``connection_made`` on. ``failed(exc)`` is called if the
        loop refuses the socket or the client leaves before its transport is connected; the
        client is not finished then (the caller decides).

        For adapters that start many clients: no task (and no registration in asyncio's set
        of all tasks) per client.
        """
        loop = asyncio.get_running_loop()
        self._adopting = loop.connect_accepted_socket(protocol_factory, self.sock), failed
        self._adopt_step()

    def _adopt_step(self, _done: object = None) -> None:
        """Run `_adopt`'s coroutine on, the way a task would: each future it yields resumes
        it when done. It must run to its end: dropped at its ``await``, the coroutine would
        close the transport it made."""
        assert self._adopting is not None
        coro, failed = self._adopting
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            self._adopting = None
            self._transport = stop.value[0]
            return
        except Exception as exc:
            self._adopting = None
            failed(exc)
            return
        if waiting is None:  # a bare yield: run again on the next iteration
            asyncio.get_running_loop().call_soon(self._adopt_step)
        else:
            waiting._asyncio_future_blocking = False  # as a task does when it takes it
            waiting.add_done_callback(self._adopt_step)

    def done(self) -> None:
        """Close the client (its socket, or the transport made from it) and report it finished.

        Calling it again does nothing. Reports from one loop iteration go out as one message.
        """
        worker = self._worker
        if worker is None:
            return
        self._worker = None
        writer, self._writer = self._writer, None
        transport = self._transport
        if writer is not None:
            writer.close()  # closes its transport (after flushing what is buffered)
        elif transport is not None:
            transport.close()
        else:
            self.sock.close()
        worker._complete()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.done()

    def __repr__(self) -> str:
        state = "done" if self._worker is None else "open"
        return f"<HandedClient fd={self.sock.fileno()} listener={self._info.name!r} {state}>"
