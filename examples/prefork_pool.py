"""A prefork pool: N worker processes serve TCP clients through one acceptor.

:class:`aioancillary.WorkerPool` starts the workers (fresh interpreters, never a fork of the
running loop), each running ``handle`` below on uvloop when it is installed. One worker is
killed halfway (``kill -9``): the pool restarts it, the acceptor counts the clients it was
serving as lost (none here: it is killed while idle), and the service goes on. Then a
graceful shutdown: no new clients, the ones in flight finish, the workers exit.

Run it::

    .venv/bin/python examples/prefork_pool.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from typing import Literal

from aioancillary import HandedClient, WorkerPool

try:
    import uvloop  # noqa: F401 - only to know whether the workers can run on it

    LOOP: Literal["asyncio", "uvloop"] = "uvloop"
except ImportError:
    LOOP = "asyncio"


async def handle(client: HandedClient) -> None:
    """Runs in a worker process for every client: answer with our pid."""
    reader, writer = await client.open_streams()
    name = (await reader.readline()).decode().strip()
    writer.write(f"hello {name}, from worker {os.getpid()}\n".encode())
    await writer.drain()


async def visit(port: int, n: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"visitor {n}\n".encode())
    answer = (await reader.readline()).decode().strip()
    writer.close()
    await writer.wait_closed()
    return answer


async def main() -> int:
    async with WorkerPool(handle, processes=2, loop=LOOP) as pool:
        listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        pool.acceptor.add_listener(listener)
        port = listener.getsockname()[1]
        print(f"[pool] workers {pool.pids} on {LOOP}, clients on 127.0.0.1:{port}")

        first = await asyncio.gather(*(visit(port, n) for n in range(100)))
        await pool.acceptor.drain(timeout=5)  # every worker reported its clients finished
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        print(f"[pool] killed worker {victim}; it is restarted")
        # Only to show the replacement at work below: clients need not wait for it.
        while pool.restarts < 1 or len(pool.acceptor.workers) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        second = await asyncio.gather(*(visit(port, n) for n in range(100, 200)))
        print(f"[pool] workers now {pool.pids}; {pool.acceptor.stats()}")
    # Leaving the block: stop accepting, let in-flight clients finish, stop the workers.

    answers = first + second
    ok = all(a.startswith(f"hello visitor {n},") for n, a in enumerate(answers))
    servers = {a.rsplit(" ", 1)[1] for a in answers}
    if ok and len(servers) >= 3 and pool.restarts == 1:
        print(
            f"\nOK: 200 visitors answered by {len(servers)} worker processes (one killed and "
            "restarted halfway); the pool shut down gracefully."
        )
        return 0
    print(f"\nFAILED: {answers[:5]}... servers={servers}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
