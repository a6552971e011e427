"""The program that gets activated: adopts its fds with listen_fds() and reports as JSON.

``adopt.py report [--keep-env]``: describe what was adopted, close it all.
``adopt.py take-socket NAME``: try ``take_socket(NAME)`` and report the result or the error.
``adopt.py serve LOOP NAME...``: serve one exchange on each named socket (stream: accept,
read a line, answer; datagram: receive, answer), on the event loop LOOP (asyncio or uvloop).

Every mode prints one JSON line last; fd counts before/after prove nothing leaked.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import sys
from typing import Any

from aioancillary import AncillaryError
from aioancillary._lifecycle._systemd import NamedFds, listen_fds

VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def env_state() -> dict[str, str | None]:
    return {var: os.environ.get(var) for var in VARS}


def describe(fds: NamedFds) -> list[dict[str, Any]]:
    out = []
    for name in fds.names():
        for fd in fds.take_fds(name):
            with fd:
                num = fd.fileno()
                mode = os.fstat(num).st_mode
                entry: dict[str, Any] = {
                    "name": name,
                    "fd": num,
                    "cloexec": not os.get_inheritable(num),
                    "socket": stat.S_ISSOCK(mode),
                }
                if stat.S_ISSOCK(mode):
                    probe = socket.socket(fileno=num)
                    entry["family"] = probe.family.name
                    entry["type"] = probe.type.name
                    probe.detach()
                out.append(entry)
    return out


async def serve_one(sock: socket.socket, name: str) -> str:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    if sock.type == socket.SOCK_DGRAM:
        got: asyncio.Future[str] = loop.create_future()

        class Answer(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport: Any = transport  # a DatagramTransport (not a subclass on uvloop)

            def datagram_received(self, data: bytes, addr: Any) -> None:
                self.transport.sendto(f"{name}:{data.decode().strip()}\n".encode(), addr)
                if not got.done():
                    got.set_result(data.decode().strip())

        transport, _ = await loop.create_datagram_endpoint(Answer, sock=sock)
        try:
            return await got
        finally:
            transport.close()
    if sock.type == socket.SOCK_SEQPACKET:
        conn, _ = await loop.sock_accept(sock)
        with conn:
            data = await loop.sock_recv(conn, 1024)
            await loop.sock_sendall(conn, f"{name}:{data.decode().strip()}\n".encode())
        return data.decode().strip()
    done: asyncio.Future[str] = loop.create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode().strip()
        writer.write(f"{name}:{line}\n".encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        if not done.done():
            done.set_result(line)

    if sock.family == socket.AF_UNIX:
        server = await asyncio.start_unix_server(handle, sock=sock)
    else:
        server = await asyncio.start_server(handle, sock=sock)
    async with server:
        return await done


async def warm_up() -> None:
    """Create and close one stream on the loop before counting fds.

    libuv opens a reserve fd (/dev/null, its EMFILE fallback) with the first stream handle of
    a loop and keeps it until the loop closes: on uvloop a count taken earlier would be one
    short of a count taken after serving.
    """
    left, right = socket.socketpair()
    _reader, writer = await asyncio.open_connection(sock=left)
    writer.close()
    await writer.wait_closed()
    right.close()


async def serve(names: list[str]) -> dict[str, Any]:
    await warm_up()
    before = len(os.listdir("/proc/self/fd"))
    with listen_fds() as fds:
        env_after = env_state()
        socks = [(name, sock) for name in names for sock in fds.take_sockets(name)]
        unclaimed = fds.names()
    kinds = [(name, sock.family.name, sock.type.name) for name, sock in socks]
    try:
        got = await asyncio.gather(*(serve_one(sock, name) for name, sock in socks))
    finally:
        for _, sock in socks:
            sock.close()
    after = len(os.listdir("/proc/self/fd"))
    return {
        "got": got,
        "kinds": kinds,
        "env_after": env_after,
        "unclaimed": unclaimed,
        "fds_before": before,
        "fds_after": after,
        "loop": type(asyncio.get_running_loop()).__module__,
    }


def main() -> None:
    mode = sys.argv[1]
    result: dict[str, Any]
    if mode == "report":
        keep = "--keep-env" in sys.argv
        with listen_fds(unset_environment=not keep) as fds:
            result = {"source": fds.source, "names": fds.names(), "env_after": env_state()}
            result["fds"] = describe(fds)
    elif mode == "take-socket":
        try:
            with listen_fds() as fds:
                sock = fds.take_socket(sys.argv[2])
                result = {"family": sock.family.name, "type": sock.type.name}
                sock.close()
                result["left"] = fds.names()
        except AncillaryError as exc:
            result = {"error": type(exc).__name__, "message": str(exc)}
        # Whatever happened, fds 3.. must be closed now (NamedFds.close) or untouched (error).
        result["open_3_4"] = [os.path.exists(f"/proc/self/fd/{fd}") for fd in (3, 4)]
    elif mode == "serve":
        loop_name, names = sys.argv[2], sys.argv[3:]
        factory = asyncio.new_event_loop
        if loop_name == "uvloop":
            import uvloop  # noqa: PLC0415 - only when asked for: the suite also runs without it

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            result = runner.run(serve(names))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
