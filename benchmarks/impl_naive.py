"""Naive asyncio: ``recvmsg``/``sendmsg`` on a non-blocking socket, ``add_reader``/``add_writer``
to wait when the kernel says EAGAIN — what people write when the stock transports refuse fds."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import time
from collections.abc import Callable

from _common import MSG_SIZE, PAYLOAD, Job, accept, fds_of, open_devnull, run_async, write_latencies


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _wait(fd: int, add: Callable[..., None], remove: Callable[[int], object]) -> None:
    fut = asyncio.get_running_loop().create_future()
    add(fd, _wake, fut)
    try:
        await fut
    finally:
        remove(fd)


async def recvmsg(sock: socket.socket, bufsize: int, nfds: int) -> tuple[bytes, int]:
    """One message; its fds are closed. Returns the data and the number of fds."""
    loop = asyncio.get_running_loop()
    ancbufsize = socket.CMSG_SPACE(nfds * 4)
    while True:
        try:
            data, anc, _flags, _addr = sock.recvmsg(bufsize, ancbufsize)
        except BlockingIOError:
            await _wait(sock.fileno(), loop.add_reader, loop.remove_reader)
            continue
        fds = fds_of(anc)
        for fd in fds:
            os.close(fd)
        if not data:
            raise EOFError("unexpected EOF")
        return data, len(fds)


async def sendmsg(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    view = memoryview(data)
    while view:
        try:
            sent = sock.sendmsg([view], anc)
        except BlockingIOError:
            await _wait(sock.fileno(), loop.add_writer, loop.remove_writer)
            continue
        view = view[sent:]
        anc = []  # the fds went with the first byte


async def _recv_exact(sock: socket.socket, nfds: int) -> int:
    got = nrecv = 0
    while got < MSG_SIZE:
        data, n = await recvmsg(sock, MSG_SIZE - got, nfds)
        got += len(data)
        nrecv += n
    return nrecv


async def _send(job: Job) -> None:
    fd = open_devnull()
    fds = [fd] * job.nfds
    job.sock.setblocking(False)
    job.ctrl.ready()
    job.ctrl.expect("go")
    for _ in range(job.n):
        await sendmsg(job.sock, PAYLOAD, fds)
    await job.ctrl.finish_async()
    os.close(fd)


async def _recv(job: Job) -> None:
    sock, nfds = job.sock, job.nfds
    sock.setblocking(False)
    total = job.n * MSG_SIZE
    got = nrecv = 0
    job.ctrl.ready()
    while got < total:
        data, n = await recvmsg(sock, MSG_SIZE, nfds)
        got += len(data)
        nrecv += n
    job.ctrl.done_active(got // MSG_SIZE, nrecv)


async def _ping(job: Job) -> None:
    fd = open_devnull()
    sock = job.sock
    sock.setblocking(False)
    lat = array.array("q", bytes(8 * job.n))
    nrecv = 0
    clock = time.perf_counter_ns
    job.ctrl.ready()
    job.ctrl.expect("go")
    for i in range(job.n):
        t = clock()
        await sendmsg(sock, PAYLOAD, [fd])
        nrecv += await _recv_exact(sock, 1)
        lat[i] = clock() - t
    t_end = time.monotonic_ns()
    write_latencies(job.latfile, lat)
    job.ctrl.done_active(job.n, nrecv, t_end)
    os.close(fd)


async def _pong(job: Job) -> None:
    fd = open_devnull()
    sock = job.sock
    sock.setblocking(False)
    job.ctrl.ready()
    for _ in range(job.n):
        await _recv_exact(sock, 1)
        await sendmsg(sock, PAYLOAD, [fd])
    await job.ctrl.finish_async()
    os.close(fd)


async def _accept(job: Job) -> None:
    assert job.listener is not None
    listener, sock = job.listener, job.sock
    listener.setblocking(False)
    sock.setblocking(False)
    job.ctrl.ready()
    for _ in range(job.n):
        conn = await accept(listener)
        await sendmsg(sock, PAYLOAD, [conn.fileno()])
        conn.close()
    await job.ctrl.finish_async()


def _runner(main: Callable[[Job], object]) -> Callable[[Job], None]:
    return lambda job: run_async(job, main)


ROLES = {
    "send": _runner(_send),
    "recv": _runner(_recv),
    "ping": _runner(_ping),
    "pong": _runner(_pong),
    "accept": _runner(_accept),
}
