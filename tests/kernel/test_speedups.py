"""The C extension against the pure-Python receive path, on the same inputs.

Each case runs both implementations on equal inputs (the same control records with parallel
real fds, or the same messages over two socketpairs) and checks the same results: the same
reads (fds identified by their open file), the same ``how``, the same error (type, message,
``data``, ``closed_fds``, errno) and the same fds closed. Simulated platforms (macOS: no
MSG_CMSG_CLOEXEC, the control buffer sized per read; FreeBSD) go through both.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import is_open
from helpers.speedups import call_failing, fd_table, receivers, require_extension
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioancillary import (
    SCM_MAX_FD,
    CloexecError,
    DataTruncatedError,
    FdTruncatedError,
    Platform,
    current_platform,
)
from aioancillary._kernel import _syscalls
from aioancillary._kernel._syscalls import (
    AGAIN,
    END,
    EOF_NEVER,
    EOF_NO_CREDENTIALS,
    EOF_ON_EMPTY,
    EOF_PEEK,
    FAILED,
    LIMIT,
)

CLOEXEC = socket.MSG_CMSG_CLOEXEC
LINUX = current_platform()
DARWIN = Platform("darwin", None, 0)
FREEBSD = Platform("freebsd", SCM_MAX_FD, CLOEXEC)
PLATFORMS = [LINUX, DARWIN, FREEBSD]
SOL, RIGHTS, CREDS, PIDFD = socket.SOL_SOCKET, socket.SCM_RIGHTS, 0x02, 0x04
NOT_OPEN = 999_983  # a number no test opens: fcntl fails with EBADF on it
RECEIVERS = list(receivers())


def error_fields(exc: BaseException | None) -> Any:
    if exc is None:
        return None
    return (
        type(exc),
        str(exc),
        getattr(exc, "data", None),
        getattr(exc, "closed_fds", None),
        getattr(exc, "errno", None),
        type(exc.__cause__),
    )


# -- the control-message rules: parse_control against _fds_of --------------------------------

# A slot of an SCM_RIGHTS / SCM_PIDFD payload: an open fd, a number that is not open, or a
# negative number (no kernel sends one; the parser must not close it).
slots = st.lists(st.sampled_from(["open", "open", "not-open", "negative"]), max_size=4)
records = st.lists(
    st.one_of(
        st.tuples(st.just("rights"), slots, st.integers(0, 3)),
        st.tuples(st.just("pidfd"), slots, st.integers(0, 3)),
        st.tuples(st.just("creds"), st.sampled_from([12, 8]), st.just(0)),
        st.tuples(st.sampled_from(["sol-other", "other-level"]), st.integers(0, 9), st.just(0)),
    ),
    max_size=4,
)


class Side:
    """One implementation's copy of the input: its own fds, in the same slots."""

    def __init__(self) -> None:
        self.opened: list[int] = []

    def fd(self, slot: str) -> int:
        if slot == "open":
            fd = os.open(os.devnull, os.O_RDONLY)
            os.set_inheritable(fd, True)  # the fcntl path must set FD_CLOEXEC again
            self.opened.append(fd)
            return fd
        return NOT_OPEN if slot == "not-open" else -3

    def payload(self, kind: str, arg: Any, tail: int) -> tuple[int, int, bytes]:
        if kind in ("rights", "pidfd"):
            data = struct.pack(f"{len(arg)}i", *(self.fd(s) for s in arg)) + b"\xff" * tail
            return (SOL, RIGHTS if kind == "rights" else PIDFD, data)
        if kind == "creds":
            return (SOL, CREDS, struct.pack("iII", 7, 8, 9)[:arg])
        level = SOL if kind == "sol-other" else 0
        return (level, 0x1D, bytes(range(arg)))

    def close(self) -> None:
        for fd in self.opened:
            with contextlib.suppress(OSError):
                os.close(fd)


def encode(ancdata: list[tuple[int, int, bytes]]) -> bytes:
    """A control buffer as a kernel fills it: each record CMSG_SPACE-aligned."""
    out = b""
    for level, kind, data in ancdata:
        header = struct.pack("Lii", socket.CMSG_LEN(len(data)), level, kind)
        out += (header + data).ljust(socket.CMSG_SPACE(len(data)), b"\0")
    return out


