"""The C send path (``_speedups.Outbox``, ``_speedups.duplicates``) against the pure-Python one.

Each test runs on both paths (``send_path``: ``_accel.use_extension`` switched before the
transports are made) with the same assertions: what the peer receives (fds identified by
their open file), the errors (type, message, cause), what is queued, and the fds left open
(the suite's fd-set check around every test, and explicit checks where a failure must close
copies). The outboxes themselves are compared on random sequences of operations.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import close_all, is_open, within
from helpers.speedups import call_failing, fd_table, require_extension
from hypothesis import given, settings
from hypothesis import strategies as st

from aioancillary import (
    AncillaryConnection,
    ConnectionClosedError,
    InvalidFdError,
    OwnedFd,
    connection_pair,
)
from aioancillary._core._framing import DEFAULT_MAX_FRAME_SIZE, Mode
from aioancillary._core._outbox import Outbox
from aioancillary._kernel import _accel, _syscalls


@contextlib.contextmanager
def selected(path: str) -> Iterator[None]:
    """Transports made inside use the ``path`` ("py" or "c") send path.

    The C half runs even where AIOANCILLARY_NO_EXTENSIONS selected pure Python for the process
    (the extension is built, only not selected): these tests are about the extension itself.
    """
    was = _accel.EXTENSION is not None
    loaded = _accel._LOADED
    if path == "c":
        _accel._LOADED = require_extension()
    try:
        _accel.use_extension(path == "c")
        yield
    finally:
        _accel._LOADED = loaded
        _accel.use_extension(was)


@pytest.fixture(params=["py", "c"])
def send_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Transports made in the test use the pure-Python send path, then the C one."""
    with selected(str(request.param)):
        yield str(request.param)


def duplicates_of(path: str) -> Any:
    return require_extension().duplicates if path == "c" else _syscalls.duplicates


def inode(fd: int) -> tuple[int, int]:
    st_ = os.fstat(fd)
    return st_.st_dev, st_.st_ino


def lowest_free() -> int:
    probe = os.dup(0)
    os.close(probe)
    return probe


def error_fields(exc: BaseException) -> Any:
    cause = exc.__cause__
    return (
        type(exc),
        str(exc),
        getattr(exc, "errno", None),
        type(cause),
        getattr(cause, "errno", None),
    )


# -- duplicates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["py", "c"])
def test_duplicates_are_close_on_exec_copies_of_the_same_files(path: str) -> None:
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    try:
        copies = duplicates_of(path)([fds[0], fds[1], fds[0], fds[2]])
        try:
            assert [inode(c) for c in copies] == [
                inode(f) for f in (fds[0], fds[1], fds[0], fds[2])
            ]
            assert len(set(copies)) == 4
            assert not set(copies) & set(fds)
            assert not any(os.get_inheritable(c) for c in copies)
        finally:
            for c in copies:
                os.close(c)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("bad", ["closed", "collision"])
def test_duplicates_fail_alike_and_close_the_copies_they_made(bad: str) -> None:
    errors = []
    for path in ("py", "c"):
        good = [os.open(os.devnull, os.O_RDONLY) for _ in range(2)]
        try:
            before = fd_table()
            # "collision": the lowest free number is in the list (as if the caller had closed
            # it), so the first copy gets that number: the copy would be sent in its place.
            nums = [good[0], good[1], 999_983] if bad == "closed" else [good[0], lowest_free()]
            with pytest.raises(InvalidFdError) as info:
                duplicates_of(path)(nums)
            assert fd_table() == before  # every copy made was closed
            errors.append(error_fields(info.value))
        finally:
            for fd in good:
                os.close(fd)
    assert errors[0] == errors[1]
    assert errors[0][3] is OSError
    assert errors[0][4] == errno.EBADF


