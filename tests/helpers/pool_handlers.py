"""Client handlers run by WorkerPool workers in the pool tests (imported in the children)."""

from __future__ import annotations

import asyncio
import os

from aioancillary._handoff._client import HandedClient
from aioancillary._handoff._pool_worker import PoolWorker


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1


async def handle(client: HandedClient) -> None:
    """``fds`` -> "PID COUNT"; ``hold`` -> "held PID", then waits for more bytes (or the end)
    and answers "released"; anything else -> "PID TEXT"."""
    loop = asyncio.get_running_loop()
    sock = client.sock
    request = await loop.sock_recv(sock, 1024)
    pid = os.getpid()
    if request == b"fds":
        reply = f"{pid} {_fd_count()}"
    elif request == b"hold":
        await loop.sock_sendall(sock, f"held {pid}\n".encode())
        await loop.sock_recv(sock, 1024)
        reply = "released"
    else:
        reply = f"{pid} {request.decode()}"
    await loop.sock_sendall(sock, reply.encode() + b"\n")


async def main(pool_worker: PoolWorker) -> None:
    """A pool ``main``: answers every client with "SLOT GREETING PID", then closes it.

    With ``args["fail_if"]`` naming a file that exists, it raises before connecting (a worker
    whose new code is broken); with ``args["hang"]``, it never connects.
    """
    fail_if = pool_worker.args.get("fail_if")
    if fail_if and os.path.exists(fail_if):
        raise RuntimeError(f"told to fail: {fail_if} exists")
    if pool_worker.args.get("hang"):
        await asyncio.sleep(3600)
    greeting = pool_worker.args.get("greeting", "hi")

    async def serve(client: HandedClient) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_recv(client.sock, 1024)
        reply = f"{pool_worker.index} {greeting} {os.getpid()}\n"
        await loop.sock_sendall(client.sock, reply.encode())

    async with await pool_worker.connect() as worker:
        await worker.serve(serve)


async def shared_main(pool_worker: PoolWorker) -> None:
    """A pool ``main`` that accepts on the pool's shared listener itself: answers each client
    with "PID FDS-LEFT-UNTAKEN TEXT", where FDS-LEFT-UNTAKEN checks that a second
    take_shared() is refused; the acceptor's client stream only says when to stop."""
    (listener,) = pool_worker.take_shared()
    try:
        pool_worker.take_shared()
    except RuntimeError:
        again = "refused"
    else:
        again = "allowed"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        text = (await reader.readline()).decode().strip()
        writer.write(f"{os.getpid()} {again} {text}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, sock=listener)
    async with await pool_worker.connect() as worker:
        async for _client in worker:
            raise AssertionError("no client is handed over: the workers accept")
    server.close()
