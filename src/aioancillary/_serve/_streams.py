"""The ``handler`` interface: ``async def handler(reader, writer)`` per client, as for
``asyncio.start_server``."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections.abc import Awaitable, Callable

from .._handoff._client import HandedClient
from ._adapter import DRAIN_IDLE, ClientAdapter

__all__ = ["StreamAdapter", "StreamHandler"]

logger = logging.getLogger("aioancillary.serve")

_EAGER = sys.version_info >= (3, 12)

#: ``async def handler(reader, writer) -> None``, as given to ``asyncio.start_server``.
StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class StreamAdapter(ClientAdapter):
    """Serves each client with ``handler(reader, writer)`` (the ``handler`` interface).

    The client is finished (its connection closed and reported) when the handler returns or
    raises. A stream handler has no notion of a request: stopping gracefully lets running
    handlers finish until the deadline, then cancels them.

    Args:
        handler: ``async def handler(reader, writer) -> None``.
        limit: The readers' buffer limit (as for ``asyncio.start_server``).
        drain_idle: See [`ClientAdapter`][aioancillary.ClientAdapter] (unused: a handler decides
            when it is done).
    """

    _adopts_sockets = True  # open_streams(): the loop's transport takes the socket

    def __init__(
        self, handler: StreamHandler, *, limit: int = 2**16, drain_idle: float = DRAIN_IDLE
    ) -> None:
        super().__init__(drain_idle=drain_idle)
        self._handler = handler
        self._limit = limit
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connections(self) -> int:
        return len(self._tasks)

    def serve_client(self, client: HandedClient) -> None:
        loop = self._loop
        assert loop is not None, "start() was not called"
        coro = self._run(client)
        if _EAGER:
            task = asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]
            if task.done():
                return
        else:
            task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._on_empty()

    async def _run(self, client: HandedClient) -> None:
        with client:  # closes the streams' transport and reports the client finished
            try:
                reader, writer = await client.open_streams(limit=self._limit)
                await self._handler(reader, writer)
            except Exception:
                logger.exception("stream handler failed for %r", client)

    async def _serve_listener(self, sock: socket.socket, backlog: int) -> asyncio.AbstractServer:
        return await asyncio.start_server(
            self._run_accepted, sock=sock, backlog=backlog, limit=self._limit
        )

    async def _run_accepted(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        try:
            await self._handler(reader, writer)
        except Exception:
            logger.exception("stream handler failed for %r", writer.get_extra_info("peername"))
        finally:
            writer.close()

    def _abort_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
