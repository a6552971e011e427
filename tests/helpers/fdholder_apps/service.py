"""A TCP service that parks its listening socket in the fd holder across a restart.

``service.py HOLDER_PATH LOOP VERSION``:

* ``v1`` binds 127.0.0.1 (a free port), answers one client, then parks the listener in the
  holder under ``web`` (blocking client: a service's shutdown path) and exits;
* ``v2`` takes ``web`` back from the holder (``retrieve(delete=True)``, asyncio client on the
  event loop LOOP), answers the one client that connected while no service ran, and exits.

It prints JSON lines: ``{"event": "serving", "port", "inode", "pid"}`` once it listens, and
``{"event": "exit", "fds_before", "fds_after"}`` (its own open fds at start and at the end).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys

from aioancillary import FdHolderBlockingClient, FdHolderClient


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def answer(listener: socket.socket, version: str) -> None:
    conn, _ = listener.accept()
    with conn, conn.makefile("rwb") as stream:
        line = stream.readline().decode().strip()
        stream.write(f"{version} (pid {os.getpid()}) answers {line}\n".encode())
        stream.flush()


def first(holder_path: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        emit("serving", port=listener.getsockname()[1], inode=os.fstat(listener.fileno()).st_ino,
             pid=os.getpid())  # fmt: skip
        answer(listener, "v1")
        with FdHolderBlockingClient.connect(holder_path) as holder:
            holder.store("web", listener)  # parked: the port stays bound after we exit


async def second(holder_path: str) -> None:
    async with await FdHolderClient.connect(holder_path) as holder:
        (web,) = await holder.retrieve("web", delete=True)
    with web.into_socket() as listener:
        emit("serving", port=listener.getsockname()[1], inode=os.fstat(listener.fileno()).st_ino,
             pid=os.getpid())  # fmt: skip
        listener.setblocking(True)
        await asyncio.get_running_loop().run_in_executor(None, answer, listener, "v2")


def main(holder_path: str, loop: str, version: str) -> None:
    if loop == "uvloop":
        import uvloop  # noqa: PLC0415 - only for the uvloop runs

        uvloop.new_event_loop().close()  # the first uvloop loop keeps 2 fds for good
    before = fd_count()
    if version == "v1":
        first(holder_path)
    elif loop == "uvloop":
        uvloop.run(second(holder_path))
    else:
        asyncio.run(second(holder_path))
    emit("exit", fds_before=before, fds_after=fd_count())


if __name__ == "__main__":
    main(*sys.argv[1:4])
