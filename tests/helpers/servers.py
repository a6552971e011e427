"""Servers for the entry-point tests: an echo handler, a server that is always closed, and a
round trip that proves each message came back with its own fd."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aioancillary import AncillaryConnection, AncillaryServer, start_unix_server

from . import TIMEOUT, read_tags, tagged_pipe, within


async def echo_fds(conn: AncillaryConnection) -> None:
    """Send every message back with the fds that came with it."""
    async for msg in conn:
        with msg:
            await conn.send_fds(b"echo:" + msg.data, msg.fds)


@asynccontextmanager
async def serving(
    handler: Callable[[AncillaryConnection], Any], path: Any, **kwargs: Any
) -> AsyncIterator[AncillaryServer]:
    server = await start_unix_server(handler, path, **kwargs)
    try:
        async with asyncio.timeout(2 * TIMEOUT):
            yield server
    finally:
        server.close()
        server.close_clients()
        await within(server.wait_closed())


async def roundtrip(conn: AncillaryConnection, tag: bytes) -> None:
    r = tagged_pipe(tag)
    try:
        await conn.send_fds(tag, [r])
    finally:
        os.close(r)
    with await within(conn.recv()) as msg:
        assert msg.data == b"echo:" + tag
        assert read_tags(msg.fds) == [tag]
