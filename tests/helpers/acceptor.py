"""In-process acceptor + worker machinery shared by the acceptor and worker tests.

Workers here are :class:`Worker` objects in the test's own process, linked to the acceptor by a
``socketpair`` (or registered through a path); what they do with each client is scripted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

from aioancillary import AncillaryConnection, AncillaryTransport, WorkerInfo
from aioancillary._handoff._acceptor import Acceptor
from aioancillary._handoff._client import HandedClient
from aioancillary._handoff._ledger import WorkerSlot
from aioancillary._handoff._worker import Worker
from helpers import TIMEOUT, within


class ScriptedWorker:
    """A :class:`Worker` in this process that answers each client with what it knows of it.

    The answer is one JSON line: the worker's name, the client's peer address, the listener
    and its metadata. With ``hold`` set, clients are kept (unanswered, not finished) in
    ``held`` until :meth:`release` answers them.
    """

    def __init__(self, name: str, worker: Worker) -> None:
        self.name = name
        self.worker = worker
        self.hold = False
        self.held: list[HandedClient] = []
        self.served = 0
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        async for client in self.worker:
            if self.hold:
                self.held.append(client)
            else:
                await self.answer(client)

    async def answer(self, client: HandedClient) -> None:
        loop = asyncio.get_running_loop()
        with client:
            request = await loop.sock_recv(client.sock, 1024)
            reply = {
                "worker": self.name,
                "request": request.decode(),
                "peer": _jsonable(client.peername),
                "listener": client.listener,
                "metadata": client.metadata,
            }
            await loop.sock_sendall(client.sock, json.dumps(reply).encode() + b"\n")
        self.served += 1

    async def release(self, count: int | None = None) -> None:
        count = len(self.held) if count is None else count
        batch, self.held = self.held[:count], self.held[count:]
        for client in batch:
            await self.answer(client)

    async def close(self) -> None:
        for client in self.held:
            client.done()
        self.held = []
        self.worker.close()
        await within(self.worker.wait_closed())
        with contextlib.suppress(Exception):
            await within(self.task)


def _jsonable(addr: Any) -> Any:
    return addr.decode("latin-1") if isinstance(addr, bytes) else addr


async def linked_worker(acceptor: Acceptor, name: str) -> ScriptedWorker:
    """A scripted worker registered with ``acceptor`` over a socketpair."""
    ours, theirs = socket.socketpair()
    acceptor.add_worker(ours)
    return ScriptedWorker(name, await Worker.connect(sock=theirs))


@contextlib.asynccontextmanager
async def acceptor_with_workers(
    count: int, **kwargs: Any
) -> AsyncIterator[tuple[Acceptor, list[ScriptedWorker], tuple[str, int]]]:
    """An acceptor on a 127.0.0.1 listener with ``count`` scripted workers; all closed after."""
    acceptor = Acceptor(**kwargs)
    workers: list[ScriptedWorker] = []
    try:
        async with asyncio.timeout(3 * TIMEOUT):
            listener = socket.create_server(("127.0.0.1", 0), backlog=512)
            address = listener.getsockname()
            acceptor.add_listener(listener, name="tcp", metadata={"plain": True})
            workers = [await linked_worker(acceptor, f"w{i}") for i in range(count)]
            yield acceptor, workers, address
    finally:
        acceptor.close()
        for worker in workers:
            await worker.close()
        await within(acceptor.wait_closed())


async def request(address: Any, text: str = "hi", family: int = socket.AF_INET) -> dict[str, Any]:
    """Connect, send ``text``, return the worker's JSON answer."""
    if family == socket.AF_UNIX:
        reader, writer = await asyncio.open_unix_connection(address)
    else:
        reader, writer = await asyncio.open_connection(*address[:2])
    try:
        writer.write(text.encode())
        answer: dict[str, Any] = json.loads(await within(reader.readline(), 6 * TIMEOUT))
    finally:
        writer.close()
        await writer.wait_closed()
    return answer


async def fake_worker(acceptor: Acceptor) -> AncillaryConnection:
    """A worker whose side of the link the test drives by hand (welcome already read)."""
    ours, theirs = socket.socketpair()
    acceptor.add_worker(ours)
    conn = AncillaryConnection(theirs)
    with await within(conn.recv()) as welcome:
        assert welcome.data.startswith(b"W")
    return conn


def link_transport(worker: WorkerInfo) -> AncillaryTransport:
    """The transport of the acceptor's link to ``worker`` (one of ``acceptor.workers``)."""
    assert isinstance(worker, WorkerSlot)
    transport = worker.link.transport
    assert isinstance(transport, AncillaryTransport)
    return transport
