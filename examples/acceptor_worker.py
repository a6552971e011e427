"""Acceptor and workers: one process accepts TCP clients, worker processes serve them.

The acceptor (:class:`aioancillary.Acceptor`) listens on 127.0.0.1 and on a Unix socket where
workers register; it checks who each worker is (peer credentials, ``authorize=``) and hands
every accepted connection to the least busy worker. Workers (:class:`aioancillary.Worker`)
get each client as a ready socket and answer it directly: the acceptor never reads a byte.

Run it::

    .venv/bin/python examples/acceptor_worker.py

It starts its two workers itself (``acceptor_worker.py --worker PATH``) and exits 0 when every
client got its answer from a worker process.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile

from aioancillary import Acceptor, Credentials, HandedClient, Worker

WORKERS = 2
CLIENTS = 6


def say(text: str) -> None:
    """One write per line, flushed: several processes share the terminal."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def same_user(creds: Credentials | None) -> bool:
    """``authorize`` callback: only processes of our own user may exchange fds with us."""
    return creds is not None and creds.uid == os.getuid()


# -- worker process: the whole of it ---------------------------------------------------------


async def serve(client: HandedClient) -> None:
    reader, writer = await client.open_streams()  # the client's own TCP connection
    line = (await reader.readline()).decode().strip()
    say(f"[worker pid {os.getpid()}] client {client.peername[1]} says {line!r}")
    writer.write(f"worker pid {os.getpid()} echoes {line!r}\n".encode())
    await writer.drain()


async def worker_main(path: str) -> int:
    async with await Worker.connect(path, authorize=same_user) as worker:
        await worker.serve(serve)  # until the acceptor closes; each client closed after serve()
    return 0


# -- acceptor process ------------------------------------------------------------------------


async def tcp_client(n: int, port: int) -> str:
    """An ordinary TCP client: it has no idea that a second process will answer it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"hello from client {n}\n".encode())
    answer = (await reader.readline()).decode().strip()
    writer.close()
    await writer.wait_closed()
    say(f"[client {n}] got: {answer}")
    return answer


async def acceptor_main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "workers.sock")
        async with Acceptor() as acceptor:
            await acceptor.listen_for_workers(path, authorize=same_user)  # socket file 0o600
            listener = socket.create_server(("127.0.0.1", 0))
            acceptor.add_listener(listener)
            port = listener.getsockname()[1]
            procs = [
                await asyncio.create_subprocess_exec(sys.executable, __file__, "--worker", path)
                for _ in range(WORKERS)
            ]
            async with asyncio.timeout(15):  # clients could come earlier: they would wait
                await acceptor.wait_workers(WORKERS)
            say(f"[acceptor pid {os.getpid()}] workers: {[w.pid for w in acceptor.workers]}")
            answers = await asyncio.gather(*(tcp_client(n, port) for n in range(CLIENTS)))
            say(f"[acceptor pid {os.getpid()}] {acceptor.stats()}")
        # Leaving the block closed the acceptor: the workers' serve() returns and they exit.
        codes = [await p.wait() for p in procs]

    served_by = {int(a.split()[2]) for a in answers if a.startswith("worker pid ")}
    echoed = all(f"'hello from client {n}'" in answers[n] for n in range(CLIENTS))
    if echoed and served_by == {p.pid for p in procs} and codes == [0] * WORKERS:
        print(
            f"\nOK: all {CLIENTS} clients were answered by the {WORKERS} worker processes "
            f"(pids {', '.join(map(str, sorted(served_by)))}); the acceptor (pid {os.getpid()}) "
            "only accepted and passed the sockets on."
        )
        return 0
    print(f"\nFAILED: answers={answers!r} worker exit codes={codes}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(asyncio.run(worker_main(sys.argv[2])))
    sys.exit(asyncio.run(acceptor_main()))