def name_of(fd: int, side: Side) -> object:
    return ("slot", side.opened.index(fd)) if fd in side.opened else fd


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recs=records,
    msg_flags=st.sampled_from([0, socket.MSG_CTRUNC, socket.MSG_TRUNC, 0x7FFFFFFF]),
    recv_flags=st.sampled_from([0, CLOEXEC]),
    platform=st.sampled_from(PLATFORMS),
    cut=st.integers(0, 3),
)
def test_parse_control_matches_the_python_rules(
    recs: list[tuple[str, Any, int]], msg_flags: int, recv_flags: int, platform: Platform, cut: int
) -> None:
    speedups = require_extension()
    py, c = Side(), Side()
    try:
        anc_py = [py.payload(*r) for r in recs]
        anc_c = [c.payload(*r) for r in recs]
        raw = encode(anc_c)
        if cut and len(recs) == 1 and len(anc_c[0][2]) >= cut:
            # macOS leaves cmsg_len untruncated when the buffer cuts a record: the record
            # keeps the bytes that are there (socket.recvmsg does the same).
            level, kind, data = anc_py[0]
            anc_py = [(level, kind, data[: len(data) - cut])]
            raw = raw[: socket.CMSG_LEN(len(data)) - cut]
        buffer = memoryview(bytearray(b"0123456789abcdef"))
        try:
            got_py: Any = _syscalls._fds_of(
                anc_py, msg_flags, recv_flags, platform, buffer=buffer, nbytes=5
            )
            err_py = None
        except (FdTruncatedError, DataTruncatedError, CloexecError) as exc:
            got_py, err_py = None, exc
        try:
            got_c: Any = speedups.parse_control(
                raw, msg_flags, recv_flags, platform, data=bytes(buffer[:5]), buffer_len=16
            )
            err_c = None
        except (FdTruncatedError, DataTruncatedError, CloexecError) as exc:
            got_c, err_c = None, exc
        assert error_fields(err_c) == error_fields(err_py)
        if got_py is not None:
            assert [name_of(fd, c) for fd in got_c] == [name_of(fd, py) for fd in got_py]
        assert [is_open(fd) for fd in c.opened] == [is_open(fd) for fd in py.opened]
        for fd_c, fd_py in zip(c.opened, py.opened, strict=True):
            if is_open(fd_py):
                assert os.get_inheritable(fd_c) == os.get_inheritable(fd_py)
    finally:
        py.close()
        c.close()


def test_parse_control_closes_a_pidfd_and_keeps_the_rights() -> None:
    speedups = require_extension()
    side = Side()
    fds = [side.fd("open") for _ in range(3)]
    raw = encode(
        [(SOL, RIGHTS, struct.pack("2i", *fds[:2])), (SOL, PIDFD, struct.pack("i", fds[2]))]
    )
    try:
        assert speedups.parse_control(raw, 0, CLOEXEC, LINUX) == fds[:2]
        assert not is_open(fds[2])
    finally:
        side.close()


# -- Receiver: the same messages over two socketpairs ---------------------------------------


def inode(fd: int) -> tuple[int, int]:
    st_ = os.fstat(fd)
    return (st_.st_dev, st_.st_ino)


def normalise(result: tuple[list[tuple[bytes, list[int] | None]], int, Any]) -> Any:
    reads, how, error = result
    out = []
    for data, fds in reads:
        out.append((data, [inode(fd) for fd in fds] if fds is not None else None))
        for fd in fds or ():
            os.close(fd)
    return out, how, error_fields(error)


@contextlib.contextmanager
def socketpair(kind: int, passcred: bool = False) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    with a, b:
        b.setblocking(False)
        if passcred:
            b.setsockopt(SOL, socket.SO_PASSCRED, 1)
        yield a, b


Send = list[tuple[bytes, int]]  # (data, how many fds: read ends of pipes made per send)


