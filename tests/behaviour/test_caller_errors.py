"""A careless caller must not corrupt a stream: every refusal happens before anything is queued.

Each case runs on the direct path (nothing queued: ``sendmsg`` is called at once) and on the
queued path (an earlier send of the same burst is still queued, so the message is appended to
the outgoing batch). After every refusal the connection must still work, the peer must receive
exactly the messages that were accepted, with exactly their fds, and, with ``close_fds=True``,
every fd handed over must be closed.
"""

from __future__ import annotations

import array
import asyncio
import gc
import os
import socket
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from helpers import is_open, pair, wait_until, within

from aioancillary import (
    AncillaryConnection,
    ConnectionClosedError,
    InvalidFdError,
    OwnedFd,
    connection_pair,
    open_unix_connection,
)

MODES = [
    pytest.param(socket.SOCK_STREAM, True, id="framed"),
    pytest.param(socket.SOCK_STREAM, False, id="raw"),
    pytest.param(socket.SOCK_SEQPACKET, None, id="seqpacket"),
]
PATHS = pytest.mark.parametrize("queued", [False, True], ids=["direct", "queued"])


def inode(fd: int | OwnedFd) -> int:
    return os.fstat(fd if isinstance(fd, int) else fd.fileno()).st_ino


async def start_queued(a: AncillaryConnection) -> None:
    """Make the next send take the queued path: the first send of a burst goes out at once,
    later ones in the same loop iteration are appended to the outgoing batch."""
    await a.send(b"first")
    await a.send(b"second")


async def expect(b: AncillaryConnection, data: bytes, inodes: list[int]) -> None:
    with await within(b.recv()) as msg:
        assert msg.data == data
        assert [inode(fd) for fd in msg.fds] == inodes


async def expect_start(b: AncillaryConnection) -> None:
    await expect(b, b"first", [])
    await expect(b, b"second", [])


# -- 1. data is framed by its size in bytes, whatever its item size or shape -------------------


def wide_items() -> memoryview:
    return memoryview(array.array("H", range(1, 1000)))  # 999 items, 1998 bytes


def two_dimensional() -> memoryview:
    return memoryview(bytes(range(48))).cast("B", (6, 8))  # 6 items of 8 bytes


def strided() -> memoryview:
    return memoryview(bytes(range(200)))[::3]  # not contiguous


def empty_wide() -> memoryview:
    return memoryview(array.array("q"))


SHAPES = pytest.mark.parametrize(
    "make", [wide_items, two_dimensional, strided, empty_wide], ids=lambda f: f.__name__
)


@pytest.mark.parametrize(("sock_type", "framed"), MODES)
@SHAPES
@PATHS
async def test_any_bytes_like_is_sent_as_its_bytes(
    sock_type: int, framed: bool | None, make: Callable[[], memoryview], queued: bool
) -> None:
    data = make()
    expected = data.tobytes()
    r, w = os.pipe()
    try:
        async with pair(sock_type, framed=framed) as (a, b):
            if queued:
                await start_queued(a)
            if not expected and framed is False:
                # A raw stream sends nothing, fds included, for an empty write.
                with pytest.raises(ValueError, match="at least one byte"):
                    await a.send_fds(data, [r])
                return
            await a.send_fds(data, [r])
            await a.send_fds(b"next", [w])
            if framed is False:
                # A raw stream delivers reads, not messages: collect until all has come.
                start = b"firstsecond" if queued else b""
                got, fds = b"", []
                while len(got) < len(start + expected + b"next"):
                    with await within(b.recv()) as msg:
                        got += msg.data
                        fds += [inode(fd) for fd in msg.fds]
                assert got == start + expected + b"next"
                assert fds == [inode(r), inode(w)]
                return
            if queued:
                await expect_start(b)
            await expect(b, expected, [inode(r)])
            await expect(b, b"next", [inode(w)])
    finally:
        os.close(r)
        os.close(w)


