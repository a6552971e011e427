"""Shared helpers of the asyncio-layer tests: fds that identify messages, pairs, protocols.

Every message a test sends carries fds that say which message they belong to: the read end of
a pipe whose content is a tag (``tagged_pipe``), so that a receiver can prove it got *the* fd
that was sent with *that* message, not merely some fd.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import resource
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

import pytest

try:
    import uvloop as uvloop
except ImportError:  # the suite also runs without it: the uvloop half is skipped
    uvloop = None  # type: ignore[assignment]

from aioancillary import (
    AncillaryConnection,
    AncillaryMessage,
    AncillaryProtocol,
    AncillaryTransport,
    OwnedFd,
    connection_pair,
)

T = TypeVar("T")

#: Upper bound for any single wait in these tests: a hang fails instead of blocking the run.
#: Generous, since it bounds only a failing wait: CI shares 2 cores with other jobs, and 200
#: clients through two workers in asyncio's debug mode took over 5 s there. Three of them still
#: fit in pytest-timeout's 60 s per test.
TIMEOUT = 15.0
#: Payload bigger than a socketpair's kernel buffer (about 208 KiB on Linux by default), so one
#: write cannot be taken by the kernel at once and one message spans many ``recvmsg`` calls.
BIG = 1024 * 1024 - 1024


# -- event loops ------------------------------------------------------------------------------

#: Why the uvloop half of the suite is skipped when uvloop is absent (shown by ``pytest -ra``).
NO_UVLOOP = "uvloop is not installed: the uvloop half of the suite is skipped (pip install uvloop)"

#: For a test that forks the test process itself. Once a uvloop test has resolved an address,
#: libuv's thread pool (4 threads, idle, never stopped) lives in the process, and Python 3.12+
#: warns at every fork of a multi-threaded process. These children only close, send and exec
#: or exit, and take none of the locks those threads could hold.
FORKS_THE_TEST_PROCESS = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"
)


class DebugEventLoop(asyncio.SelectorEventLoop):
    """asyncio's default loop with debug mode pinned on (``asyncio.new_event_loop`` + debug).

    pytest-asyncio's runner calls ``set_debug(asyncio_debug)`` on the loop right after the
    factory made it, which would switch debug mode off again; this loop keeps it on.
    """

    def __init__(self) -> None:
        super().__init__()
        super().set_debug(True)

    def set_debug(self, enabled: bool) -> None:
        super().set_debug(True)


def new_uvloop() -> asyncio.AbstractEventLoop:
    """``uvloop.new_event_loop()``; tests on it are skipped at collection when uvloop is absent."""
    if uvloop is None:
        raise RuntimeError(NO_UVLOOP)
    return uvloop.new_event_loop()


#: The loops every async test runs on (ids ``[asyncio]``, ``[asyncio-debug]``, ``[uvloop]``).
LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "asyncio-debug": DebugEventLoop,
    "uvloop": new_uvloop,
}

#: ``@pytest.mark.parametrize("loop_name", LOOP_NAMES)`` for sync tests that start their own
#: loop or a child on a named loop: asyncio, and uvloop (skipped, saying so, when absent).
LOOP_NAMES = [
    pytest.param("asyncio"),
    pytest.param("uvloop", marks=pytest.mark.skipif(uvloop is None, reason=NO_UVLOOP)),
]


def open_fd_count() -> int:
    """Open fds of this process (the listing's own directory fd excluded)."""
    return len(os.listdir("/proc/self/fd")) - 1


def rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """The ``sendmsg`` ancillary list for ``fds`` (empty list for no fds)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def is_open(fd: int) -> bool:
    """True while ``fd`` is an open file descriptor of this process."""
    try:
        os.fstat(fd)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
        return False
    return True


async def within(aw: Awaitable[T], timeout: float = TIMEOUT) -> T:
    """Await ``aw``, failing with ``TimeoutError`` after ``timeout`` seconds."""
    return await asyncio.wait_for(aw, timeout)


async def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` once per loop iteration (for state only the kernel can change)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(0.001)


@contextlib.contextmanager
def nofile_at_least(n: int) -> Iterator[None]:
    """Raise the soft RLIMIT_NOFILE to ``n`` for a test that holds many fds (skip if the hard
    limit is lower). Many systems default to a soft limit of 1024; a flood of 253-fd messages
    needs a few thousand. Child processes started inside inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= n:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"needs RLIMIT_NOFILE >= {n}; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- fds that identify messages ---------------------------------------------------------------

_inodes: dict[int, int] = {}


def unique_fd() -> int:
    """A new fd (a pipe's read end) with an inode of its own, for :func:`alive` to recognise."""
    r, w = os.pipe()
    os.close(w)
    _inodes[r] = os.fstat(r).st_ino
    return r


def alive(fd: int) -> bool:
    """True while ``fd`` (from :func:`unique_fd`) is still the file it was, not a reused number."""
    try:
        return os.fstat(fd).st_ino == _inodes.get(fd)
    except OSError:
        return False


def tagged_pipe(tag: bytes | str | int) -> int:
    """Return the read end of a pipe holding ``tag`` (write end already closed)."""
    data = str(tag).encode() if not isinstance(tag, bytes) else tag
    r, w = os.pipe()
    try:
        os.write(w, data)
    finally:
        os.close(w)
    return r


def tagged_pipes(tags: Iterable[bytes | str | int]) -> list[int]:
    return [tagged_pipe(tag) for tag in tags]


def read_all(fd: int | OwnedFd) -> bytes:
    """Read ``fd`` to EOF (the write end must be closed)."""
    num = fd if isinstance(fd, int) else fd.fileno()
    chunks = []
    while chunk := os.read(num, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_tags(fds: Iterable[OwnedFd]) -> list[bytes]:
    return [read_all(fd) for fd in fds]


# -- connections ------------------------------------------------------------------------------


async def close_all(*conns: AncillaryConnection) -> None:
    """Close connections and wait until their sockets are closed (abort if a close hangs)."""
    for conn in conns:
        conn.close()
    try:
        await within(asyncio.gather(*(c.wait_closed() for c in conns)), 2.0)
    except TimeoutError:
        for conn in conns:
            conn.abort()
        await within(asyncio.gather(*(c.wait_closed() for c in conns)))
        raise


@contextlib.asynccontextmanager
async def pair(
    sock_type: int = socket.SOCK_STREAM, **kwargs: Any
) -> AsyncIterator[tuple[AncillaryConnection, AncillaryConnection]]:
    """A connected pair of connections, closed (and waited for) on exit."""
    a, b = await connection_pair(sock_type, **kwargs)
    try:
        async with asyncio.timeout(2 * TIMEOUT):  # a hang in the body fails the test
            yield a, b
    finally:
        await close_all(a, b)


@contextlib.asynccontextmanager
async def half_raw(
    sock_type: int = socket.SOCK_STREAM, **kwargs: Any
) -> AsyncIterator[tuple[AncillaryConnection, socket.socket]]:
    """An aioancillary connection whose peer is a plain blocking socket under the test's control."""
    left, right = socket.socketpair(socket.AF_UNIX, sock_type)
    try:
        conn = AncillaryConnection(left, **kwargs)
    except BaseException:
        left.close()
        right.close()
        raise
    try:
        async with asyncio.timeout(2 * TIMEOUT):
            yield conn, right
    finally:
        right.close()
        await close_all(conn)


def fill_until_queued(conn: AncillaryConnection) -> None:
    """Write one big message so that the kernel buffer is full and the rest waits in the queue.

    The peer must not be reading (``peer.transport.pause_reading()``). The byte high-water
    mark is raised so that later sends queue behind it without waiting in ``drain()``.
    """
    conn.transport.set_write_buffer_limits(high=4 * BIG)
    conn.transport.write(b"\0" * BIG)
    assert conn.transport.get_write_buffer_size() > 0, "the kernel took the whole message"


async def drain_big(conn: AncillaryConnection) -> None:
    """Receive the message written by :func:`fill_until_queued`."""
    with await within(conn.recv()) as msg:
        assert len(msg.data) == BIG
        assert msg.fds == ()


# -- protocols --------------------------------------------------------------------------------


class RecordingProtocol(AncillaryProtocol):
    """Records every callback; received messages are kept (owned) until :meth:`close_messages`."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: AncillaryTransport | None = None
        self.messages: list[AncillaryMessage] = []
        self.events: list[str] = []
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.eof = asyncio.Event()
        self.paused = asyncio.Event()
        self.resumed = asyncio.Event()
        self.arrived = asyncio.Event()
        self.keep_open_on_eof: bool | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, AncillaryTransport)
        self.transport = transport
        self.events.append("made")

    def message_received(self, message: AncillaryMessage) -> None:
        self.messages.append(message)
        self.arrived.set()

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        self.eof.set()
        return self.keep_open_on_eof

    def pause_writing(self) -> None:
        self.events.append("pause_writing")
        self.paused.set()

    def resume_writing(self) -> None:
        self.events.append("resume_writing")
        self.resumed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)

    async def wait_messages(self, count: int) -> list[AncillaryMessage]:
        await wait_until(lambda: len(self.messages) >= count)
        return self.messages[:count]

    def close_messages(self) -> None:
        for msg in self.messages:
            msg.close()


@contextlib.asynccontextmanager
async def transport_pair(
    sock_type: int = socket.SOCK_STREAM, **kwargs: Any
) -> AsyncIterator[
    tuple[AncillaryTransport, RecordingProtocol, AncillaryTransport, RecordingProtocol]
]:
    """Two transports with recording protocols over a socketpair; all closed on exit."""
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair(socket.AF_UNIX, sock_type)
    pa, pb = RecordingProtocol(), RecordingProtocol()
    ta = tb = None
    try:
        ta = AncillaryTransport(loop, left, pa, **kwargs)
        tb = AncillaryTransport(loop, right, pb, **kwargs)
        async with asyncio.timeout(2 * TIMEOUT):
            yield ta, pa, tb, pb
    finally:
        for t, p, s in ((ta, pa, left), (tb, pb, right)):
            if t is None:
                s.close()
                continue
            t.abort()
            await within(p.lost)
            p.close_messages()


def fill_queue(address: str) -> int:
    """Queue datagrams at ``address`` until its receive queue is full (max_dgram_qlen).

    Each sender is also bounded by its own send buffer, so fresh senders are used until a
    fresh one cannot queue a single datagram: then the receiver's queue itself is full.
    """
    total = 0
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
            filler.setblocking(False)
            filler.connect(address)
            sent = 0
            while True:
                try:
                    filler.send(b"x")
                except BlockingIOError:
                    break
                sent += 1
        if sent == 0:
            return total
        total += sent
