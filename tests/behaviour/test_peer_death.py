"""Endings: the peer dies (mid-frame, mid-batch, with fds in flight), resets, half-closes; the
local side gives up (cancellation at every await point, task groups, a loop closed under an
open connection).

Dying peers are real processes killed with SIGKILL right after writing, so that nothing in
them can tidy up. Every test ends with exactly the fds it started with, on both loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from helpers import LOOP_FACTORIES, LOOP_NAMES, open_fd_count, rights

from aioancillary import (
    AncillaryConnection,
    AncillaryError,
    AncillaryMessage,
    ConnectionClosedError,
    ProtocolError,
    connection_pair,
    open_unix_connection,
    recv_fds,
    start_unix_server,
)

TIMEOUT = 5.0
_HEADER = struct.Struct(">BBHI")


def frame(nfds: int, payload: bytes, *, length: int | None = None) -> bytes:
    return _HEADER.pack(1, 0, nfds, len(payload) if length is None else length) + payload


@contextlib.asynccontextmanager
async def raw_peer(**kwargs: object) -> AsyncIterator[tuple[AncillaryConnection, socket.socket]]:
    ours, theirs = socket.socketpair()
    conn = await open_unix_connection(sock=ours, **kwargs)  # type: ignore[arg-type]
    try:
        yield conn, theirs
    finally:
        theirs.close()
        conn.abort()
        await conn.wait_closed()


async def collect(conn: AncillaryConnection) -> tuple[list[AncillaryMessage], BaseException | None]:
    """Every message until the end (the caller closes them), and the error that ended it."""
    got: list[AncillaryMessage] = []
    try:
        async with asyncio.timeout(TIMEOUT):
            async for msg in conn:
                got.append(msg)
    except (AncillaryError, OSError) as exc:
        return got, exc
    return got, None


# -- peers that die -----------------------------------------------------------------------------

DYING_PEER = textwrap.dedent(
    """
    import array, os, signal, socket, struct, sys

    def frame(nfds, payload, length=None):
        size = len(payload) if length is None else length
        return struct.pack(">BBHI", 1, 0, nfds, size) + payload

    def rights(fds):
        return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]

    sock = socket.socket(fileno=int(sys.argv[1]))
    files = [os.open(path, os.O_RDONLY) for path in sys.argv[3:]]
    scenario = sys.argv[2]
    if scenario == "mid-frame":
        sock.sendmsg([frame(1, b"complete")], rights(files[:1]))
        sock.sendmsg([frame(2, b"x" * 100)[:20]], rights(files[1:3]))  # 12 of 100 bytes
    elif scenario == "mid-batch":
        # One sendmsg: three whole frames and half of a fourth, all their fds up front.
        batch = frame(1, b"a") + frame(1, b"b") + frame(1, b"c") + frame(2, b"d" * 64)[:30]
        sock.sendmsg([batch], rights(files[:5]))
    elif scenario == "in-flight":
        for i in range(50):
            sock.sendmsg([frame(2, b"%d" % i)], rights(files[:2]))
    elif scenario == "never-reads":
        sys.stdout.write("ready\\n")
        sys.stdout.flush()
        signal.pause()  # until killed, with everything we sent unread
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def spawn_peer(sock: socket.socket, scenario: str, *files: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", DYING_PEER, str(sock.fileno()), scenario, *map(str, files)],
        pass_fds=[sock.fileno()],
        stdout=subprocess.PIPE,
    )


def reap(proc: subprocess.Popen[bytes]) -> None:
    assert proc.wait(TIMEOUT) == -signal.SIGKILL
    assert proc.stdout is not None
    proc.stdout.close()


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = []
    for name in "abcde":
        path = tmp_path / name
        path.write_text(name)
        paths.append(path)
    return paths


def ino(msg: AncillaryMessage, i: int = 0) -> int:
    return os.fstat(msg.fds[i].fileno()).st_ino


async def test_peer_dies_mid_frame(files: list[Path]) -> None:
    async with raw_peer() as (conn, theirs):
        proc = spawn_peer(theirs, "mid-frame", *files)
        theirs.close()
        base = open_fd_count()
        got, exc = await collect(conn)
        reap(proc)
        assert [m.data for m in got] == [b"complete"]
        assert ino(got[0]) == files[0].stat().st_ino
        for msg in got:
            msg.close()
        assert isinstance(exc, ProtocolError)
        assert "ended inside a frame" in str(exc)
        assert open_fd_count() <= base


