"""Acceptor and workers: one process accepts TCP clients, worker processes serve them.

The acceptor listens on 127.0.0.1 (an ephemeral port) and on a Unix socket for its workers.
Each worker process connects to the Unix socket; the acceptor checks who it is (peer
credentials, ``authorize=``) and then hands every accepted TCP connection to a worker, round
robin, with ``send_fds``. The acceptor never reads a byte from a client: the worker answers
through the socket it received. A few clients run at once and the script checks their answers.

Run it::

    .venv/bin/python examples/acceptor_worker.py

It starts its workers itself (``acceptor_worker.py --worker PATH``) and exits 0 when every
client got its answer from a worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile

from aioancillary import (
    AncillaryConnection,
    Credentials,
    open_unix_connection,
    start_unix_server,
)

WORKERS = 2
CLIENTS = 6


def say(who: str, text: str) -> None:
    print(f"[{who}] {text}", flush=True)  # flush: several processes share the terminal


def same_user(creds: Credentials | None) -> bool:
    """``authorize`` callback: only processes of our own user may exchange fds with us."""
    return creds is not None and creds.uid == os.getuid()


# -- worker process -------------------------------------------------------------------------


async def serve_client(sock: socket.socket, me: str) -> None:
    """Answer one TCP client through the socket the acceptor handed over."""
    host, port = sock.getpeername()
    say(me, f"got client {host}:{port} as fd {sock.fileno()}; serving it")
    reader, writer = await asyncio.open_connection(sock=sock)  # the stream owns the socket now
    try:
        line = (await reader.readline()).decode().strip()
        writer.write(f"worker pid {os.getpid()} echoes {line!r}\n".encode())
        await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()


async def worker_main(path: str) -> int:
    me = f"worker pid {os.getpid()}"
    tasks: set[asyncio.Task[None]] = set()
    async with await open_unix_connection(path, authorize=same_user) as conn:
        await conn.send(b"ready")
        async for msg in conn:  # ends when the acceptor closes the connection
            with msg:  # closes every fd not taken below, whatever happens
                if msg.data != b"client" or len(msg.fds) != 1:
                    say(me, f"ignoring unexpected message {msg!r}")
                    continue
                sock = msg.take_fd().into_socket()
            task = asyncio.create_task(serve_client(sock, me))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    say(me, "the acceptor hung up; exiting")
    return 0


# -- acceptor process -----------------------------------------------------------------------


async def tcp_client(n: int, port: int) -> str:
    """An ordinary TCP client: it has no idea that a second process will answer it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"hello from client {n}\n".encode())
        await writer.drain()
        answer = (await reader.readline()).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()
    say(f"client {n}", f"got: {answer}")
    return answer


async def acceptor_main() -> int:
    me = f"acceptor pid {os.getpid()}"
    loop = asyncio.get_running_loop()
    workers: list[AncillaryConnection] = []
    all_ready = asyncio.Event()

    async def on_worker(conn: AncillaryConnection) -> None:
        # Runs for as long as the worker stays connected; the server closes conn on return.
        creds = conn.peercred
        (await conn.recv()).close()  # "ready"
        say(me, f"worker connected: pid {creds.pid if creds else '?'} (same user: checked)")
        workers.append(conn)
        if len(workers) == WORKERS:
            all_ready.set()
        async for msg in conn:  # workers send nothing more; this ends when we close conn
            msg.close()

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "workers.sock")
        server = await start_unix_server(on_worker, path, authorize=same_user)  # mode 0o600
        procs = [
            await asyncio.create_subprocess_exec(sys.executable, __file__, "--worker", path)
            for _ in range(WORKERS)
        ]
        worker_pids = {p.pid for p in procs}
        try:
            await asyncio.wait_for(all_ready.wait(), timeout=15)
            with socket.create_server(("127.0.0.1", 0)) as listener:
                listener.setblocking(False)
                port = listener.getsockname()[1]
                say(me, f"listening for TCP clients on 127.0.0.1:{port}")

                async def accept_forever() -> None:
                    count = 0
                    while True:
                        client, (host, cport) = await loop.sock_accept(listener)
                        with client:  # our copy is closed right after sending
                            worker = workers[count % len(workers)]
                            pid = worker.peercred.pid if worker.peercred else "?"
                            say(
                                me,
                                f"accepted {host}:{cport} (fd {client.fileno()}) -> worker {pid}",
                            )
                            await worker.send_fds(b"client", [client])
                        count += 1

                acceptor = asyncio.create_task(accept_forever())
                answers = await asyncio.gather(*(tcp_client(n, port) for n in range(CLIENTS)))
                acceptor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acceptor
        finally:
            server.close()
            server.close_clients()  # the workers see EOF, finish their clients and exit
            await server.wait_closed()
            codes = [await p.wait() for p in procs]

    served_by = {int(a.split()[2]) for a in answers if a.startswith("worker pid ")}
    echoed = all(f"'hello from client {n}'" in answers[n] for n in range(CLIENTS))
    if echoed and served_by == worker_pids and codes == [0] * WORKERS:
        print(
            f"\nOK: all {CLIENTS} clients were answered by the {WORKERS} worker processes "
            f"(pids {', '.join(map(str, sorted(worker_pids)))}); the acceptor (pid {os.getpid()}) "
            "only accepted and passed the sockets on."
        )
        return 0
    print(f"\nFAILED: answers={answers!r} worker exit codes={codes}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(asyncio.run(worker_main(sys.argv[2])))
    sys.exit(asyncio.run(acceptor_main()))