# -- 2. a wrong data type is refused before anything is queued ---------------------------------

BAD_DATA: list[Any] = ["text", [1, 2, 3], 5, None, 3.5, {"a": 1}]


@pytest.mark.parametrize("bad", BAD_DATA, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("close_fds", [False, True], ids=["borrowed", "close_fds"])
@PATHS
async def test_wrong_data_type_is_refused_and_the_stream_stays_intact(
    bad: Any, close_fds: bool, queued: bool
) -> None:
    r, w = os.pipe()
    handed = os.dup(w)
    try:
        async with pair() as (a, b):
            if queued:
                await start_queued(a)
            with pytest.raises(TypeError, match="bytes-like"):
                await a.send_fds(bad, [handed], close_fds=close_fds)
            assert is_open(handed) is not close_fds  # handed over: closed on refusal
            await a.send_fds(b"next", [w])
            if queued:
                await expect_start(b)
            await expect(b, b"next", [inode(w)])
    finally:
        if not close_fds:
            os.close(handed)
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("bad", BAD_DATA[:2], ids=lambda v: type(v).__name__)
async def test_wrong_data_type_is_refused_by_write_and_writelines(bad: Any) -> None:
    async with pair() as (a, b):
        with pytest.raises(TypeError, match="bytes-like"):
            a.transport.write(bad)
        with pytest.raises(TypeError, match="bytes-like"):
            a.transport.writelines([b"ok", bad])  # all or nothing: b"ok" is not sent either
        await a.send(b"after")
        await expect(b, b"after", [])


# -- 3. close_fds=True with a closed fd number is refused on the queued path too ---------------


def closed_fd_number() -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd  # nothing opens an fd before the send below


@PATHS
async def test_close_fds_with_a_closed_fd_is_refused_and_the_connection_lives(
    queued: bool,
) -> None:
    r, w = os.pipe()
    try:
        async with pair() as (a, b):
            if queued:
                await start_queued(a)
            good = os.dup(r)
            with pytest.raises(InvalidFdError):
                await a.send_fds(b"bad", [good, closed_fd_number()], close_fds=True)
            assert not is_open(good)  # handed over: closed on refusal
            await a.send_fds(b"next", [w])
            await asyncio.sleep(0)  # let a queued batch go out
            assert not a.is_closing()
            if queued:
                await expect_start(b)
            await expect(b, b"next", [inode(w)])
    finally:
        os.close(r)
        os.close(w)


async def test_a_refused_message_does_not_drop_other_tasks_messages() -> None:
    # Two tasks' messages share one batch; a third task's refused send must not sink it.
    r, w = os.pipe()
    try:
        async with pair() as (a, b):
            await start_queued(a)
            with pytest.raises(InvalidFdError):
                await a.send_fds(b"bad", [closed_fd_number()], close_fds=True)
            await a.send_fds(b"after", [r])
            await expect_start(b)
            await expect(b, b"after", [inode(r)])
    finally:
        os.close(r)
        os.close(w)


# -- 4. a send waiting in drain() when the peer resets: the cause is chained --------------------


async def test_send_waiting_for_drain_when_the_peer_resets_chains_the_cause() -> None:
    async with pair() as (a, b):
        b.transport.pause_reading()
        a.transport.set_write_buffer_limits(high=1)
        while not a.transport.get_write_buffer_size():
            a.transport.write(b"x" * 65536)  # until the kernel is full and a batch is queued
            await asyncio.sleep(0)  # (a queued batch is flushed at the end of the iteration)
        sender = asyncio.create_task(a.send(b"waits"))
        await asyncio.sleep(0)
        assert not sender.done()  # waiting in drain()
        b.abort()  # unread data in b's queue: the kernel resets a's side (ECONNRESET)
        with pytest.raises(ConnectionClosedError) as info:
            await within(sender)
        assert isinstance(info.value.__cause__, OSError)


# -- 5. fd-list items: one rule for every wrong item -------------------------------------------

BAD_ITEMS: list[tuple[Any, type[Exception]]] = [
    (True, TypeError),
    (False, TypeError),
    (None, TypeError),
    ("3", TypeError),
    (3.0, TypeError),
    (b"\x03", TypeError),
    (2**40, InvalidFdError),
    (2**31, InvalidFdError),
    (-1, InvalidFdError),
]


@pytest.mark.parametrize(("bad", "error"), BAD_ITEMS, ids=repr)
@pytest.mark.parametrize("close_fds", [False, True], ids=["borrowed", "close_fds"])
@PATHS
async def test_bad_fd_items_are_refused_before_anything_is_sent(
    bad: Any, error: type[Exception], close_fds: bool, queued: bool
) -> None:
    r, w = os.pipe()
    owned = OwnedFd(os.dup(r))
    sock_a, sock_b = socket.socketpair()
    raw = os.dup(w)
    try:
        async with pair() as (a, b):
            if queued:
                await start_queued(a)
            with pytest.raises(error, match="fd"):
                await a.send_fds(b"bad", [owned, sock_a, raw, bad], close_fds=close_fds)
            if close_fds:
                # Everything handed over is closed, whatever made the send fail.
                assert owned.closed
                assert sock_a.fileno() == -1
                assert not is_open(raw)
            else:
                assert not owned.closed
                assert sock_a.fileno() >= 0
                assert is_open(raw)
            await a.send_fds(b"next", [w])
            if queued:
                await expect_start(b)
            await expect(b, b"next", [inode(w)])
    finally:
        owned.close()
        sock_a.close()
        sock_b.close()
        if not close_fds:
            os.close(raw)
        os.close(r)
        os.close(w)


class BadFileno:
    def __init__(self, value: Any) -> None:
        self.value = value

    def fileno(self) -> Any:
        return self.value


@pytest.mark.parametrize("value", [None, "3", True, 2**40], ids=repr)
async def test_fileno_returning_a_non_fd_is_refused(value: Any) -> None:
    async with pair() as (a, b):
        with pytest.raises((TypeError, InvalidFdError), match="fd"):
            await a.send_fds(b"bad", [BadFileno(value)])
        await a.send(b"next")
        await expect(b, b"next", [])


async def test_close_fds_refuses_objects_it_cannot_take_over() -> None:
    r, w = os.pipe()
    try:
        handed = os.dup(r)
        async with pair() as (a, b):
            with open(os.devnull, "rb") as f, pytest.raises(TypeError, match="close_fds"):
                await a.send_fds(b"bad", [handed, f], close_fds=True)
            assert not is_open(handed)  # the fd it could take over is closed
            await a.send_fds(b"next", [w])
            await expect(b, b"next", [inode(w)])
    finally:
        os.close(r)
        os.close(w)


async def test_fds_not_iterable_is_refused() -> None:
    async with pair() as (a, b):
        with pytest.raises(TypeError, match="fds"):
            await a.send_fds(b"bad", 3)  # type: ignore[arg-type]
        await a.send(b"next")
        await expect(b, b"next", [])


@PATHS
async def test_close_fds_on_a_closed_connection_closes_every_fd(queued: bool) -> None:
    async with pair() as (a, _b):
        if queued:
            await start_queued(a)
        a.close()
        handed = os.open(os.devnull, os.O_RDONLY)
        sock_a, sock_b = socket.socketpair()
        with pytest.raises(ConnectionClosedError):
            await a.send_fds(b"late", [handed, sock_a, None], close_fds=True)  # type: ignore[list-item]
        assert not is_open(handed)
        assert sock_a.fileno() == -1
        sock_b.close()


# -- 6. sockets that cannot work are refused, saying what was expected -------------------------


async def test_open_unix_connection_refuses_an_unconnected_socket() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        with pytest.raises(ValueError, match="not connected"):
            await aa_open(sock)
        assert sock.fileno() >= 0  # refused, not taken: still the caller's


async def test_open_unix_connection_refuses_a_listening_socket(tmp_path: Any) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "l.sock"))
        sock.listen()
        with pytest.raises(ValueError, match="listening"):
            await aa_open(sock)


