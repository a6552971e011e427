"""anyio (bench-only dependency): ``UNIXSocketStream.send_fds`` / ``receive_fds``, run by
``anyio.run`` on asyncio or uvloop (``backend_options={"loop_factory": ...}``).

``UNIXSocketStream.from_socket`` accepts SOCK_STREAM only; anyio itself opens SOCK_SEQPACKET
connections (``connect_unix(path, kind=SOCK_SEQPACKET)``) into the same class, so a seqpacket
socketpair end is wrapped the way ``connect_unix`` does it, through the backend.
"""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Awaitable, Callable

import anyio
from _common import MSG_SIZE, PAYLOAD, Job, loop_factory, open_devnull, write_latencies
from anyio._core._eventloop import get_async_backend
from anyio.abc import UNIXSocketStream


async def _wrap(sock: socket.socket) -> UNIXSocketStream:
    if sock.type == socket.SOCK_STREAM:
        return await UNIXSocketStream.from_socket(sock)
    sock.setblocking(False)
    stream: UNIXSocketStream = await get_async_backend().wrap_unix_stream_socket(sock)
    return stream


async def _recv_exact(stream: UNIXSocketStream, nfds: int) -> int:
    got = nrecv = 0
    while got < MSG_SIZE:
        data, fds = await stream.receive_fds(MSG_SIZE - got, nfds)
        for fd in fds:
            os.close(fd)
        got += len(data)
        nrecv += len(fds)
    return nrecv


async def _send(job: Job) -> None:
    fd = open_devnull()
    fds = [fd] * job.nfds
    stream = await _wrap(job.sock)
    job.ctrl.ready()
    job.ctrl.expect("go")
    for _ in range(job.n):
        await stream.send_fds(PAYLOAD, fds)
    await job.ctrl.finish_async()
    await stream.aclose()
    os.close(fd)


async def _recv(job: Job) -> None:
    stream = await _wrap(job.sock)
    nfds = job.nfds
    total = job.n * MSG_SIZE
    got = nrecv = 0
    receive_fds, close = stream.receive_fds, os.close
    job.ctrl.ready()
    while got < total:
        data, fds = await receive_fds(MSG_SIZE, nfds)
        for fd in fds:
            close(fd)
        got += len(data)
        nrecv += len(fds)
    job.ctrl.done_active(got // MSG_SIZE, nrecv)
    await stream.aclose()


async def _ping(job: Job) -> None:
    fd = open_devnull()
    stream = await _wrap(job.sock)
    lat = array.array("q", bytes(8 * job.n))
    nrecv = 0
    clock = time.perf_counter_ns
    job.ctrl.ready()
    job.ctrl.expect("go")
    for i in range(job.n):
        t = clock()
        await stream.send_fds(PAYLOAD, [fd])
        nrecv += await _recv_exact(stream, 1)
        lat[i] = clock() - t
    t_end = time.monotonic_ns()
    write_latencies(job.latfile, lat)
    job.ctrl.done_active(job.n, nrecv, t_end)
    await stream.aclose()
    os.close(fd)


async def _pong(job: Job) -> None:
    fd = open_devnull()
    stream = await _wrap(job.sock)
    job.ctrl.ready()
    for _ in range(job.n):
        await _recv_exact(stream, 1)
        await stream.send_fds(PAYLOAD, [fd])
    await job.ctrl.finish_async()
    await stream.aclose()
    os.close(fd)


async def _accept(job: Job) -> None:
    assert job.listener is not None
    listener = job.listener
    listener.setblocking(False)
    stream = await _wrap(job.sock)
    job.ctrl.ready()
    for _ in range(job.n):
        while True:
            try:
                conn, _addr = listener.accept()
                break
            except BlockingIOError:
                await anyio.wait_readable(listener)
        await stream.send_fds(PAYLOAD, [conn.fileno()])
        conn.close()
    await job.ctrl.finish_async()
    await stream.aclose()


def _runner(main: Callable[[Job], Awaitable[None]]) -> Callable[[Job], None]:
    def run(job: Job) -> None:
        options = {"loop_factory": loop_factory(job.loop)}
        anyio.run(main, job, backend="asyncio", backend_options=options)

    return run


ROLES = {
    "send": _runner(_send),
    "recv": _runner(_recv),
    "ping": _runner(_ping),
    "pong": _runner(_pong),
    "accept": _runner(_accept),
}
