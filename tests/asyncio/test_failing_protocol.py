"""A protocol that fails: its server stays closable, each failure is reported once, and the
fds of the messages it was given are closed by the transport (issue 15, item 3)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import RecordingProtocol, wait_until, within

from aioancillary import (
    AncillaryMessage,
    AncillaryProtocol,
    AncillaryTransport,
    create_unix_server,
    frame_header,
    send_fds,
)


class Boom(Exception):
    """The protocol's own bug."""


class FailsToStart(AncillaryProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raise Boom("connection_made failed")


class WritesThenFails(AncillaryProtocol):
    """Queues a message with a duplicate of an fd, then fails: the duplicate must be closed."""

    fd = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, AncillaryTransport)
        transport.write_fds(b"hello", [WritesThenFails.fd])
        transport.write_fds(b"queued", [WritesThenFails.fd])  # queued: a duplicate
        raise Boom("connection_made failed after writing")


class Reports:
    """The loop's exception handler, recorded."""

    def __init__(self) -> None:
        self.contexts: list[dict[str, Any]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.contexts.append(context)

    @property
    def exceptions(self) -> list[BaseException | None]:
        return [ctx.get("exception") for ctx in self.contexts]


@pytest.fixture
async def reports() -> AsyncIterator[Reports]:
    """What reaches the running loop's exception handler, recorded."""
    loop = asyncio.get_running_loop()
    recorded = Reports()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(recorded)
    yield recorded
    loop.set_exception_handler(previous)


def _none() -> AncillaryProtocol:
    return None  # type: ignore[return-value]


def _clients(path: Path, count: int) -> list[socket.socket]:
    clients = []
    for _ in range(count):
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        clients.append(client)
    return clients


async def _closed_by_server(client: socket.socket) -> bytes:
    """The server closed its end: the client reads to EOF; return what came before it."""
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    received = b""
    while chunk := await within(loop.sock_recv(client, 65536)):
        received += chunk
    return received


@pytest.mark.parametrize(
    ("factory", "error"),
    [(_none, TypeError), (FailsToStart, Boom)],
    ids=["factory-returns-None", "connection_made-raises"],
)
async def test_a_failing_protocol_leaves_the_server_closable(
    tmp_path: Path,
    reports: Reports,
    factory: Callable[[], AncillaryProtocol],
    error: type[Exception],
) -> None:
    path = tmp_path / "s.sock"
    server = await create_unix_server(factory, path)
    clients = _clients(path, 2)
    try:
        await wait_until(lambda: len(reports.contexts) >= 2)
        for client in clients:
            await _closed_by_server(client)
        server.close()
        await within(server.wait_closed())
    finally:
        for client in clients:
            client.close()
    assert len(reports.contexts) == 2, reports.contexts  # once per failure, no more
    assert all(isinstance(exc, error) for exc in reports.exceptions), reports.exceptions
    assert all(ctx.get("server") is server for ctx in reports.contexts)
    if error is TypeError:
        assert "protocol_factory" in str(reports.exceptions[0])
    assert server.stats.handler_errors == 2
    assert server.stats.active == 0


async def test_the_server_goes_on_serving_after_a_protocol_failed(
    tmp_path: Path, reports: Reports
) -> None:
    made: list[RecordingProtocol] = []

    def factory() -> AncillaryProtocol:
        if not made:
            made.append(RecordingProtocol())  # the first one is never used
            return FailsToStart()
        protocol = RecordingProtocol()
        made.append(protocol)
        return protocol

    path = tmp_path / "s.sock"
    async with await create_unix_server(factory, path) as server:
        (first,) = _clients(path, 1)
        with first:
            await _closed_by_server(first)
        (second,) = _clients(path, 1)
        with second:
            second.sendall(frame_header(0, 3) + b"abc")
            await wait_until(lambda: len(made) == 2 and bool(made[1].messages))
            assert made[1].messages[0].data == b"abc"
            made[1].close_messages()
    assert len(reports.contexts) == 1
    assert server.stats.accepted == 2


async def test_connection_made_failing_after_a_write_closes_what_was_queued(
    tmp_path: Path, reports: Reports
) -> None:
    r, w = os.pipe()
    WritesThenFails.fd = r
    path = tmp_path / "s.sock"
    try:
        async with await create_unix_server(WritesThenFails, path):
            (client,) = _clients(path, 1)
            with client:
                assert await _closed_by_server(client) == frame_header(1, 5) + b"hello"
                await wait_until(lambda: len(reports.contexts) == 1)
        os.close(r)
        # Every copy of the read end is closed (the queued duplicate too): the pipe is broken.
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
    finally:
        os.close(w)
    assert isinstance(reports.exceptions[0], Boom)


class RaisesOnMessage(AncillaryProtocol):
    """Keeps a reference to every message (as a protocol with a bug might), then raises."""

    def __init__(self) -> None:
        self.kept: list[AncillaryMessage] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def message_received(self, message: AncillaryMessage) -> None:
        self.kept.append(message)
        raise Boom(f"cannot handle {message.data!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


class RaisesOnBatch(RaisesOnMessage):
    def messages_received(self, messages: list[AncillaryMessage]) -> None:
        self.kept.extend(messages)
        raise Boom("cannot handle a batch")


def _pipe_with_reader_sent(peer: socket.socket, data: bytes) -> int:
    """Send a pipe's read end with a frame; return its write end (the only other copy)."""
    r, w = os.pipe()
    try:
        send_fds(peer, frame_header(1, len(data)) + data, [r])
    finally:
        os.close(r)
    return w


def _broken(w: int) -> bool:
    try:
        os.write(w, b"x")
    except BrokenPipeError:
        return True
    return False


@pytest.mark.parametrize("protocol_class", [RaisesOnMessage, RaisesOnBatch])
async def test_a_raising_message_callback_gives_its_messages_fds_back_to_the_transport(
    reports: Reports, protocol_class: type[RaisesOnMessage]
) -> None:
    """Decided: a message callback that raises gives up the messages of that call. The
    transport closes every fd they still hold (whatever references the protocol kept) and
    the connection, as asyncio's transports close when ``data_received`` raises."""
    left, right = socket.socketpair()
    protocol = protocol_class()
    transport = AncillaryTransport(asyncio.get_running_loop(), left, protocol)
    writers = []
    try:
        writers = [_pipe_with_reader_sent(right, b"one"), _pipe_with_reader_sent(right, b"two")]
        exc = await within(protocol.lost)
        assert isinstance(exc, Boom)
        assert reports.exceptions == [exc]  # reported once, with the transport
        assert reports.contexts[0]["transport"] is transport
        # The messages are still referenced (by the protocol, and by the exception's
        # traceback the handler kept), yet hold no fd: the transport closed them.
        assert protocol.kept
        assert all(msg.fd_count == 0 for msg in protocol.kept)
        assert all(_broken(w) for w in writers)
        right.setblocking(False)
        with contextlib.suppress(ConnectionResetError):  # closed with data unread: a reset
            assert right.recv(16) == b""  # the transport closed the connection
    finally:
        for w in writers:
            os.close(w)
        transport.abort()
        right.close()


async def test_a_raising_eof_callback_closes_the_transport_and_is_reported(
    reports: Reports,
) -> None:
    class RaisesOnEof(RecordingProtocol):
        def eof_received(self) -> bool | None:
            raise Boom("eof_received failed")

    left, right = socket.socketpair()
    protocol = RaisesOnEof()
    transport = AncillaryTransport(asyncio.get_running_loop(), left, protocol)
    try:
        right.shutdown(socket.SHUT_WR)
        exc = await within(protocol.lost)
        assert isinstance(exc, Boom)
        assert reports.exceptions == [exc]
        assert transport.is_closing()
    finally:
        transport.abort()
        right.close()


async def test_a_raising_pause_writing_is_reported_and_the_write_stands(
    reports: Reports,
) -> None:
    class RaisesOnPause(RecordingProtocol):
        def pause_writing(self) -> None:
            raise Boom("pause_writing failed")

    left, right = socket.socketpair()
    protocol = RaisesOnPause()
    transport = AncillaryTransport(asyncio.get_running_loop(), left, protocol)
    try:
        transport.set_write_buffer_limits(high=0)
        for _ in range(64):  # until the kernel buffer is full and a write is queued
            transport.write(b"x" * 65536)
            if transport.get_write_buffer_size():
                break
        assert transport.get_write_buffer_size()
        assert len(reports.exceptions) == 1
        assert isinstance(reports.exceptions[0], Boom)
        assert not transport.is_closing()
    finally:
        transport.abort()
        await within(protocol.lost)
        right.close()