async def test_open_unix_connection_refuses_a_non_unix_socket() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock, pytest.raises(ValueError, match="AF_UNIX"):
        await aa_open(sock)


async def aa_open(sock: socket.socket) -> AncillaryConnection:
    return await open_unix_connection(sock=sock)


# -- 9. a connection the application dropped without close() is collected, with a warning -----


async def test_dropped_connection_is_collected_with_a_resource_warning() -> None:
    a, b = await connection_pair()
    r, w = os.pipe()
    try:
        b.transport.pause_reading()
        await a.send(b"first")
        await a.send_fds(b"queued", [r])  # a queued duplicate, held by a's transport
        ref = weakref.ref(a)
        dropped = [a]
        del a
        with pytest.warns(ResourceWarning, match="unclosed AncillaryConnection"):
            drop(dropped)
        assert ref() is None
        b.transport.resume_reading()
        await expect(b, b"first", [])  # what was already sent still arrives
        await expect_closed(b)  # then the dropped side's close
    finally:
        b.close()
        await b.wait_closed()
        os.close(r)
        os.close(w)


def drop(objects: list[AncillaryConnection]) -> None:
    objects.clear()
    gc.collect()


async def expect_closed(b: AncillaryConnection) -> None:
    """Read (and close) whatever still comes until the connection reports its end."""
    while True:
        try:
            msg = await within(b.recv())
        except ConnectionClosedError:
            return
        msg.close()