async def test_peer_dies_mid_batch(files: list[Path]) -> None:
    async with raw_peer() as (conn, theirs):
        proc = spawn_peer(theirs, "mid-batch", *files)
        theirs.close()
        got, exc = await collect(conn)
        reap(proc)
        assert [m.data for m in got] == [b"a", b"b", b"c"]
        # Each whole frame got its own fd, in order; the fourth frame's two fds were closed.
        assert [ino(m) for m in got] == [p.stat().st_ino for p in files[:3]]
        for msg in got:
            msg.close()
        assert isinstance(exc, ProtocolError)


async def test_peer_dies_with_fds_in_flight(files: list[Path]) -> None:
    async with raw_peer() as (conn, theirs):
        conn.transport.pause_reading()  # the fds stay in flight in our receive queue
        proc = spawn_peer(theirs, "in-flight", *files)
        theirs.close()
        await asyncio.get_running_loop().run_in_executor(None, reap, proc)
        conn.transport.resume_reading()
        got, exc = await collect(conn)
        assert exc is None  # every frame was whole: a clean end of stream
        assert [m.data for m in got] == [b"%d" % i for i in range(50)]
        assert all(len(m.fds) == 2 for m in got)
        for msg in got:
            msg.close()


async def test_peer_dies_while_we_send_fds(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    async with raw_peer() as (conn, theirs):
        conn.transport.set_write_buffer_limits(high=4096)
        proc = spawn_peer(theirs, "never-reads")
        theirs.close()
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, proc.stdout.readline) == b"ready\n"

        async def flood() -> None:
            while True:
                await conn.send_fds(b"x" * 512, [r])

        sender = asyncio.create_task(flood())
        async with asyncio.timeout(TIMEOUT):
            while conn.transport.get_write_buffer_fds() == 0:
                await asyncio.sleep(0.005)  # until the socket is full and fds are queued
        proc.kill()
        await loop.run_in_executor(None, reap, proc)
        with pytest.raises(ConnectionClosedError):
            await asyncio.wait_for(sender, TIMEOUT)
        # The duplicates queued for the dead peer are closed.
        assert conn.transport.get_write_buffer_fds() == 0


# -- resets and half-closed streams -------------------------------------------------------------


async def test_connection_reset_by_the_peer() -> None:
    async with raw_peer() as (conn, theirs):
        await conn.send(b"never read")
        await asyncio.sleep(0.01)
        theirs.close()  # with unread data: our side gets ECONNRESET
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(conn.recv(), TIMEOUT)
        with pytest.raises(ConnectionClosedError):
            await conn.send(b"more")


