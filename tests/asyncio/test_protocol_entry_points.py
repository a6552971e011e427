"""create_unix_server / create_unix_connection: your own AncillaryProtocol, no task per peer."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import RecordingProtocol, read_all, tagged_pipe, wait_until, within

from aioancillary import (
    AncillaryMessage,
    AncillaryProtocol,
    AncillaryTransport,
    PeerRejectedError,
    create_unix_connection,
    create_unix_server,
)


class Echo(AncillaryProtocol):
    """Sends every message back with its fds (handed over: closed once sent)."""

    instances: ClassVar[list[Echo]] = []

    def __init__(self) -> None:
        self.transport: AncillaryTransport | None = None
        self.lost = asyncio.get_running_loop().create_future()
        Echo.instances.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, AncillaryTransport)
        self.transport = transport

    def message_received(self, message: AncillaryMessage) -> None:
        assert self.transport is not None
        with message:
            self.transport.write_fds(b"echo:" + message.data, message.take_fds(), close_fds=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@pytest.fixture(autouse=True)
def _fresh_instances() -> None:
    Echo.instances = []


async def roundtrip(transport: AncillaryTransport, proto: RecordingProtocol, tag: bytes) -> None:
    before = len(proto.messages)
    r = tagged_pipe(tag)
    transport.write_fds(tag, [r])
    os.close(r)
    (msg,) = (await proto.wait_messages(before + 1))[before:]
    assert msg.data == b"echo:" + tag
    assert read_all(msg.fds[0]) == tag


@pytest.mark.parametrize("where", ["path", "abstract", "sock"])
async def test_protocol_server_and_client(tmp_path: Path, where: str) -> None:
    path: str | bytes = str(tmp_path / "p.sock")
    if where == "abstract":
        path = b"\0aioancillary-test-" + uuid.uuid4().hex.encode()
    listener = None
    if where == "sock":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen()
        server = await create_unix_server(Echo, sock=listener)
    else:
        server = await create_unix_server(Echo, path)
    async with server:
        transport, proto = await within(create_unix_connection(RecordingProtocol, path))
        try:
            assert isinstance(proto, RecordingProtocol)
            assert proto.transport is transport
            await roundtrip(transport, proto, b"one")
            await roundtrip(transport, proto, b"two")
            await wait_until(lambda: server.stats.active == 1)
            assert len(Echo.instances) == 1
        finally:
            transport.close()
            await within(proto.lost)
            proto.close_messages()
        await within(Echo.instances[0].lost)
        await wait_until(lambda: server.stats.active == 0)
    if listener is not None:
        assert listener.fileno() == -1  # the server owned it


async def test_close_clients_and_wait_closed_cover_protocol_connections(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = await create_unix_server(Echo, path)
    clients = [await within(create_unix_connection(RecordingProtocol, path)) for _ in range(3)]
    await wait_until(lambda: server.stats.active == 3)
    server.close()
    waiter = asyncio.ensure_future(server.wait_closed())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # three connections still open
    server.close_clients()
    await within(waiter)
    for transport, proto in clients:
        await within(proto.lost)  # the server side closed: EOF, then closed here
        transport.close()
        proto.close_messages()


async def test_create_unix_connection_with_sock_and_authorize() -> None:
    left, right = socket.socketpair()
    loop = asyncio.get_running_loop()
    server_side = AncillaryTransport(loop, right, Echo())
    try:
        with pytest.raises(PeerRejectedError):
            await create_unix_connection(RecordingProtocol, sock=left, authorize=lambda c: False)
        assert left.fileno() == -1  # refused by authorize: closed
        left, right2 = socket.socketpair()
        server2 = AncillaryTransport(loop, right2, Echo())
        transport, proto = await create_unix_connection(
            RecordingProtocol, sock=left, authorize=lambda c: c is not None
        )
        await roundtrip(transport, proto, b"via sock")
        transport.close()
        await within(proto.lost)
        proto.close_messages()
        server2.close()
    finally:
        server_side.close()
    for echo in Echo.instances:
        await within(echo.lost)


async def test_a_protocol_without_messages_unsent_still_gets_its_fds_closed() -> None:
    class Bare(asyncio.BaseProtocol):
        pass

    r, w = os.pipe()
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    transport = AncillaryTransport(loop, left, Bare())  # type: ignore[arg-type]
    transport.set_write_buffer_limits(high=1 << 24)
    while not transport.get_write_buffer_size():
        transport.write(b"x" * 65536)
        await asyncio.sleep(0)
    transport.write_fds(b"queued", [w])
    os.close(w)
    transport.abort()
    await asyncio.sleep(0)
    right.close()
    assert os.read(r, 1) == b""
    os.close(r)
