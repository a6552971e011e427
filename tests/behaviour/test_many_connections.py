"""Hundreds of connections at once, each passing fds both ways: all served, flat fd count."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import open_fd_count

from aioancillary import (
    AncillaryConnection,
    connection_pair,
    open_unix_connection,
    start_unix_server,
)

CLIENTS = 300
# A hang guard, not a speed check: the crowd takes well under a second on the default loop,
# several seconds in asyncio debug mode (a traceback is recorded for every handle and future),
# more again under coverage on a busy machine. Performance is measured in benchmarks/.
TIME_LIMIT = 40.0


@pytest.fixture
def shared_file(tmp_path: Path) -> Iterator[int]:
    path = tmp_path / "shared"
    path.write_bytes(b"shared")
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


async def echo_through_fd(conn: AncillaryConnection, reply_fd: int) -> None:
    """Server side: write the request's data into the pipe it carried; reply with an fd."""
    with await conn.recv() as msg, msg.take_fd() as w:
        os.write(w.fileno(), msg.data)
    await conn.send_fds(b"ok", [reply_fd])


async def client(conn: AncillaryConnection, i: int, expected_ino: int) -> None:
    r, w = os.pipe()
    try:
        await conn.send_fds(b"%d" % i, [w])
        os.close(w)
        w = -1
        with await conn.recv() as reply:
            assert reply.data == b"ok"
            assert os.fstat(reply.fds[0].fileno()).st_ino == expected_ino
        assert os.read(r, 16) == b"%d" % i
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


async def test_hundreds_of_connection_pairs_pass_fds(shared_file: int) -> None:
    base = open_fd_count()
    pairs = [await connection_pair() for _ in range(2 * CLIENTS)]
    ino = os.fstat(shared_file).st_ino

    async def one(i: int, a: AncillaryConnection, b: AncillaryConnection) -> None:
        async with a, b:
            await asyncio.gather(echo_through_fd(b, shared_file), client(a, i, ino))

    await asyncio.wait_for(
        asyncio.gather(*(one(i, a, b) for i, (a, b) in enumerate(pairs))), TIME_LIMIT
    )
    assert open_fd_count() == base


async def _serve_crowd(path: Path, shared_file: int, backlog: int) -> list[BaseException]:
    ino = os.fstat(shared_file).st_ino

    async def handler(conn: AncillaryConnection) -> None:
        await echo_through_fd(conn, shared_file)

    async def one(i: int) -> None:
        async with await open_unix_connection(path) as conn:
            await client(conn, i, ino)

    async with await start_unix_server(handler, path, backlog=backlog) as server:
        results = await asyncio.wait_for(
            asyncio.gather(*(one(i) for i in range(CLIENTS)), return_exceptions=True),
            TIME_LIMIT,
        )
        server.close_clients()
    return [r for r in results if isinstance(r, BaseException)]


async def test_hundreds_of_clients_through_one_server(tmp_path: Path, shared_file: int) -> None:
    base = open_fd_count()
    errors = await _serve_crowd(tmp_path / "srv.sock", shared_file, backlog=4 * CLIENTS)
    assert errors == []
    assert open_fd_count() == base


async def test_more_clients_at_once_than_the_backlog(tmp_path: Path, shared_file: int) -> None:
    # All clients connect in one loop iteration, before the server can accept: the kernel
    # refuses connect() with EAGAIN past the backlog (unix(7): a non-blocking AF_UNIX connect
    # does not "complete later" as TCP's EINPROGRESS does). Every client must still get a
    # working connection (or a clear error), never one that is not connected at all.
    base = open_fd_count()
    errors = await _serve_crowd(tmp_path / "srv.sock", shared_file, backlog=16)
    assert errors == [], f"{len(errors)} of {CLIENTS} clients failed, first: {errors[0]!r}"
    assert open_fd_count() == base


async def test_connect_to_a_full_backlog_is_never_a_dead_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    filler = socket.socket(socket.AF_UNIX)
    filler.setblocking(False)
    filler.connect(path)  # the backlog is full from here on; nobody accepts
    try:
        try:
            conn = await asyncio.wait_for(open_unix_connection(path), 0.2)
        except (TimeoutError, OSError):
            pass  # an error, or waiting for room in the backlog: both honest
        else:
            peer = conn.get_extra_info("peername")
            conn.abort()
            await conn.wait_closed()
            pytest.fail(
                f"open_unix_connection returned a connection that is not connected "
                f"(peername {peer!r}): asyncio's sock_connect took EAGAIN for EINPROGRESS"
            )
    finally:
        filler.close()
        listener.close()
