"""aioancillary on asyncio or uvloop: ``send_fds`` with borrowed fds; received fds are owned
(``OwnedFd``) and closed by ``with msg:``.

Variants: ``framed`` (default framing, ``async for msg in conn``), ``raw`` (``framed=False``: a
stream read is a message) and ``batch`` (framed, ``recv_batch()``: every queued message at
once). On SOCK_SEQPACKET the kernel keeps message boundaries and ``framed`` changes nothing.
"""

from __future__ import annotations

import array
import cProfile
import os
import time
from collections.abc import Awaitable, Callable

from _common import (
    MSG_SIZE,
    PAYLOAD,
    Job,
    accept,
    open_devnull,
    rss_kib,
    run_async,
    write_latencies,
)

from aioancillary import AncillaryConnection, open_unix_connection
from aioancillary._kernel import _accel


def _start_profile(job: Job) -> cProfile.Profile | None:
    if not job.profile:
        return None
    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _stop_profile(job: Job, profiler: cProfile.Profile) -> None:
    profiler.disable()
    profiler.dump_stats(job.profile)


async def _connect(job: Job) -> AncillaryConnection:
    if job.path == "py":
        _accel.use_extension(False)  # this child measures the pure-Python hot path
    return await open_unix_connection(sock=job.sock, framed=job.variant != "raw")


async def _close(conn: AncillaryConnection) -> None:
    conn.close()
    await conn.wait_closed()


async def _send(job: Job) -> None:
    fd = open_devnull()
    fds = [fd] * job.nfds
    conn = await _connect(job)
    send_fds = conn.send_fds
    rss = []
    job.ctrl.ready()
    job.ctrl.expect("go")
    profiler = _start_profile(job)
    if job.rss_every:
        for i in range(job.n):
            await send_fds(PAYLOAD, fds)
            if i % job.rss_every == 0:
                rss.append(rss_kib())
        rss.append(rss_kib())
    else:
        for _ in range(job.n):
            await send_fds(PAYLOAD, fds)
    if profiler:
        # The queue drains while waiting for "finish": that is part of the sending cost.
        job.ctrl.sent()
        await job.ctrl.expect_async("finish")
        _stop_profile(job, profiler)
        job.ctrl.done_passive(rss=rss)
    else:
        await job.ctrl.finish_async(rss=rss)
    await _close(conn)
    os.close(fd)


async def _recv_each(conn: AncillaryConnection, total: int) -> tuple[int, int]:
    got = nrecv = 0
    async for msg in conn:
        with msg:
            got += len(msg.data)
            nrecv += msg.fd_count
        if got >= total:
            break
    return got, nrecv


async def _recv_batches(conn: AncillaryConnection, total: int) -> tuple[int, int]:
    got = nrecv = 0
    recv_batch = conn.recv_batch
    while got < total:
        for msg in await recv_batch():
            with msg:
                got += len(msg.data)
                nrecv += msg.fd_count
    return got, nrecv


async def _recv_sampling(
    conn: AncillaryConnection, total: int, every: int, rss: list[int]
) -> tuple[int, int]:
    got = nrecv = count = 0
    async for msg in conn:
        with msg:
            got += len(msg.data)
            nrecv += msg.fd_count
        if count % every == 0:
            rss.append(rss_kib())
        count += 1
        if got >= total:
            break
    rss.append(rss_kib())
    return got, nrecv


async def _recv(job: Job) -> None:
    conn = await _connect(job)
    total = job.n * MSG_SIZE
    rss: list[int] = []
    job.ctrl.ready()
    profiler = _start_profile(job)
    if job.rss_every:
        got, nrecv = await _recv_sampling(conn, total, job.rss_every, rss)
    elif job.variant == "batch":
        got, nrecv = await _recv_batches(conn, total)
    else:
        got, nrecv = await _recv_each(conn, total)
    t_end = time.monotonic_ns()
    if profiler:
        _stop_profile(job, profiler)
    job.ctrl.done_active(got // MSG_SIZE, nrecv, t_end, rss=rss)
    await _close(conn)


async def _recv_one(conn: AncillaryConnection) -> int:
    # A raw stream may split a message over reads; framed and seqpacket never do.
    got = nrecv = 0
    while got < MSG_SIZE:
        with await conn.recv() as msg:
            got += len(msg.data)
            nrecv += msg.fd_count
    return nrecv


async def _ping(job: Job) -> None:
    fd = open_devnull()
    conn = await _connect(job)
    lat = array.array("q", bytes(8 * job.n))
    nrecv = 0
    clock = time.perf_counter_ns
    job.ctrl.ready()
    job.ctrl.expect("go")
    for i in range(job.n):
        t = clock()
        await conn.send_fds(PAYLOAD, [fd])
        nrecv += await _recv_one(conn)
        lat[i] = clock() - t
    t_end = time.monotonic_ns()
    write_latencies(job.latfile, lat)
    job.ctrl.done_active(job.n, nrecv, t_end)
    await _close(conn)
    os.close(fd)


async def _pong(job: Job) -> None:
    fd = open_devnull()
    conn = await _connect(job)
    job.ctrl.ready()
    for _ in range(job.n):
        await _recv_one(conn)
        await conn.send_fds(PAYLOAD, [fd])
    await job.ctrl.finish_async()
    await _close(conn)
    os.close(fd)


async def _accept(job: Job) -> None:
    assert job.listener is not None
    listener = job.listener
    listener.setblocking(False)
    conn = await _connect(job)
    job.ctrl.ready()
    for _ in range(job.n):
        client = await accept(listener)
        await conn.send_fds(PAYLOAD, [client])  # borrowed: queued fds are duplicated
        client.close()
    await job.ctrl.finish_async()
    await _close(conn)


def _runner(main: Callable[[Job], Awaitable[None]]) -> Callable[[Job], None]:
    return lambda job: run_async(job, main)


ROLES = {
    "send": _runner(_send),
    "recv": _runner(_recv),
    "ping": _runner(_ping),
    "pong": _runner(_pong),
    "accept": _runner(_accept),
}
