"""WorkerPool: real worker processes (spawned with python -m) serving TCP clients.

The workers run the test's loop kind (asyncio or uvloop). Every worker reports its own open
fd count on request (``fds``), so leaks are checked in every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator

import pytest
from helpers import nofile_at_least, uvloop, wait_until, within
from helpers.acceptor import link_transport

from aioancillary._handoff._pool import WorkerPool

HANDLER = "helpers.pool_handlers:handle"


def _loop_name() -> str:
    if uvloop is not None and isinstance(asyncio.get_running_loop(), uvloop.Loop):
        return "uvloop"
    return "asyncio"


async def ask(port: int, text: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(text.encode())
        return (await within(reader.readline(), 20)).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


async def fd_counts(pool: WorkerPool, port: int) -> dict[int, int]:
    """Each worker's open fd count, asked while idle (idle workers take turns)."""
    counts: dict[int, int] = {}
    for _ in range(20):
        pid, count = map(int, (await ask(port, "fds")).split())
        counts[pid] = count
        if set(counts) == set(pool.pids):
            return counts
    raise AssertionError(f"not every worker answered: {counts} vs {pool.pids}")


async def hold(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A client its worker holds until it sends more; returns the worker's pid."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hold")
    line = (await within(reader.readline(), 20)).decode().split()
    assert line[0] == "held", line
    return reader, writer, int(line[1])


@pytest.fixture
async def pool() -> AsyncIterator[tuple[WorkerPool, int]]:
    with nofile_at_least(4096):
        pool = WorkerPool(HANDLER, processes=2, loop=_loop_name())  # type: ignore[arg-type]
        async with pool:
            listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
            pool.acceptor.add_listener(listener)
            yield pool, listener.getsockname()[1]


async def test_hundreds_of_concurrent_clients_each_served_by_a_worker(
    pool: tuple[WorkerPool, int],
) -> None:
    workers, port = pool
    before = await fd_counts(workers, port)
    answers = await within(asyncio.gather(*(ask(port, f"client {n}") for n in range(400))), 60)
    pids = set(workers.pids)
    for n, answer in enumerate(answers):
        pid, text = answer.split(" ", 1)
        assert text == f"client {n}"
        assert int(pid) in pids
    assert {int(a.split()[0]) for a in answers} == pids  # both workers served
    assert await workers.acceptor.drain(timeout=10)  # every completion reported
    stats = workers.acceptor.stats()
    assert (stats.lost, stats.in_flight) == (0, 0)
    assert stats.completed == stats.accepted == 400 + len(before)
    assert await fd_counts(workers, port) == before  # no fd leaked in any worker


async def test_a_worker_killed_mid_load_loses_only_its_clients_and_is_restarted(
    pool: tuple[WorkerPool, int],
) -> None:
    workers, port = pool
    held = [await hold(port) for _ in range(20)]
    victim = held[0][2]
    theirs = [c for c in held if c[2] == victim]
    ours = [c for c in held if c[2] != victim]
    assert theirs
    assert ours  # least-busy spread them over both workers
    os.kill(victim, signal.SIGKILL)
    for reader, writer, _pid in theirs:
        with contextlib.suppress(ConnectionResetError):  # a reset, or the end of stream
            assert await within(reader.read()) == b""
        writer.close()
    await wait_until(lambda: workers.acceptor.stats().lost == len(theirs), timeout=10)
    await wait_until(lambda: workers.restarts == 1 and len(workers.acceptor.workers) == 2)
    assert victim not in workers.pids
    for reader, writer, _pid in ours:  # the survivor's clients are unharmed
        writer.write(b"go")
        assert (await within(reader.readline())).strip() == b"released"
        writer.close()
    answers = await within(asyncio.gather(*(ask(port, f"after {n}") for n in range(50))), 30)
    assert all(a.split(" ", 1)[1] == f"after {n}" for n, a in enumerate(answers))
    assert await workers.acceptor.drain(timeout=10)
    stats = workers.acceptor.stats()
    assert stats.lost == len(theirs)
    assert stats.completed == stats.accepted - len(theirs)


async def test_graceful_shutdown_finishes_in_flight_clients_and_refuses_new_ones() -> None:
    pool = WorkerPool(HANDLER, processes=2, loop=_loop_name())  # type: ignore[arg-type]
    await pool.start()
    listener = socket.create_server(("127.0.0.1", 0))
    pool.acceptor.add_listener(listener)
    port = listener.getsockname()[1]
    held = [await hold(port) for _ in range(4)]
    processes = [c.process for c in pool._children]
    shutdown = asyncio.ensure_future(pool.shutdown(timeout=30))
    await wait_until(lambda: pool.acceptor.listeners == ())
    assert listener.fileno() == -1  # the listener is closed
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(0.05)
    assert not shutdown.done()  # in-flight clients keep it waiting
    for reader, writer, _pid in held:
        writer.write(b"go")
        assert (await within(reader.readline())).strip() == b"released"
        writer.close()
    assert await within(shutdown, 30) is True
    assert [p.returncode for p in processes] == [0, 0]
    assert pool.pids == []


async def test_shutdown_deadline_terminates_workers_still_serving() -> None:
    pool = WorkerPool(HANDLER, processes=1, loop=_loop_name())  # type: ignore[arg-type]
    await pool.start()
    listener = socket.create_server(("127.0.0.1", 0))
    pool.acceptor.add_listener(listener)
    reader, writer, _pid = await hold(listener.getsockname()[1])
    processes = [c.process for c in pool._children]
    assert await within(pool.shutdown(timeout=0.3)) is False
    assert [p.returncode for p in processes] == [-signal.SIGTERM]
    assert await within(reader.read()) == b""
    writer.close()
    await writer.wait_closed()


def test_handlers_must_be_importable() -> None:
    with pytest.raises(ValueError, match="module-level"):
        WorkerPool(lambda client: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="module:function"):
        WorkerPool("no_colon")
    with pytest.raises(ModuleNotFoundError):
        WorkerPool("no_such_module_here:handle")
    with pytest.raises(ValueError, match="loop"):
        WorkerPool(HANDLER, loop="trio")  # type: ignore[arg-type]


async def test_clients_queued_for_a_killed_worker_are_served_by_another() -> None:
    pool = WorkerPool(HANDLER, processes=2, loop=_loop_name(), dispatch="round-robin")  # type: ignore[arg-type]
    async with pool:
        listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        pool.acceptor.add_listener(listener)
        port = listener.getsockname()[1]
        await ask(port, "warm up")  # both workers are up and reading
        await ask(port, "warm up")
        # Reports lag answers by a loop iteration: wait for them, or the victim could die
        # still owing one (its client answered, yet counted lost).
        assert await pool.acceptor.drain(timeout=10)
        victim = pool.acceptor.workers[0]
        link = link_transport(victim)
        link.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGSTOP)  # it stops reading its socket
        clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        while link.get_write_buffer_fds() < 4:  # until clients queue on the acceptor's side
            assert len(clients) < 1000
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"client {len(clients)}".encode())
            clients.append((reader, writer))
            await wait_until(lambda: pool.acceptor.stats().accepted == len(clients) + 2)
        queued = link.get_write_buffer_fds()
        os.kill(victim.pid, signal.SIGKILL)
        await wait_until(lambda: pool.acceptor.stats().requeued == queued, timeout=10)
        answered = lost = 0
        for n, (reader, writer) in enumerate(clients):
            try:
                line = (await within(reader.readline(), 20)).decode()
            except ConnectionResetError:
                line = ""
            if line:
                assert line.split(" ", 1)[1].strip() == f"client {n}"
                answered += 1
            else:
                lost += 1
            writer.close()
        # A worker's completion report can trail its client's answer: wait for the count.
        await wait_until(lambda: pool.acceptor.stats().completed == answered + 2, timeout=10)
        stats = pool.acceptor.stats()
        assert stats.lost == lost
        assert stats.in_flight == 0
        # Lost: exactly what had reached the victim's socket (handed minus what it finished).
        assert lost == victim.handed - victim.completed
        assert stats.requeued == queued
        await wait_until(lambda: pool.restarts == 1)


async def test_shared_sockets_reach_every_worker_at_their_numbers_and_are_taken_once() -> None:
    """``share``: each worker takes its copy of the listener once and accepts on it; the
    acceptor hands nothing over, and the pool's own socket stays the caller's."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    port = listener.getsockname()[1]
    pool = WorkerPool(
        main="helpers.pool_handlers:shared_main",
        processes=2,
        loop=_loop_name(),  # type: ignore[arg-type]
        share=[listener],
    )
    async with pool:
        answers = await within(asyncio.gather(*(ask(port, f"c{n}\n") for n in range(40))), 60)
        assert pool.acceptor.stats().accepted == 0
        pids = set(pool.pids)
    assert {a.split()[1] for a in answers} == {"refused"}
    assert {a.split()[2] for a in answers} == {f"c{n}" for n in range(40)}
    assert {int(a.split()[0]) for a in answers} <= pids  # the kernel chose among them
    assert listener.fileno() >= 0  # not closed by the pool
    listener.close()
