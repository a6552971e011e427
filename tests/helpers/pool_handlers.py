"""Client handlers run by WorkerPool workers in the pool tests (imported in the children)."""

from __future__ import annotations

import asyncio
import os

from aioancillary._handoff._worker import HandedClient


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
