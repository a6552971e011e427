"""The acceptor's flow control and ending: a worker whose socket is full, serve_forever, and
the `async with` exit that aborts workers that do not leave."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest
from helpers import wait_until, within
from helpers.acceptor import acceptor_with_workers, link_transport, linked_worker, request

from aioancillary import Acceptor, AncillaryConnection
from aioancillary._handoff import _acceptor


async def full_worker(acceptor: Acceptor) -> tuple[Any, AncillaryConnection]:
    """A worker that reads nothing (its side paused), on a socket with the smallest buffers:
    its link's queue fills after a few clients, and the link pauses at the first one queued."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    link = acceptor.add_worker(ours)
    link_transport(link).set_write_buffer_limits(high=0)
    fake = AncillaryConnection(theirs)
    with await within(fake.recv()) as welcome:
        assert welcome.data.startswith(b"W")
    fake.transport.pause_reading()
    return link, fake


async def read_clients(fake: AncillaryConnection, count: int) -> int:
    """Read the fake worker's messages until ``count`` client fds came; return the fds seen."""
    seen = 0
    while seen < count:
        with await within(fake.recv()) as msg:
            seen += msg.fd_count  # closing the message closes the clients: they see the end
    return seen


async def connect(addr: Any, clients: list[socket.socket]) -> None:
    sock = socket.socket()
    sock.setblocking(False)
    clients.append(sock)
    await asyncio.get_running_loop().sock_connect(sock, addr)


async def test_a_full_worker_socket_stops_accepting_until_it_reads_again() -> None:
    acceptor = Acceptor()
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    acceptor.add_listener(listener)
    addr = listener.getsockname()
    link, fake = await full_worker(acceptor)
    clients: list[socket.socket] = []
    try:
        while link.cap:  # until the link's queue holds clients the kernel would not take
            assert len(clients) < 400, "the worker's socket never filled"
            await connect(addr, clients)
            await wait_until(lambda: acceptor.stats().accepted == len(clients) or not link.cap)
        assert link_transport(link).get_write_buffer_fds() > 0
        # Its only worker is full: the acceptor stops reading the listener (now, or at the
        # next client's wake-up) and the next clients wait in the kernel's backlog.
        for _ in range(3):
            await connect(addr, clients)
        await wait_until(lambda: not acceptor.stats().accepting)
        accepted = acceptor.stats().accepted
        assert accepted < len(clients)
        for _ in range(20):
            await asyncio.sleep(0)
        assert acceptor.stats().accepted == accepted
        # The worker reads again: its queue drains, it gets room, accepting resumes and the
        # backlog's clients are handed over too.
        fake.transport.resume_reading()
        assert await read_clients(fake, len(clients)) == len(clients)
        await wait_until(lambda: acceptor.stats().accepting)
        assert link.cap == link.limit
        stats = acceptor.stats()
        assert (stats.accepted, stats.handed, stats.lost) == (len(clients), len(clients), 0)
    finally:
        for sock in clients:
            sock.close()
        acceptor.close()
        fake.close()
        await within(fake.wait_closed())
        await within(acceptor.wait_closed())


async def test_clients_go_to_the_other_worker_while_one_is_full() -> None:
    acceptor = Acceptor()
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    acceptor.add_listener(listener)
    addr = listener.getsockname()
    link, fake = await full_worker(acceptor)
    clients: list[socket.socket] = []
    good = None
    try:
        while link.cap:
            assert len(clients) < 400, "the worker's socket never filled"
            await connect(addr, clients)
            await wait_until(lambda: acceptor.stats().accepted == len(clients) or not link.cap)
        await wait_until(lambda: acceptor.stats().accepted == len(clients))
        good = await linked_worker(acceptor, "good")
        answers = [(await request(addr, f"r{n}"))["worker"] for n in range(5)]
        assert answers == ["good"] * 5
        assert acceptor.stats().accepting
        assert link.cap == 0
        fake.transport.resume_reading()
        assert await read_clients(fake, len(clients)) == len(clients)
        await wait_until(lambda: link.cap == link.limit)
    finally:
        for sock in clients:
            sock.close()
        acceptor.close()
        fake.close()
        await within(fake.wait_closed())
        if good is not None:
            await good.close()
        await within(acceptor.wait_closed())


async def test_cancelling_serve_forever_closes_the_acceptor() -> None:
    async with acceptor_with_workers(1) as (acceptor, workers, addr):
        serving = asyncio.ensure_future(acceptor.serve_forever())
        workers[0].hold = True
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"in flight")
        await wait_until(lambda: len(workers[0].held) == 1)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert acceptor.listeners == ()  # closed: new clients are refused
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*addr)
        await within(workers[0].task)  # the worker's iteration ended (the link's EOF)
        await workers[0].release()  # the client in flight is still served
        assert b"in flight" in await within(reader.readline())
        writer.close()
        await writer.wait_closed()
        assert await acceptor.drain(timeout=5)


async def test_leaving_async_with_aborts_workers_that_do_not_leave(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_acceptor, "_CLOSE_TIMEOUT", 0.1)
    ours, stuck = socket.socketpair()  # a worker that never reads, so never sees the end
    with stuck:
        async with Acceptor() as acceptor:
            acceptor.add_worker(ours)
            assert len(acceptor.workers) == 1
        # close() ended the link; the worker did not leave within the deadline, so the
        # link was aborted and the exit returned.
        assert not acceptor.workers
        stuck.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while stuck.recv(65536):  # the welcome, then the end of the link
                pass
        assert stuck.recv(1) == b""