RLIMIT_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, resource, sys
    from aioancillary import connection_pair
    from aioancillary._kernel import _accel, _syscalls
    from aioancillary._kernel import _speedups

    def table():
        return sorted(int(n) for n in os.listdir("/proc/self/fd"))

    def at_limit(free):
        # Fill the table up to a low soft limit, then free `free` slots: dup fails after them.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(table()) + 40, hard))
        filler = []
        while True:
            try:
                filler.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        for _ in range(free):
            os.close(filler.pop())
        return filler, soft, hard

    def fields(exc):
        return [type(exc).__name__, str(exc), exc.errno, type(exc.__cause__).__name__]

    out = {}
    for path, dup in (("py", _syscalls.duplicates), ("c", _speedups.duplicates)):
        fd = os.open(os.devnull, os.O_RDONLY)
        filler, soft, hard = at_limit(2)
        before = table()
        try:
            dup([fd, fd, fd])
            got = None
        except OSError as exc:
            got = fields(exc)
        leaked = len(table()) - len(before)
        for f in filler:
            os.close(f)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(fd)
        out["duplicates-" + path] = [got, leaked]

    async def burst(path):
        _accel.use_extension(path == "c")
        a, b = await connection_pair()
        fd = os.open(os.devnull, os.O_RDONLY)
        fd2 = os.open(os.devnull, os.O_RDONLY)
        a.transport.write_fds(b"first", [fd, fd])  # out at once: a burst begins
        filler, soft, hard = at_limit(1)
        before = table()
        try:
            a.transport.write_fds(b"second", [fd, fd2])  # queued: needs two copies
            got = None
        except OSError as exc:
            got = fields(exc)
        leaked = len(table()) - len(before)
        queued = [a.transport.get_write_buffer_size(), a.transport.get_write_buffer_fds()]
        for f in filler:
            os.close(f)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        a.transport.write_fds(b"third", [fd])  # still usable
        msgs = [await b.recv() for _ in range(2)]
        got_msgs = [[m.data.decode(), m.fd_count] for m in msgs]
        for m in msgs:
            m.close()
        os.close(fd)
        os.close(fd2)
        a.close()
        b.close()
        await a.wait_closed()
        await b.wait_closed()
        return [got, leaked, queued, got_msgs]

    for path in ("py", "c"):
        out["burst-" + path] = asyncio.run(burst(path))

    # A message with a repeated fd taken back when no copy can be made for the repeat: it is
    # not handed back (its one copy is dropped, to be closed), and nothing leaks.
    import socket
    from aioancillary._core._framing import Mode
    left, right = socket.socketpair()
    fd = os.open(os.devnull, os.O_RDONLY)
    outbox = _speedups.Outbox(Mode.FRAMED, 253)
    outbox.sent_directly()
    outbox.write(left.fileno(), b"one", [fd])
    outbox.write(left.fileno(), b"rep", [fd, fd])
    import fcntl

    def count_open():  # without opening anything: at the limit, listdir cannot
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        count = 0
        for n in range(limit):
            try:
                fcntl.fcntl(n, fcntl.F_GETFD)
            except OSError:
                continue
            count += 1
        return count

    filler, soft, hard = at_limit(0)
    before = count_open()
    unsent = outbox.take_unsent()
    dropped = outbox.drop()
    made = count_open() - before
    for f in [f for _d, fds in unsent for f in fds] + dropped:
        os.close(f)
    for f in filler:
        os.close(f)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    out["take-back"] = [[[d.decode(), len(fds)] for d, fds in unsent], len(dropped), made]
    os.close(fd)
    left.close()
    right.close()
    json.dump(out, sys.stdout)
    """
)


def test_at_rlimit_nofile_both_paths_raise_the_same_and_queue_nothing() -> None:
    require_extension()
    env = {k: v for k, v in os.environ.items() if k != "AIOANCILLARY_NO_EXTENSIONS"}
    result = subprocess.run(
        [sys.executable, "-c", RLIMIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["duplicates-c"] == out["duplicates-py"]
    got, leaked = out["duplicates-c"]
    assert got[0] == "OSError"
    assert got[2] == errno.EMFILE
    assert "RLIMIT_NOFILE" in got[1]
    assert leaked == 0  # the two copies made before the failure were closed
    assert out["burst-c"] == out["burst-py"]
    got, leaked, queued, msgs = out["burst-c"]
    assert got[0] == "OSError"
    assert got[2] == errno.EMFILE
    assert leaked == 0
    assert queued == [0, 0]  # nothing of the refused message was queued
    assert msgs == [["first", 2], ["third", 1]]
    # "one" and "rep" share a batch: the copy for the repeat fails, so neither comes back;
    # their two copies are dropped (to be closed), none made.
    assert out["take-back"] == [[], 2, 0]


# -- the transport's send path on both implementations ------------------------------------------


async def _recv_inodes(conn: AncillaryConnection, count: int) -> list[tuple[bytes, list[Any]]]:
    out = []
    for _ in range(count):
        with await within(conn.recv()) as msg:
            out.append((msg.data, [inode(fd.fileno()) for fd in msg.fds]))
    return out


async def test_direct_send_carries_the_callers_fds_and_keeps_no_copy(send_path: str) -> None:
    a, b = await connection_pair()
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        before = fd_table()
        a.transport.write_fds(b"one", [fd, fd, fd, fd])
        assert a.transport.get_write_buffer_fds() == 0  # sent at once, nothing duplicated
        assert fd_table() == before
        os.close(fd)
        got = await _recv_inodes(b, 1)
        assert got[0][0] == b"one"
        assert len(got[0][1]) == 4
    finally:
        await close_all(a, b)


async def test_a_burst_queues_copies_the_caller_may_close_at_once(send_path: str) -> None:
    a, b = await connection_pair()
    try:
        files = [os.open(p, os.O_RDONLY) for p in (os.devnull, "/proc/self/exe", __file__)]
        expected = []
        for i in range(300):  # more fds than one sendmsg takes: several batches
            nums = [files[i % 3], files[(i + 1) % 3]]
            a.transport.write_fds(b"m%d" % i, nums)
            expected.append((b"m%d" % i, [inode(n) for n in nums]))
        # All but the first are queued, each with copies of its own.
        assert a.transport.get_write_buffer_fds() == 2 * 299
        for fd in files:
            os.close(fd)  # the caller's: the queue holds copies
        assert await _recv_inodes(b, 300) == expected
        assert a.transport.get_write_buffer_fds() == 0
    finally:
        await close_all(a, b)


@pytest.mark.parametrize("bad", ["closed", "collision"])
async def test_a_bad_fd_in_a_burst_is_refused_and_nothing_is_queued(
    send_path: str, bad: str
) -> None:
    a, b = await connection_pair()
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        a.transport.write_fds(b"first", [fd])  # out at once: a burst begins
        size = a.transport.get_write_buffer_size()
        before = fd_table()
        nums = [fd, 999_983] if bad == "closed" else [fd, lowest_free()]
        with pytest.raises(InvalidFdError, match="not open") as info:
            a.transport.write_fds(b"second", nums)
        assert type(info.value.__cause__) is OSError
        assert fd_table() == before
        assert a.transport.get_write_buffer_size() == size
        assert a.transport.get_write_buffer_fds() == 0
        a.transport.write_fds(b"third", [fd])
        os.close(fd)
        got = await _recv_inodes(b, 2)
        assert [data for data, _fds in got] == [b"first", b"third"]
    finally:
        await close_all(a, b)


async def test_partial_writes_with_a_small_send_buffer_lose_and_repeat_nothing(
    send_path: str,
) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a = AncillaryConnection(left)
    b = AncillaryConnection(right)
    try:
        b.transport.pause_reading()
        files = [os.open(p, os.O_RDONLY) for p in (os.devnull, "/proc/self/exe")]
        expected = []
        for i in range(60):
            payload = bytes([i]) * (1000 + 37 * i)  # odd sizes: writes end mid-frame
            nums = [files[i % 2]] if i % 3 else []
            a.transport.write_fds(payload, nums)
            expected.append((payload, [inode(n) for n in nums]))
            if i % 7 == 0:
                await asyncio.sleep(0)  # the flush runs: partial writes, EAGAIN
        assert a.transport.get_write_buffer_size() > 0, "the kernel took it all"
        for fd in files:
            os.close(fd)
        b.transport.resume_reading()
        assert await _recv_inodes(b, 60) == expected
    finally:
        await close_all(a, b)


async def test_eagain_on_the_direct_path_queues_the_message_whole(send_path: str) -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a = AncillaryConnection(left)
    b = AncillaryConnection(right)
    try:
        b.transport.pause_reading()
        # Fill the socket past the transport (its queue stays empty: the direct path runs).
        with contextlib.suppress(BlockingIOError):
            while True:
                left.send(b"\0" * 4096)
        assert a.transport.get_write_buffer_size() == 0
        fd = os.open(os.devnull, os.O_RDONLY)
        sent_file = inode(fd)
        a.transport.write_fds(b"late", [fd, fd])  # EAGAIN: queued with copies
        assert a.transport.get_write_buffer_fds() == 2
        assert a.transport.get_write_buffer_size() == 8 + 4
        os.close(fd)
        # Read the filler off the peer's socket by hand, then let the transport read on.
        with contextlib.suppress(BlockingIOError):
            while True:
                right.recv(1 << 16, socket.MSG_DONTWAIT)
        # The filler was never framed: only "late" must be parsed, so read it raw.
        data, anc, _flags, _addr = await within(_recvmsg(right))
        fds = [int.from_bytes(rec[2][i : i + 4], sys.byteorder) for rec in anc for i in (0, 4)]
        try:
            assert data == bytes([1, 0, 0, 2, 0, 0, 0, 4]) + b"late"
            assert [inode(f) for f in fds] == [sent_file, sent_file]
        finally:
            for f in fds:
                os.close(f)
        assert a.transport.get_write_buffer_fds() == 0
    finally:
        await close_all(a, b)


async def _recvmsg(sock: socket.socket) -> tuple[bytes, list[Any], int, Any]:
    while True:
        try:
            return sock.recvmsg(64, socket.CMSG_SPACE(64), socket.MSG_DONTWAIT)
        except BlockingIOError:
            await asyncio.sleep(0.001)


def _write_until_refused(conn: AncillaryConnection, fd: int) -> None:
    for _ in range(3):  # the first write may land before the reset is seen
        conn.transport.write_fds(b"x", [fd])
        conn.transport.end_burst()


async def test_a_peer_gone_fails_the_direct_send_alike(send_path: str) -> None:
    a, b = await connection_pair()
    try:
        b.transport.abort()
        await b.wait_closed()
        fd = os.open(os.devnull, os.O_RDONLY)
        try:
            before = fd_table()
            with pytest.raises(ConnectionClosedError):
                _write_until_refused(a, fd)
            assert fd_table() <= before  # no copy left behind
        finally:
            os.close(fd)
    finally:
        await close_all(a)


# -- the outboxes themselves --------------------------------------------------------------------

# Fake fd numbers: far above any open fd (the C outbox closes what it still holds when freed).
FAKE = 900_000

ops = st.lists(
    st.one_of(
        st.tuples(st.just("queue"), st.binary(max_size=20), st.integers(0, 4)),
        st.tuples(st.just("rest"), st.binary(min_size=1, max_size=9), st.just(0)),
        st.tuples(st.just("send"), st.just(b""), st.integers(1, 60)),
        st.tuples(st.just("direct"), st.just(b""), st.just(0)),
        st.tuples(st.just("end"), st.just(b""), st.just(0)),
        st.tuples(st.just("discard"), st.just(b""), st.just(0)),
        st.tuples(st.just("unsent"), st.just(b""), st.just(0)),
        st.tuples(st.just("group"), st.just(b""), st.integers(0, 4)),
    ),
    max_size=40,
)


def run_ops(outbox: Any, mode: Mode, steps: list[tuple[str, bytes, int]]) -> list[Any]:
    trace: list[Any] = []
    next_fd = FAKE
    for op, data, n in steps:
        if op == "queue":
            fds = list(range(next_fd, next_fd + n))
            next_fd += n
            trace.append(outbox.queue(data, fds))
        elif op == "rest":
            outbox.queue_rest(data)
        elif op == "send" and outbox:
            view, fds = outbox.pending()
            offered = bytes(view)
            view.release()
            sent = len(offered) if mode is Mode.DATAGRAM else min(n, len(offered))
            trace.append((offered, list(fds), outbox.advance(sent)))
        elif op == "direct":
            outbox.sent_directly()
        elif op == "end":
            outbox.end_burst()
        elif op == "discard" and outbox:
            trace.append(outbox.discard_first())
        elif op == "unsent":
            trace.append(outbox.take_unsent())
        elif op == "group":
            messages = [(b"m", list(range(k))) for k in (n, 1, 0, 3, 2)]
            trace.append((outbox.group_size(messages, 0), outbox.group_size(messages, 2)))
            trace.append(outbox.frame(b"abc", n))
        trace.append((bool(outbox), outbox.nbytes, outbox.nfds, outbox.direct))
        trace.append(outbox.sendable_now())
    trace.append(outbox.take_unsent())
    trace.append(outbox.drop())
    trace.append((bool(outbox), outbox.nbytes, outbox.nfds, outbox.direct))
    return trace


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    steps=ops,
    cap=st.integers(1, 8),
    mode=st.sampled_from([Mode.FRAMED, Mode.RAW, Mode.DATAGRAM]),
)
def test_the_c_outbox_does_what_the_python_one_does(
    steps: list[tuple[str, bytes, int]], cap: int, mode: Mode
) -> None:
    speedups = require_extension()
    if mode is Mode.RAW:
        steps = [(op, data or b"x", n) if op == "queue" else (op, data, n) for op, data, n in steps]
    expected = run_ops(Outbox(mode, cap), mode, steps)
    got = run_ops(speedups.Outbox(mode, cap), mode, steps)
    assert got == expected


def test_the_c_outbox_closes_what_it_still_owns_when_freed() -> None:
    speedups = require_extension()
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    outbox = speedups.Outbox(Mode.FRAMED, 253)
    outbox.queue(b"a", fds[:2])
    outbox.queue(b"b", fds[2:])
    del outbox
    assert not any(is_open(fd) for fd in fds)


def test_the_c_write_leaks_no_copy_on_memory_error_anywhere() -> None:
    speedups = require_extension()
    fd = os.open(os.devnull, os.O_RDONLY)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        left.setblocking(False)
        for count in range(0, 30):
            outbox = speedups.Outbox(Mode.FRAMED, 253)
            outbox.sent_directly()  # a burst: write() duplicates and queues
            before = fd_table()
            with contextlib.suppress(MemoryError):
                call_failing(count, outbox.write, left.fileno(), b"payload" * 50, [fd, fd, fd])
            # Either queued (one copy, sent three times, is the outbox's) or nothing was kept.
            assert outbox.nfds in (0, 3)
            assert len(fd_table() - before) == (1 if outbox.nfds else 0)
            close_copies = outbox.drop()
            for copy in close_copies:
                os.close(copy)
            assert fd_table() == before
    finally:
        os.close(fd)
        left.close()
        right.close()


def _inputs(fd: int) -> list[tuple[Any, Any]]:
    """(data, fds) pairs the C path's try_write leaves to the full checks, good and bad."""
    return [
        (bytearray(b"ba"), [fd]),
        (memoryview(b"mv"), (fd,)),
        (array.array("H", [1, 2]), [fd]),
        (b"gen", (f for f in [fd, fd])),
        (b"obj", [OwnedFd.dup_of(fd)]),
        (b"", [fd]),
        (b"", []),
        (b"big", [fd] * 254),
        (b"x" * (DEFAULT_MAX_FRAME_SIZE + 1), []),
        ("text", [fd]),
        (b"neg", [-1]),
        (b"bool", [True]),
        (b"none", None),
        (b"huge", [2**40]),
        (b"closed", [999_983]),
    ]