def run_case(
    receiver_cls: Any,
    kind: int,
    sends: Send,
    *,
    eof: int,
    limit: int = 32,
    max_fds: int = 1 << 20,
    close_sender: bool = False,
    bufsize: int = 4096,
    platform: Platform = LINUX,
    passcred: bool = False,
    shared: list[int],
) -> Any:
    with socketpair(kind, passcred) as (a, b):
        for data, nfds in sends:
            a.sendmsg(
                [data], [(SOL, RIGHTS, struct.pack(f"{nfds}i", *shared[:nfds]))] if nfds else []
            )
        if close_sender:
            a.close()
        buffer = memoryview(bytearray(bufsize))
        receiver = receiver_cls(b, buffer, platform, eof)
        return normalise(receiver.read(limit, max_fds))


CASES: dict[str, dict[str, Any]] = {
    "stream to EOF": dict(
        kind=socket.SOCK_STREAM,
        sends=[(b"a", 0), (b"bb", 1), (b"ccc", 3), (b"d", 0)],
        eof=EOF_ON_EMPTY,
        close_sender=True,
    ),
    "stream until EAGAIN": dict(
        kind=socket.SOCK_STREAM, sends=[(b"a", 2), (b"b", 1)], eof=EOF_ON_EMPTY
    ),
    "stream read limit": dict(
        kind=socket.SOCK_STREAM, sends=[(b"x", 1)] * 5, eof=EOF_ON_EMPTY, limit=2
    ),
    "fd bound": dict(kind=socket.SOCK_STREAM, sends=[(b"x", 1)] * 5, eof=EOF_ON_EMPTY, max_fds=2),
    "seqpacket with credentials": dict(
        kind=socket.SOCK_SEQPACKET,
        sends=[(b"", 0), (b"m", 1), (b"", 2)],
        eof=EOF_NO_CREDENTIALS,
        passcred=True,
        close_sender=True,
    ),
    "seqpacket peek": dict(
        kind=socket.SOCK_SEQPACKET,
        sends=[(b"", 0), (b"m", 1)],
        eof=EOF_PEEK,
        close_sender=True,
    ),
    "seqpacket peek, not at the end": dict(
        kind=socket.SOCK_SEQPACKET, sends=[(b"", 0), (b"m", 1)], eof=EOF_PEEK
    ),
    "dgram empty messages": dict(kind=socket.SOCK_DGRAM, sends=[(b"", 0), (b"", 1)], eof=EOF_NEVER),
    "seqpacket MSG_TRUNC": dict(
        kind=socket.SOCK_SEQPACKET,
        sends=[(b"ok", 1), (b"x" * 20, 2), (b"later", 0)],
        eof=EOF_PEEK,
        bufsize=8,
    ),
    "macOS rules (fcntl, buffer per read)": dict(
        kind=socket.SOCK_STREAM,
        sends=[(b"a", 1), (b"b", 3)],
        eof=EOF_ON_EMPTY,
        platform=DARWIN,
        close_sender=True,
    ),
    "FreeBSD rules": dict(
        kind=socket.SOCK_SEQPACKET, sends=[(b"a", 1), (b"", 0)], eof=EOF_PEEK, platform=FREEBSD
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_receiver_matches_the_python_receiver(case: dict[str, Any]) -> None:
    (c_receiver,) = (p.values[0] for p in RECEIVERS if p.id == "c")
    require_extension()
    shared = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    try:
        expected = run_case(_syscalls.Receiver, shared=shared, **case)
        got = run_case(c_receiver, shared=shared, **case)
    finally:
        for fd in shared:
            os.close(fd)
    assert got == expected
    assert expected[1] in (AGAIN, LIMIT, END, FAILED)


@pytest.mark.parametrize("receiver_cls", RECEIVERS)
def test_receiver_on_a_closed_socket_fails_with_ebadf(receiver_cls: Any) -> None:
    a, b = socket.socketpair()
    with a:
        receiver = receiver_cls(b, memoryview(bytearray(16)), LINUX, EOF_ON_EMPTY)
        b.close()
        reads, how, error = receiver.read(4, 100)
    assert (reads, how) == ([], FAILED)
    assert isinstance(error, OSError)
    assert str(error) == "[Errno 9] Bad file descriptor"


# MSG_CTRUNC for real: a receiver at its RLIMIT_NOFILE (in a child: the limit is per process).
EMFILE_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, socket, struct, sys
    from aioancillary._kernel import _syscalls, _speedups
    from aioancillary import current_platform
    out = {}
    for name, cls in (("py", _syscalls.Receiver), ("c", _speedups.Receiver)):
        a, b = socket.socketpair()
        b.setblocking(False)
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(4)]
        a.sendmsg([b"before"], [])
        a.sendmsg([b"four"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("4i", *fds))])
        for fd in fds:
            os.close(fd)
        count = len(os.listdir("/proc/self/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (count + 1, hard))
        reads, how, error = cls(b, memoryview(bytearray(64)), current_platform(), 1).read(8, 100)
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
        out[name] = [
            [[d.decode(), f] for d, f in reads], how, type(error).__name__, str(error),
            error.data.decode(), error.closed_fds, len(os.listdir("/proc/self/fd")) - count,
        ]
        a.close(); b.close()
    print(json.dumps(out))
    """
)


def test_receiver_at_rlimit_nofile_closes_what_arrived_like_python() -> None:
    require_extension()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip("the child raises its limit back to 4096")
    result = subprocess.run(
        [sys.executable, "-c", EMFILE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = json.loads(result.stdout)
    assert out["c"] == out["py"]
    reads, how, kind, _message, data, closed, leaked = out["c"]
    # One stream read takes the fd-less bytes before the fds too (unix_stream_read_generic).
    assert (reads, how, kind, data, leaked) == ([], FAILED, "FdTruncatedError", "beforefour", 0)
    assert closed >= 0  # how many of the 4 the kernel installed before it ran out


# -- MemoryError at every allocation: nothing leaks, nothing is closed twice -------------------


def owned_fds(result: Any) -> list[int]:
    reads = result[0]
    return [fd for _data, fds in reads for fd in fds or ()]


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET])
def test_receiver_memory_error_anywhere_leaks_no_fd(kind: int) -> None:
    speedups = require_extension()
    eof = EOF_ON_EMPTY if kind == socket.SOCK_STREAM else EOF_PEEK
    for count in range(0, 40):
        with socketpair(kind) as (a, b):
            fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
            for n in (1, 2, 3, 0):
                a.sendmsg([b"m"], [(SOL, RIGHTS, struct.pack(f"{n}i", *fds[:n]))] if n else [])
            for fd in fds:
                os.close(fd)
            receiver = speedups.Receiver(b, memoryview(bytearray(64)), LINUX, eof)
            before = fd_table()
            result: Any = None
            with contextlib.suppress(MemoryError):
                result = call_failing(count, receiver.read, 32, 1000)
            got = owned_fds(result) if result is not None else []
            # Every fd the kernel installed is either handed over or closed.
            assert fd_table() - before == set(got)
            for fd in got:
                os.close(fd)


def test_frame_decoder_memory_error_anywhere_leaks_no_fd() -> None:
    speedups = require_extension()
    frames = (
        b"".join(struct.pack(">HHI", 0x100, n, 3) + b"abc" for n in (1, 0, 2, 1))
        + struct.pack(">HHI", 0x100, 1, 10)
        + b"par"
    )
    for count in range(0, 60):
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(5)]
        before = fd_table() - set(fds)
        decoder = speedups.FrameDecoder()
        reads = [(frames[:13], fds[:2]), (frames[13:], fds[2:])]
        messages: list[Any] = []
        with contextlib.suppress(MemoryError):
            messages = call_failing(count, decoder.feed_reads, reads)
        held = [fd for m in messages for fd in (m._raw or ())]
        assert fd_table() - before == set(held) | (set(fds[4:]) if decoder.pending_fds else set())
        for m in messages:
            m.close()
        decoder.close()
        assert fd_table() == before


def test_messages_of_memory_error_anywhere_leaks_no_fd() -> None:
    speedups = require_extension()
    for count in range(0, 20):
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(4)]
        before = fd_table() - set(fds)
        reads: list[tuple[bytes, list[int] | None]] = [
            (b"a", fds[:1]),
            (b"b", None),
            (b"c", fds[1:]),
        ]
        messages: list[Any] = []
        try:
            messages = call_failing(count, speedups.messages_of, reads)
        except MemoryError:
            assert fd_table() == before  # all closed: the reads were owned from the call on
            continue
        for m in messages:
            m.close()
        assert fd_table() == before
