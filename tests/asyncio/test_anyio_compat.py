"""aioancillary under anyio's asyncio backend: anyio task groups, cancel scopes and timeouts
drive aioancillary connections and a server.

anyio's asyncio backend runs on an asyncio event loop, so aioancillary's transport (built on
``loop.add_reader``/``add_writer``) works there unchanged, on the default loop and on uvloop
(``backend_options={"loop_factory": ...}``). The trio backend has no asyncio loop, and is not
supported.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import anyio
import pytest
from helpers import LOOP_FACTORIES, LOOP_NAMES, is_open, read_all, tagged_pipe

from aioancillary import (
    AncillaryConnection,
    connection_pair,
    open_unix_connection,
    same_user,
    start_unix_server,
)


def run_on(loop_name: str, main: object) -> None:
    assert callable(main)
    anyio.run(main, backend="asyncio", backend_options={"loop_factory": LOOP_FACTORIES[loop_name]})


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_connection_pair_in_an_anyio_task_group(loop_name: str) -> None:
    async def main() -> None:
        a, b = await connection_pair()
        tags = [f"message {i}".encode() for i in range(20)]
        received: list[bytes] = []

        async def send() -> None:
            for tag in tags:
                r = tagged_pipe(tag)
                try:
                    await a.send_fds(tag, [r])
                finally:
                    os.close(r)
            a.write_eof()

        async def receive() -> None:
            async for msg in b:  # ends at the EOF written above
                with msg, msg.take_fd() as fd:
                    assert read_all(fd) == msg.data  # the fd sent with this very message
                    received.append(msg.data)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send)
                tg.start_soon(receive)
        assert received == tags
        for conn in (a, b):
            conn.close()
            await conn.wait_closed()

    run_on(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_server_and_clients_under_anyio(loop_name: str, tmp_path: Path) -> None:
    path = tmp_path / "anyio.sock"

    async def handler(conn: AncillaryConnection) -> None:
        async for msg in conn:
            with msg:
                listener = msg.take_fd().into_socket()
            with listener:  # answer with the port of the listening socket that was passed
                await conn.send(str(listener.getsockname()[1]).encode())

    async def client(expected_port: int, listener: socket.socket) -> None:
        async with await open_unix_connection(path, authorize=same_user) as conn:
            await conn.send_fds(b"listener", [listener])
            with await conn.recv() as reply:
                assert int(reply.data) == expected_port

    async def main() -> None:
        listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
        try:
            with anyio.fail_after(10):
                server = await start_unix_server(handler, path, authorize=same_user)
                async with server, anyio.create_task_group() as tg:
                    for listener in listeners:
                        tg.start_soon(client, listener.getsockname()[1], listener)
        finally:
            for listener in listeners:
                listener.close()

    run_on(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_anyio_cancel_scope_cancels_a_waiting_recv_without_losing_fds(loop_name: str) -> None:
    async def main() -> None:
        a, b = await connection_pair()
        with anyio.move_on_after(0.05) as scope:
            await b.recv()  # nothing was sent: only the scope ends this
        assert scope.cancelled_caught
        r = tagged_pipe(b"after")
        try:
            await a.send_fds(b"after", [r])
        finally:
            os.close(r)
        with anyio.fail_after(5):
            msg = await b.recv()  # the cancelled wait lost nothing: the connection still works
        with msg:
            fd = msg.fds[0].fileno()
            assert read_all(fd) == b"after"
        assert not is_open(fd)
        for conn in (a, b):
            conn.close()
            await conn.wait_closed()

    run_on(loop_name, main)