async def _outcomes(path: str) -> tuple[list[str], list[tuple[bytes, int]]]:
    with selected(path):
        a, b = await connection_pair()
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        outcomes = []
        for data, fds in _inputs(fd):
            try:
                a.transport.write_fds(data, fds)
                a.transport.end_burst()
                outcomes.append("sent")
            except Exception as exc:  # the outcome is what is compared
                outcomes.append(f"{type(exc).__name__}: {exc}")
            finally:
                for item in fds if isinstance(fds, list) else ():
                    if isinstance(item, OwnedFd):
                        item.close()
        got: list[tuple[bytes, int]] = []
        while len(got) < outcomes.count("sent"):
            with await within(b.recv()) as msg:
                got.append((bytes(msg.data), msg.fd_count))
        return outcomes, got
    finally:
        os.close(fd)
        await close_all(a, b)


async def test_inputs_the_c_path_declines_meet_the_same_checks() -> None:
    require_extension()
    py = await _outcomes("py")
    c = await _outcomes("c")
    assert c == py
    outcomes, got = c
    assert outcomes[:7] == ["sent"] * 7
    assert [o.split(":")[0] for o in outcomes[7:]] == [
        "TooManyFdsError",
        "MessageTooLargeError",
        "TypeError",
        "InvalidFdError",
        "TypeError",
        "sent",  # fds=None: no fds (the checks take a falsy fds as none)
        "InvalidFdError",
        "InvalidFdError",
    ]
    assert got == [
        (b"ba", 1),
        (b"mv", 1),
        (array.array("H", [1, 2]).tobytes(), 1),
        (b"gen", 2),
        (b"obj", 1),
        (b"", 1),
        (b"", 0),
        (b"none", 0),
    ]


