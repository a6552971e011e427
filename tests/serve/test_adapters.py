"""The adapters in one process: an Acceptor hands real TCP clients over a socketpair to a
Worker whose clients an adapter serves; real HTTP on real sockets.

Each interface: keep-alive (a connection is one client until it closes), pipelining, a 10 MB
request body, a client that disconnects mid-request, and the graceful stop (requests in
progress finish and say ``Connection: close``, a connection that asks again in time is
answered and closed, a quiet one is closed, what is left at the deadline is aborted).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from helpers import wait_until, within
from helpers.http_load import read_response, request
from helpers.serve_apps import EchoProtocol, app, echo_handler, make_aiohttp_app

from aioancillary import (
    Acceptor,
    AiohttpAdapter,
    AppStartupError,
    AsgiAdapter,
    ClientAdapter,
    ProtocolAdapter,
    StreamAdapter,
    Worker,
)

DRAIN_IDLE = 0.3

HTTP = ["asgi-httptools", "asgi-h11", "aiohttp"]


def make_adapter(kind: str, **options: Any) -> ClientAdapter:
    if kind == "asgi-httptools":
        return AsgiAdapter(app, http="httptools", drain_idle=DRAIN_IDLE, **options)
    if kind == "asgi-h11":
        return AsgiAdapter(app, http="h11", drain_idle=DRAIN_IDLE, **options)
    if kind == "aiohttp":
        return AiohttpAdapter(make_aiohttp_app(), drain_idle=DRAIN_IDLE, **options)
    if kind == "protocol":
        return ProtocolAdapter(EchoProtocol, drain_idle=DRAIN_IDLE)
    if kind == "handler":
        return StreamAdapter(echo_handler, drain_idle=DRAIN_IDLE)
    raise AssertionError(kind)


@dataclass
class Served:
    port: int
    acceptor: Acceptor
    adapter: ClientAdapter
    serving: asyncio.Task[bool]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    def stop(self) -> None:
        """End the worker's client stream: the adapter's graceful stop begins."""
        (worker,) = self.acceptor.workers
        self.acceptor.retire_worker(worker)


@contextlib.asynccontextmanager
async def served(adapter: ClientAdapter, graceful_timeout: float = 10.0) -> AsyncIterator[Served]:
    async with Acceptor() as acceptor:
        listener = socket.create_server(("127.0.0.1", 0))
        acceptor.add_listener(listener)
        ours, theirs = socket.socketpair()
        acceptor.add_worker(ours)
        worker = await Worker.connect(sock=theirs)
        try:
            async with adapter:
                serving = asyncio.ensure_future(
                    adapter.serve(worker, graceful_timeout=graceful_timeout)
                )
                try:
                    yield Served(listener.getsockname()[1], acceptor, adapter, serving)
                finally:
                    acceptor.close()
                    await within(serving, 20)
        finally:
            worker.close()
            await worker.wait_closed()


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/"
) -> tuple[int, dict[str, str], bytes]:
    writer.write(request(path))
    return await within(read_response(reader), 10)


# -- HTTP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HTTP)
async def test_a_keep_alive_connection_is_one_client_until_it_closes(kind: str) -> None:
    async with served(make_adapter(kind)) as s:
        reader, writer = await s.connect()
        pids = set()
        for _ in range(20):
            status, headers, body = await get(reader, writer)
            assert (status, body) == (200, b"hello")
            assert headers.get("connection", "") != "close"
            pids.add(headers["x-pid"])
        assert pids == {str(os.getpid())}
        assert s.adapter.connections == 1
        stats = s.acceptor.stats()
        assert (stats.accepted, stats.completed, stats.in_flight) == (1, 0, 1)
        await close(writer)
        await wait_until(lambda: s.acceptor.stats().completed == 1)
        assert s.acceptor.stats().in_flight == 0
        assert s.adapter.connections == 0


@pytest.mark.parametrize("kind", HTTP)
async def test_pipelined_requests_are_answered_in_order(kind: str) -> None:
    async with served(make_adapter(kind)) as s:
        reader, writer = await s.connect()
        paths = ["/", "/state", "/fds", "/"] * 3
        writer.write(b"".join(request(path) for path in paths))
        bodies = [(await within(read_response(reader), 10))[2] for _ in paths]
        assert bodies[0::4] == [b"hello"] * 3
        assert bodies[1::4] == [str(os.getpid()).encode()] * 3  # the lifespan state
        await close(writer)


@pytest.mark.parametrize("kind", HTTP)
async def test_a_10_mb_request_body(kind: str) -> None:
    body = os.urandom(10 * 1024 * 1024)
    async with served(make_adapter(kind)) as s:
        reader, writer = await s.connect()
        writer.write(request("/echo", body=body))
        status, _headers, answer = await within(read_response(reader), 30)
        assert status == 200
        assert answer == f"{len(body)} {zlib.crc32(body)}".encode()
        status, _headers, answer = await get(reader, writer)  # the connection goes on
        assert (status, answer) == (200, b"hello")
        await close(writer)


@pytest.mark.parametrize("kind", HTTP)
async def test_a_client_that_disconnects_mid_request_is_reported_finished(kind: str) -> None:
    async with served(make_adapter(kind)) as s:
        reader, writer = await s.connect()
        head = request("/echo", body=b"x" * 10_000_000)[:-9_000_000]  # 1 MB short
        writer.write(head)
        await writer.drain()
        await close(writer)
        await wait_until(lambda: s.acceptor.stats().completed == 1, timeout=10)
        assert s.acceptor.stats().in_flight == 0
        reader, writer = await s.connect()  # and serving goes on
        assert (await get(reader, writer))[2] == b"hello"
        await close(writer)


@pytest.mark.parametrize("kind", HTTP)
async def test_graceful_stop_finishes_requests_in_progress_with_connection_close(
    kind: str,
) -> None:
    async with served(make_adapter(kind)) as s:
        reader, writer = await s.connect()
        assert (await get(reader, writer))[0] == 200
        writer.write(request("/sleep?s=0.5"))
        await wait_until(lambda: s.adapter.connections == 1)
        await asyncio.sleep(0.1)  # the request is in the application now
        s.stop()
        status, headers, body = await within(read_response(reader), 10)
        assert (status, body) == (200, b"slept")
        assert headers["connection"] == "close"
        assert await within(reader.read(), 10) == b""  # then the server closes
        await close(writer)
        assert await within(s.serving, 10) is True
        assert s.acceptor.stats().completed == 1


@pytest.mark.parametrize("kind", HTTP)
async def test_graceful_stop_answers_a_connection_that_asks_again_and_closes_it(
    kind: str,
) -> None:
    async with served(make_adapter(kind)) as s:
        reader, writer = await s.connect()
        assert (await get(reader, writer))[0] == 200  # now idle, as between two requests
        s.stop()
        await wait_until(lambda: s.adapter.draining)
        status, headers, body = await get(reader, writer)  # within drain_idle
        assert (status, body) == (200, b"hello")
        assert headers["connection"] == "close"
        assert await within(reader.read(), 10) == b""
        await close(writer)
        assert await within(s.serving, 10) is True


@pytest.mark.parametrize("kind", HTTP)
async def test_graceful_stop_closes_quiet_connections(kind: str) -> None:
    async with served(make_adapter(kind)) as s:
        quiet = [await s.connect() for _ in range(3)]
        for reader, writer in quiet[:2]:
            assert (await get(reader, writer))[0] == 200
        await wait_until(lambda: s.adapter.connections == 3)  # the third never asked
        s.stop()
        for reader, writer in quiet:
            assert await within(reader.read(), 10) == b""
            await close(writer)
        assert await within(s.serving, 10) is True
        assert s.acceptor.stats().completed == 3


@pytest.mark.parametrize("kind", ["asgi-httptools", "aiohttp"])
async def test_graceful_stop_aborts_what_is_left_at_the_deadline(kind: str) -> None:
    async with served(make_adapter(kind), graceful_timeout=0.5) as s:
        reader, writer = await s.connect()
        writer.write(request("/sleep?s=30"))
        await wait_until(lambda: s.adapter.connections == 1)
        await asyncio.sleep(0.1)
        s.stop()
        with contextlib.suppress(ConnectionResetError):
            assert await within(reader.read(), 10) == b""
        assert await within(s.serving, 10) is False
        assert s.acceptor.stats().completed == 1
        await close(writer)


@pytest.mark.parametrize("kind", ["asgi-httptools", "aiohttp"])
async def test_startup_failure_raises_app_startup_error(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_TEST_FAIL_STARTUP", "1")
    adapter = make_adapter(kind)
    with pytest.raises(AppStartupError, match="startup failed"):
        await adapter.start()
    await adapter.close()


@pytest.mark.parametrize("kind", HTTP)
async def test_startup_and_shutdown_run_once(
    kind: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_TEST_EVENTS", str(tmp_path))
    async with served(make_adapter(kind)) as s:
        for _ in range(3):
            reader, writer = await s.connect()
            assert (await get(reader, writer, "/state"))[2] == str(os.getpid()).encode()
            await close(writer)
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{os.getpid()}.startup"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{os.getpid()}.shutdown",
        f"{os.getpid()}.startup",
    ]


# -- protocol and stream handler ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["protocol", "handler"])
async def test_protocols_and_handlers_serve_until_the_client_leaves(kind: str) -> None:
    async with served(make_adapter(kind)) as s:
        conns = [await s.connect() for _ in range(3)]
        for n, (reader, writer) in enumerate(conns):
            for m in range(3):
                writer.write(f"line {n} {m}\n".encode())
                assert await within(reader.readline()) == f"{os.getpid()} line {n} {m}\n".encode()
        await wait_until(lambda: s.adapter.connections == 3)
        for _reader, writer in conns:
            await close(writer)
        await wait_until(lambda: s.acceptor.stats().completed == 3)


@pytest.mark.parametrize("kind", ["protocol", "handler"])
async def test_protocols_and_handlers_get_the_whole_graceful_timeout(kind: str) -> None:
    async with served(make_adapter(kind), graceful_timeout=0.6) as s:
        reader, writer = await s.connect()
        writer.write(b"hello\n")
        assert (await within(reader.readline())).endswith(b"hello\n")
        s.stop()
        await asyncio.sleep(DRAIN_IDLE * 1.5)  # no request notion: not closed as idle
        writer.write(b"still here\n")
        assert (await within(reader.readline())).endswith(b"still here\n")
        assert await within(s.serving, 10) is False  # aborted at the deadline
        with contextlib.suppress(ConnectionResetError):
            assert await within(reader.read(), 10) == b""
        await close(writer)


def test_adapters_are_exported_with_their_interfaces() -> None:
    for cls in (AsgiAdapter, AiohttpAdapter, ProtocolAdapter, StreamAdapter):
        assert issubclass(cls, ClientAdapter)


# -- accepting in the worker (serve --accept workers) -------------------------------------------


@pytest.mark.parametrize("kind", [*HTTP, "protocol", "handler"])
async def test_accept_on_serves_what_this_process_accepts_until_the_stop_begins(
    kind: str,
) -> None:
    """Connections the adapter accepts itself are served and drained like handed ones, with
    nobody to report them to; once the stop begins it accepts no more: a connection made then
    waits in the backlog for another process (here, the test takes it)."""
    async with served(make_adapter(kind)) as s:
        listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        port = listener.getsockname()[1]
        await s.adapter.accept_on([listener.dup()], backlog=16)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        http = kind in HTTP
        if http:
            status, headers, body = await get(reader, writer)
            assert (status, body, headers.get("connection", "")) == (200, b"hello", "")
        else:
            writer.write(b"one\n")
            assert await within(reader.readline()) == f"{os.getpid()} one\n".encode()
        await wait_until(lambda: s.adapter.connections == 1)
        assert s.acceptor.stats().accepted == 0  # the acceptor had no part in it
        s.stop()
        await wait_until(lambda: s.adapter.draining)
        late = socket.create_connection(("127.0.0.1", port))
        listener.settimeout(10)
        taken, _addr = listener.accept()  # still queued: the adapter no longer accepts
        if http:
            status, headers, _body = await get(reader, writer)
            assert (status, headers.get("connection")) == (200, "close")
            assert await within(reader.read(), 10) == b""
        else:
            writer.write(b"two\n")  # served on until the client leaves
            assert await within(reader.readline()) == f"{os.getpid()} two\n".encode()
        await close(writer)
        assert await within(s.serving, 10) is True
        assert s.adapter.connections == 0
        for sock in (taken, late, listener):
            sock.close()


@pytest.mark.parametrize("kind", HTTP)
async def test_a_connection_made_after_the_stop_began_is_drained_too(kind: str) -> None:
    """Its protocol was made before the stop began, and its ``connection_made`` (which the loop
    schedules) ran after: it is drained like the others, not served with keep-alive until the
    deadline aborts it."""
    adapter = make_adapter(kind)
    assert isinstance(adapter, ProtocolAdapter)
    async with adapter:
        listener = socket.create_server(("127.0.0.1", 0))
        peer = socket.create_connection(listener.getsockname())
        accepted, _addr = listener.accept()
        tracked = adapter._accepted()  # the loop accepted and called the factory...
        adapter.begin_drain()  # ...the stop began...
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: tracked, accepted)  # ...connection_made
        reader, writer = await asyncio.open_connection(sock=peer)
        status, headers, body = await get(reader, writer)
        assert (status, body, headers.get("connection")) == (200, b"hello", "close")
        assert await within(reader.read(), 10) == b""
        await close(writer)
        assert await within(adapter.drain(5), 10) is True
        listener.close()


@pytest.mark.parametrize("kind", [*HTTP, "protocol", "handler"])
async def test_the_stop_waits_for_a_connection_the_loop_accepted_but_had_not_counted(
    kind: str,
) -> None:
    """The loop accepted the connection, and its protocol (asyncio: a task per accepted
    connection) comes a turn or two later: a stop that begins in between must still count,
    serve and drain it, not end with it unserved (the worker would exit and reset it)."""
    adapter = make_adapter(kind)
    async with adapter:
        listener = socket.create_server(("127.0.0.1", 0))
        await adapter.accept_on([listener.dup()], backlog=16)
        peer = socket.create_connection(listener.getsockname())
        peer.sendall(request() if kind in HTTP else b"one\n")
        for _ in range(2):  # asyncio: the loop's reader accepts during the first turn
            await asyncio.sleep(0)
        adapter.begin_drain()
        if kind not in HTTP:
            await asyncio.sleep(0.1)
            peer.shutdown(socket.SHUT_WR)  # a stream client leaves once answered
        assert await within(adapter.drain(5), 10) is True
        peer.setblocking(False)
        answer = peer.recv(65536)  # everything was answered before drain() returned
        if kind in HTTP:
            assert answer.startswith(b"HTTP/1.1 200")
            assert b"connection: close" in answer.lower()
        else:
            assert answer == f"{os.getpid()} one\n".encode()
        peer.close()
        listener.close()