async def test_messages_before_a_reset_are_delivered(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    async with raw_peer() as (conn, theirs):
        await conn.send(b"never read")
        await asyncio.sleep(0.01)
        theirs.sendmsg([frame(1, b"last words")], rights([r]))
        theirs.close()  # the data and the reset are pending together
        with await asyncio.wait_for(conn.recv(), TIMEOUT) as msg:
            assert (msg.data, len(msg.fds)) == (b"last words", 1)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(conn.recv(), 1.0)  # not a hang


async def test_messages_of_a_dead_peer_survive_a_failing_write(pipe_fds: tuple[int, int]) -> None:
    # The peer's last messages are in our receive queue when it exits; writing to it then
    # fails (EPIPE). The messages it did send must still be delivered.
    r, _ = pipe_fds
    async with raw_peer() as (conn, theirs):
        conn.transport.pause_reading()  # our reader has not run yet when the write fails
        theirs.sendmsg([frame(1, b"last words")], rights([r]))
        theirs.close()
        with pytest.raises(ConnectionClosedError):
            await conn.send(b"too late")
        conn.transport.resume_reading()
        with await asyncio.wait_for(conn.recv(), TIMEOUT) as msg:
            assert (msg.data, len(msg.fds)) == (b"last words", 1)


async def test_peer_half_closes(pipe_fds: tuple[int, int]) -> None:
    r, w = pipe_fds
    async with raw_peer() as (conn, theirs):
        for i in range(3):
            theirs.sendmsg([frame(1, b"%d" % i)], rights([r]))
        theirs.shutdown(socket.SHUT_WR)
        got, exc = await collect(conn)
        assert exc is None
        assert [(m.data, len(m.fds)) for m in got] == [(b"0", 1), (b"1", 1), (b"2", 1)]
        for msg in got:
            msg.close()
        # Our direction still works: the peer reads a frame and its fd.
        await conn.send_fds(b"reply", [w])
        with recv_fds(theirs, 64, 4) as reply:
            assert reply.data == frame(1, b"reply")
            assert os.fstat(reply.fds[0].fileno()).st_ino == os.fstat(w).st_ino


async def test_we_half_close(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    a, b = await connection_pair()
    try:
        b.transport.pause_reading()
        for i in range(20):
            await a.send_fds(b"%d" % i, [r])  # queued, then EOF after them
        a.write_eof()
        with pytest.raises(ConnectionClosedError):
            await a.send(b"after eof")
        b.transport.resume_reading()
        got, exc = await collect(b)
        assert exc is None
        assert [m.data for m in got] == [b"%d" % i for i in range(20)]
        for msg in got:
            msg.close()
        await b.send_fds(b"back", [r])  # the other direction is still open
        with await asyncio.wait_for(a.recv(), TIMEOUT) as msg:
            assert (msg.data, len(msg.fds)) == (b"back", 1)
    finally:
        for conn in (a, b):
            conn.abort()
            await conn.wait_closed()


# -- cancellation at every await point ----------------------------------------------------------

Receive = Callable[[AncillaryConnection], Awaitable[object]]


async def _recv_one(conn: AncillaryConnection) -> object:
    return [await conn.recv()]


async def _recv_batch(conn: AncillaryConnection) -> object:
    return await conn.recv_batch()


async def _anext(conn: AncillaryConnection) -> object:
    return [await conn.__anext__()]


@pytest.mark.parametrize(
    "receive", [_recv_one, _recv_batch, _anext], ids=["recv", "batch", "anext"]
)
async def test_cancelled_receive_loses_no_message(
    receive: Receive, pipe_fds: tuple[int, int]
) -> None:
    r, _ = pipe_fds
    got: list[bytes] = []
    sent: list[bytes] = []
    async with raw_peer() as (conn, theirs):
        for i in range(24):
            data = b"%d" % i
            before, after = divmod(i, 6)  # the message comes before or during the wait
            task = asyncio.ensure_future(receive(conn))
            if before % 2:
                theirs.sendmsg([frame(1, data)], rights([r]))
                sent.append(data)
            for _ in range(after):
                await asyncio.sleep(0)
            if not before % 2:
                theirs.sendmsg([frame(1, data)], rights([r]))
                sent.append(data)
            await asyncio.sleep(0)
            task.cancel()
            try:
                messages = await task
            except asyncio.CancelledError:
                messages = []
            for msg in messages:  # type: ignore[attr-defined]
                with msg:
                    assert len(msg.fds) == 1
                    got.append(msg.data)
        theirs.shutdown(socket.SHUT_WR)
        rest, exc = await collect(conn)
        assert exc is None
        for msg in rest:
            with msg:
                got.append(msg.data)
    assert got == sent


async def test_cancelled_send_still_delivers_its_message(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    a, b = await connection_pair()
    try:
        b.transport.pause_reading()
        a.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.transport.set_write_buffer_limits(high=1024)
        sent = 0
        cancelled = 0
        for step in range(40):
            task = asyncio.ensure_future(a.send_fds(b"%d" % step + b"." * 500, [r]))
            sent += 1
            for _ in range(1 + step % 3):  # send_fds has been called: the message is queued
                await asyncio.sleep(0)
            if not task.done():
                task.cancel()
                cancelled += 1
            with contextlib.suppress(asyncio.CancelledError):
                await task
        drain = asyncio.ensure_future(a.drain())
        await asyncio.sleep(0)
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        assert cancelled > 0  # some sends really were cancelled while waiting to drain
        b.transport.resume_reading()
        for step in range(sent):
            with await asyncio.wait_for(b.recv(), TIMEOUT) as msg:
                assert msg.data.startswith(b"%d." % step)  # every one, in order, with its fd
                assert os.fstat(msg.fds[0].fileno()).st_ino == os.fstat(r).st_ino
    finally:
        for conn in (a, b):
            conn.abort()
            await conn.wait_closed()


async def test_cancelled_wait_closed_still_closes(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    a, b = await connection_pair()
    try:
        b.transport.pause_reading()
        for _ in range(10):
            await a.send_fds(b"x" * 100, [r])
        a.close()  # queued messages go out first
        waiter = asyncio.ensure_future(a.wait_closed())
        await asyncio.sleep(0)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        b.transport.resume_reading()
        got, exc = await collect(b)
        assert exc is None
        assert len(got) == 10
        for msg in got:
            msg.close()
        await asyncio.wait_for(a.wait_closed(), TIMEOUT)
    finally:
        for conn in (a, b):
            conn.abort()
            await conn.wait_closed()


async def test_cancelled_connect_leaks_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    pending = socket.socket(socket.AF_UNIX)
    pending.setblocking(False)
    pending.connect(path)  # fills the backlog: the next connect cannot complete at once
    try:
        for steps in range(4):
            base = open_fd_count()
            task = asyncio.ensure_future(open_unix_connection(path))
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            try:
                conn = await task
            except (asyncio.CancelledError, OSError):
                pass
            else:
                conn.abort()
                await conn.wait_closed()
            assert open_fd_count() == base
    finally:
        pending.close()
        listener.close()


async def test_cancelled_serve_forever_closes_the_server(tmp_path: Path) -> None:
    async def handler(conn: AncillaryConnection) -> None:
        async for msg in conn:
            msg.close()

    server = await start_unix_server(handler, tmp_path / "s.sock")
    serving = asyncio.ensure_future(server.serve_forever())
    await asyncio.sleep(0)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert not server.is_serving()
    waiting = asyncio.ensure_future(server.wait_closed())
    await asyncio.sleep(0)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)


async def test_task_group_cancelled_with_messages_queued_for_it(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    pairs = [await connection_pair() for _ in range(5)]
    base = open_fd_count()
    started = asyncio.Event()

    async def handler(conn: AncillaryConnection) -> None:
        async with conn:
            started.set()
            await asyncio.sleep(3600)  # never reads: messages queue up with their fds

    async def group() -> None:
        async with asyncio.TaskGroup() as tg:
            for _, theirs in pairs:
                tg.create_task(handler(theirs))

    running = asyncio.ensure_future(group())
    await started.wait()
    for ours, _ in pairs:
        for _ in range(20):
            await ours.send_fds(b"queued", [r, r])
    await asyncio.sleep(0.05)
    assert open_fd_count() >= base + 5 * 20 * 2  # the receive queues hold the fds
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, TIMEOUT)
    for ours, theirs in pairs:
        assert theirs.is_closing()
        ours.abort()
        await ours.wait_closed()
    assert open_fd_count() == base - 10  # the ten sockets of the five pairs


async def test_task_group_cancelled_while_sending_to_a_peer_that_does_not_read(
    pipe_fds: tuple[int, int],
) -> None:
    # A hostile peer stops reading; the handlers are cancelled (shutdown, timeout). Leaving
    # ``async with conn`` must not wait forever for that peer to take the queued messages.
    r, _ = pipe_fds
    pairs = [await connection_pair() for _ in range(3)]
    for _, theirs in pairs:
        theirs.transport.pause_reading()

    async def handler(conn: AncillaryConnection) -> None:
        async with conn:
            while True:
                await conn.send_fds(b"x" * 1000, [r])

    async def group() -> None:
        async with asyncio.TaskGroup() as tg:
            for ours, _ in pairs:
                tg.create_task(handler(ours))

    running = asyncio.ensure_future(group())
    await asyncio.sleep(0.1)
    assert all(ours.transport.get_write_buffer_fds() > 0 for ours, _ in pairs)
    running.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(running), 2.0)
    finally:
        for ours, theirs in pairs:
            theirs.abort()
            ours.abort()
            await theirs.wait_closed()
            await ours.wait_closed()
        with contextlib.suppress(asyncio.CancelledError):
            await running


# -- a loop closed under an open connection -----------------------------------------------------


def _drop(objects: list[object]) -> None:
    objects.clear()
    gc.collect()  # the connections sit in reference cycles: only the collector finds them


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
def test_loop_closed_with_a_connection_open(loop_name: str) -> None:
    base = open_fd_count()
    r, w = os.pipe()
    loop = LOOP_FACTORIES[loop_name]()

    async def leave_open() -> tuple[list[object], socket.socket]:
        a, b = await connection_pair()
        b.transport.pause_reading()
        for _ in range(5):
            await a.send_fds(b"x", [r, w])  # in flight, and queued as duplicates in a
        await b.send_fds(b"y", [r])  # received by a, never taken
        await asyncio.sleep(0.01)
        ours, theirs = socket.socketpair()
        c = await open_unix_connection(sock=ours)
        theirs.sendmsg([frame(2, b"part", length=100)], rights([r, w]))  # held by the decoder
        await asyncio.sleep(0.01)
        return [a, b, c], theirs

    left_open, theirs = loop.run_until_complete(leave_open())
    loop.close()  # with every connection still open
    theirs.close()
    with pytest.warns(ResourceWarning) as record:
        _drop(left_open)
    assert any("AncillaryTransport" in str(w.message) for w in record)
    os.close(r)
    os.close(w)
    gc.collect()
    assert open_fd_count() == base