async def test_a_repeated_fd_is_copied_once_by_the_c_path(send_path: str) -> None:
    a, b = await connection_pair()
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
        a.transport.write_fds(b"first", [])  # out at once: a burst begins
        before = fd_table()
        a.transport.write_fds(b"four", [fd, fd, fd, fd])
        # Queued: four fds to send either way; the C path holds one copy, Python four.
        assert a.transport.get_write_buffer_fds() == 4
        assert len(fd_table() - before) == (1 if send_path == "c" else 4)
        os.close(fd)
        got = await _recv_inodes(b, 2)
        assert got[1][0] == b"four"
        assert len(got[1][1]) == 4
        assert len(set(got[1][1])) == 1  # one file, four fds
        assert fd_table() == before - {fd}  # the copy was closed once sent
    finally:
        await close_all(a, b)


def test_messages_taken_back_own_each_of_their_fds() -> None:
    speedups = require_extension()
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        outbox = speedups.Outbox(Mode.FRAMED, 253)
        outbox.sent_directly()  # a burst: write() queues
        assert outbox.write(left.fileno(), b"m", [fd, fd, fd]) == 1
        assert outbox.write(left.fileno(), b"n", [fd]) == 1
        before = fd_table()
        unsent = outbox.take_unsent()
        assert [data for data, _fds in unsent] == [b"m", b"n"]
        fds = [f for _data, nums in unsent for f in nums]
        assert len(set(fds)) == 4  # the repeats got copies of their own
        assert all(inode(f) == inode(fd) for f in fds)
        assert len(fd_table() - before) == 2
        assert outbox.drop() == []
        for f in fds:
            os.close(f)
    finally:
        os.close(fd)
        left.close()
        right.close()
