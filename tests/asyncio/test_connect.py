"""Connecting a non-blocking Unix socket (``_asyncio/_connect.py``): a full backlog is waited
out, never taken for a connection."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from helpers import close_all, within

from aioancillary import (
    open_unix_connection,
)
from aioancillary._asyncio._connect import connect


async def test_open_unix_connection_to_a_full_backlog_never_returns_a_dead_connection(
    tmp_path: Path,
) -> None:
    """A server whose backlog is full: connect must wait (or fail), not pretend to succeed.

    A non-blocking AF_UNIX connect() fails with EAGAIN when the listener's backlog is full;
    nothing is in progress. ``loop.sock_connect`` takes EAGAIN for "in progress", sees the
    socket writable with SO_ERROR 0 and reports success: the connection is not connected.
    """
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    pending: list[socket.socket] = []
    accepted: list[socket.socket] = []
    try:
        while True:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(path)
            except BlockingIOError:
                client.close()
                break
            pending.append(client)
        connecting = asyncio.create_task(open_unix_connection(path))
        await asyncio.sleep(0.02)
        # Make room: the listener accepts what waits in the backlog.
        listener.settimeout(1)
        for _ in pending:
            accepted.append(listener.accept()[0])
        try:
            conn = await within(connecting)
        except OSError:
            return  # refusing is fine too
        try:
            assert conn.get_extra_info("peername") == path, "not connected"
            await conn.send(b"hello")
            server_side = listener.accept()[0]
            accepted.append(server_side)
            assert server_side.recv(100).endswith(b"hello")
        finally:
            await close_all(conn)
    finally:
        for s in pending + accepted:
            s.close()
        listener.close()


async def test_connect_names_the_path_it_failed_on(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(FileNotFoundError) as raised:
        await connect(sock, str(tmp_path / "nothing-here.sock"))
    assert raised.value.filename == str(tmp_path / "nothing-here.sock")
