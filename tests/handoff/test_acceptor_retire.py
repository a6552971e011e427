"""Acceptor.retire_worker (a graceful stop of one worker) and stop_accepting's last sweep of
the backlog (clients the kernel had queued are handed over, not reset)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
from helpers import wait_until, within

from aioancillary import Acceptor, HandedClient, Worker


async def answer(client: HandedClient) -> None:
    loop = asyncio.get_running_loop()
    data = await loop.sock_recv(client.sock, 1024)
    await loop.sock_sendall(client.sock, b"answer " + data)


@contextlib.asynccontextmanager
async def worker_for(acceptor: Acceptor) -> AsyncIterator[tuple[Worker, asyncio.Task[None]]]:
    ours, theirs = socket.socketpair()
    acceptor.add_worker(ours)
    worker = await Worker.connect(sock=theirs)
    serving = asyncio.ensure_future(worker.serve(answer))
    try:
        yield worker, serving
    finally:
        await within(serving, 10)
        worker.close()
        await worker.wait_closed()


async def ask(port: int, text: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(text)
        return await within(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_retired_worker_finishes_its_clients_and_gets_no_new_ones() -> None:
    async with Acceptor(dispatch="round-robin") as acceptor:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        acceptor.add_listener(listener)
        async with worker_for(acceptor) as (_a, serving_a), worker_for(acceptor):
            await acceptor.wait_workers(2)
            first, second = acceptor.workers
            # A client in progress with the first worker when it is retired.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await wait_until(lambda: first.in_flight == 1)
            acceptor.retire_worker(first)
            assert acceptor.workers == (second,)
            assert first.cap == 0
            assert acceptor.stats().in_flight == 1  # still counted while it finishes
            assert [await ask(port, b"n%d" % n) for n in range(4)] == [
                b"answer n%d" % n for n in range(4)
            ]
            assert second.completed == 4  # every new client went to the other one
            assert not serving_a.done()  # its client is still in progress
            writer.write(b"last")
            assert await within(reader.read(), 10) == b"answer last"
            writer.close()
            await writer.wait_closed()
            await within(serving_a, 10)  # its stream ended: serve() returned
            assert await acceptor.drain(10)
            with pytest.raises(ValueError, match="not a registered worker"):
                acceptor.retire_worker(first)
            acceptor.close()
        stats = acceptor.stats()
        assert (stats.completed, stats.lost, stats.in_flight) == (5, 0, 0)


async def test_retiring_the_last_worker_leaves_new_clients_in_the_backlog() -> None:
    async with Acceptor() as acceptor:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        acceptor.add_listener(listener)
        async with worker_for(acceptor):
            await acceptor.wait_workers(1)
            acceptor.retire_worker(acceptor.workers[0])
            assert not acceptor.stats().accepting
            pending = asyncio.ensure_future(ask(port, b"later"))
            await asyncio.sleep(0.1)
            assert acceptor.stats().accepted == 0
            async with worker_for(acceptor):  # a new worker takes it from the backlog
                assert await within(pending, 10) == b"answer later"
                acceptor.close()


async def test_stop_accepting_hands_over_the_clients_already_in_the_backlog() -> None:
    async with Acceptor() as acceptor:
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        acceptor.add_listener(listener)
        async with worker_for(acceptor):
            await acceptor.wait_workers(1)
            # Connected and queued by the kernel, not accepted yet: the loop has not run.
            clients = [socket.create_connection(listener.getsockname()) for _ in range(100)]
            for n, client in enumerate(clients):
                client.sendall(b"queued %d" % n)
            acceptor.stop_accepting()  # closing the listener would reset them
            assert acceptor.stats().accepted == 100
            loop = asyncio.get_running_loop()
            for n, client in enumerate(clients):
                client.setblocking(False)
                assert await within(loop.sock_recv(client, 1024)) == b"answer queued %d" % n
                client.close()
            acceptor.close()