async def test_connection_awaited_by_a_task_is_not_collected() -> None:
    a, b = await connection_pair()

    async def reader(conn: AncillaryConnection) -> bytes:
        try:
            with await conn.recv() as msg:
                return msg.data
        finally:
            conn.close()
            await conn.wait_closed()

    task = asyncio.create_task(reader(a))
    del a
    await asyncio.sleep(0)
    gc.collect()  # the task waiting in recv() keeps its connection alive
    await b.send(b"ping")
    assert await within(task) == b"ping"
    b.close()
    await b.wait_closed()


# -- finalisers close before they warn --------------------------------------------------------

FINALISED = textwrap.dedent(
    """
    import asyncio, gc, os, sys
    import aioancillary as aa
    from aioancillary._core._message import new_message

    kind = sys.argv[1]

    def alive(fd):
        try:
            os.fstat(fd)
            return True
        except OSError:
            return False

    async def main():
        if kind == "OwnedFd":
            obj = aa.OwnedFd(os.open(os.devnull, os.O_RDONLY))
            fd = obj.fileno()
        elif kind == "AncillaryMessage":
            fd = os.open(os.devnull, os.O_RDONLY)
            obj = new_message(b"x", [fd])
        else:
            obj, peer = await aa.connection_pair()
            fd = obj.transport.get_extra_info("socket").fileno()
        del obj
        gc.collect()  # the warning, an error here, is raised inside __del__: unraisable
        await asyncio.sleep(0)  # a connection's socket closes in the loop's next iteration
        print("closed" if not alive(fd) else "LEAKED")
        if kind == "AncillaryConnection":
            peer.close()
            await peer.wait_closed()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("kind", ["OwnedFd", "AncillaryMessage", "AncillaryConnection"])
def test_finalisers_close_even_when_warnings_are_errors(kind: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", "-c", FINALISED, kind],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.stdout.strip() == "closed", proc.stderr
    assert "ResourceWarning" in proc.stderr  # still reported (as unraisable)


async def test_at_eof() -> None:
    async with pair() as (a, b):
        await a.send(b"last")
        a.write_eof()
        await wait_until(lambda: not b.transport.is_reading())  # EOF read; "last" is queued
        assert not b.at_eof()
        with await within(b.recv()) as msg:
            assert msg.data == b"last"
        assert b.at_eof()
