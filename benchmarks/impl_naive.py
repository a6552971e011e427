"""Naive asyncio, written carefully: a persistent ``add_reader`` callback that calls ``recvmsg``
until EAGAIN and queues ``(data, fds)`` as plain ints; ``sendmsg`` at once on a non-blocking
socket, ``add_writer`` only to wait when the kernel says EAGAIN. What a competent user writes
in twenty lines when the stock transports refuse fds: no framing, no ownership, no limits.
"""

from __future__ import annotations

import array
import asyncio
import collections
import os
import socket
import time
from collections.abc import Callable

from _common import MSG_SIZE, PAYLOAD, Job, accept, fds_of, open_devnull, run_async, write_latencies


class Reader:
    """Reads until EAGAIN on every wake-up; a coroutine takes the messages one at a time."""

    def __init__(self, sock: socket.socket, bufsize: int, nfds: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.bufsize = bufsize
        self.ancbufsize = socket.CMSG_SPACE(nfds * 4)
        self.queue: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        recvmsg = self.sock.recvmsg
        # Bounded: each message's fds stay open until the coroutine takes it, and a flood read
        # to EAGAIN in one go could run the process out of fds (the kernel then drops fds
        # silently, MSG_CTRUNC). The loop calls back while data is left.
        for _ in range(64):
            try:
                data, anc, _flags, _addr = recvmsg(self.bufsize, self.ancbufsize)
            except BlockingIOError:
                break
            if not data:
                raise EOFError("unexpected EOF")
            self.queue.append((data, fds_of(anc).tolist()))
        waiter = self.waiter
        if self.queue and waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def recv(self) -> tuple[bytes, int]:
        """One message; its fds are closed. Returns the data and the number of fds."""
        while not self.queue:
            self.waiter = self.loop.create_future()
            await self.waiter
        data, fds = self.queue.popleft()
        for fd in fds:
            os.close(fd)
        return data, len(fds)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def sendmsg(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    view = memoryview(data)
    while view:
        try:
            sent = sock.sendmsg([view], anc)
        except BlockingIOError:
            fut = loop.create_future()
            loop.add_writer(sock.fileno(), _wake, fut)
            try:
                await fut
            finally:
                loop.remove_writer(sock.fileno())
            continue
        view = view[sent:]
        anc = []  # the fds went with the first byte


async def _recv_exact(reader: Reader) -> int:
    # One message per read: Linux ends a stream read after an fd-carrying chunk, and the
    # reader asks for MSG_SIZE bytes.
    got = nrecv = 0
    while got < MSG_SIZE:
        data, n = await reader.recv()
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
    reader = Reader(sock, MSG_SIZE, nfds)
    job.ctrl.ready()
    while got < total:
        data, n = await reader.recv()
        got += len(data)
        nrecv += n
    job.ctrl.done_active(got // MSG_SIZE, nrecv)
    reader.close()


async def _ping(job: Job) -> None:
    fd = open_devnull()
    sock = job.sock
    sock.setblocking(False)
    lat = array.array("q", bytes(8 * job.n))
    nrecv = 0
    clock = time.perf_counter_ns
    reader = Reader(sock, MSG_SIZE, 1)
    job.ctrl.ready()
    job.ctrl.expect("go")
    for i in range(job.n):
        t = clock()
        await sendmsg(sock, PAYLOAD, [fd])
        nrecv += await _recv_exact(reader)
        lat[i] = clock() - t
    reader.close()
    t_end = time.monotonic_ns()
    write_latencies(job.latfile, lat)
    job.ctrl.done_active(job.n, nrecv, t_end)
    os.close(fd)


async def _pong(job: Job) -> None:
    fd = open_devnull()
    sock = job.sock
    sock.setblocking(False)
    reader = Reader(sock, MSG_SIZE, 1)
    job.ctrl.ready()
    for _ in range(job.n):
        await _recv_exact(reader)
        await sendmsg(sock, PAYLOAD, [fd])
    reader.close()
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
