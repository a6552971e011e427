"""In-process reload generations shared by the reload tests (tests/lifecycle/test_reload*.py).

Deadlines here are generous on purpose: a test that needs a step to time out drives that step
with a peer that never answers, and shortens only that step's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aioancillary import AncillaryConnection, AncillaryMessage, OwnedFd, open_unix_connection
from aioancillary._lifecycle._reload import Generation, HandoffBusyError, start_generation
from helpers import TIMEOUT, wait_until, within

#: A step timeout no test waits out: a test that hangs on it fails at `within`'s deadline.
NEVER = 3600.0


def listener() -> socket.socket:
    """A listening TCP socket on 127.0.0.1."""
    return socket.create_server(("127.0.0.1", 0))


async def first_generation(path: Path, **kwargs: Any) -> Generation:
    """A first generation at ``path`` offering "web" (a listener) and "state" (a memfd)."""
    gen = await within(start_generation(path, systemd=False, **kwargs))
    # The generation keeps its own copies for the successor: ours can go at once.
    gen.take_socket("web", create=listener).close()
    gen.take_fd("state", create=lambda: OwnedFd(os.memfd_create("state"))).close()
    await within(gen.ready())
    return gen


@contextlib.asynccontextmanager
async def closing(*gens: Generation) -> AsyncIterator[None]:
    """Close ``gens`` (in order) on exit."""
    try:
        yield
    finally:
        for gen in gens:
            await within(gen.close())


async def retry_busy(path: Path, **kwargs: Any) -> Generation:
    """start_generation until the running one is no longer busy with a failed successor."""

    async def attempt() -> Generation:
        while True:
            try:
                return await start_generation(path, **kwargs)
            except HandoffBusyError:
                await asyncio.sleep(0.01)  # the failed successor's cleanup has not reached it

    return await within(attempt())


async def say_hello(conn: AncillaryConnection) -> None:
    """What a successor says first."""
    await conn.send(json.dumps({"op": "hello", "version": 1, "pid": os.getpid()}).encode())


async def raw_successor(path: Path) -> tuple[AncillaryConnection, dict[str, Any], AncillaryMessage]:
    """Connect, say hello, read the fds message: the connection, its JSON and the message."""
    conn = await within(open_unix_connection(path))
    await say_hello(conn)
    msg = await within(conn.recv())
    body: dict[str, Any] = json.loads(msg.data)
    return conn, body, msg


def handoff_peers(gen: Generation) -> int:
    """How many peers are connected to ``gen``'s handoff socket now."""
    server = gen._offering._server
    return 0 if server is None else server.stats.active


async def wait_for_peers(gen: Generation, count: int) -> None:
    """Until ``count`` peers are connected to ``gen``'s handoff socket (accepted, handled)."""
    await wait_until(lambda: handoff_peers(gen) >= count, TIMEOUT)
