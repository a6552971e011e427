"""send_fds / recv_fds / recv_fds_into on real socketpairs, and across a fork."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator

import pytest
from helpers import FORKS_THE_TEST_PROCESS

from aioancillary import (
    SCM_MAX_FD,
    Credentials,
    DataTruncatedError,
    InvalidFdError,
    OwnedFd,
    ReceivedInto,
    SocketAncillary,
    TooManyFdsError,
    recv_fds,
    recv_fds_into,
    send_fds,
)

KINDS = [socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM]
KIND_IDS = ["stream", "seqpacket", "dgram"]
MESSAGE_KINDS = [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM]
CLOEXEC = socket.MSG_CMSG_CLOEXEC


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1


def memfds(n: int) -> list[int]:
    """``n`` fds, each a distinct open file (distinct st_ino)."""
    return [os.memfd_create(f"aioancillary-test-{i}") for i in range(n)]


def same_file(a: int, b: int) -> bool:
    return os.path.samestat(os.fstat(a), os.fstat(b))


def close_quietly(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def nothing_queued(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except BlockingIOError:
        return True
    return False


@pytest.fixture(params=KINDS, ids=KIND_IDS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, request.param)
    with a, b:
        yield a, b


@pytest.fixture(params=MESSAGE_KINDS, ids=KIND_IDS[1:])
def msg_pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, request.param)
    with a, b:
        yield a, b


@pytest.fixture
def stream_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


# -- round trips --------------------------------------------------------------------------


def test_round_trip_same_open_file(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        assert send_fds(a, b"hello", [w]) == 5
        os.close(w)  # the kernel holds its own reference: the fd still arrives
        with recv_fds(b, 64, 1) as msg:
            assert msg.data == b"hello"
            assert msg.discarded_fds == 0
            fd = msg.take_fd()
        with fd:
            assert isinstance(fd, OwnedFd)
            assert not os.get_inheritable(fd.fileno())
            os.write(fd.fileno(), b"written through the passed fd")
        assert os.read(r, 100) == b"written through the passed fd"
        assert os.read(r, 100) == b""  # that was the only write end left: it is closed
    finally:
        close_quietly([r, w])


def test_round_trip_keeps_order(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    sent = memfds(5)
    try:
        with contextlib.ExitStack() as stack:
            sock_file = stack.enter_context(socket.socket(socket.AF_UNIX))
            owned = stack.enter_context(OwnedFd(os.dup(sent[0])))
            send_fds(a, b"mix", [*sent, sock_file, owned])
            with recv_fds(b, 64, 10) as msg:
                got = [fd.fileno() for fd in msg.fds]
                assert len(got) == 7
                assert all(same_file(x, y) for x, y in zip(got, sent, strict=False))
                assert not any(same_file(x, y) for x, y in zip(got[1:], sent, strict=False))
                assert same_file(got[5], sock_file.fileno())
                assert same_file(got[6], sent[0])
                assert not any(os.get_inheritable(fd) for fd in got)
    finally:
        close_quietly(sent)


def test_send_without_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    assert send_fds(a, b"plain", []) == 5
    with recv_fds(b, 64, 4) as msg:
        assert msg.data == b"plain"
        assert msg.fds == ()


def test_253_fds_in_one_message(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    sent = memfds(SCM_MAX_FD)
    try:
        send_fds(a, b"many", sent)
        close_quietly(sent[1:])  # the sender may close its copies at once
        with recv_fds(b, 64, SCM_MAX_FD) as msg:
            assert len(msg.fds) == SCM_MAX_FD
            assert same_file(msg.fds[0].fileno(), sent[0])
            inodes = [os.fstat(fd.fileno()).st_ino for fd in msg.fds]
            assert len(set(inodes)) == SCM_MAX_FD
            assert not any(os.get_inheritable(fd.fileno()) for fd in msg.fds)
    finally:
        close_quietly(sent[:1])


def test_253_fds_with_credentials_not_truncated(stream_pair: tuple[socket.socket, ...]) -> None:
    # SO_PASSCRED adds an SCM_CREDENTIALS record to the same control buffer: the headroom
    # must keep a full SCM_RIGHTS record from being pushed out.
    a, b = stream_pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    with OwnedFd(os.open(os.devnull, os.O_RDONLY)) as fd:
        send_fds(a, b"x", [fd] * SCM_MAX_FD)
        send_fds(a, b"y", [fd] * SCM_MAX_FD)
    data, ancdata, flags, _ = b.recvmsg(16, SocketAncillary.receive_buffer_size(), CLOEXEC)
    with SocketAncillary.parse(ancdata, flags, recv_flags=CLOEXEC) as anc:
        assert data == b"x"
        assert not anc.is_truncated
        assert len(anc.fds) == SCM_MAX_FD
        assert anc.credentials == Credentials(os.getpid(), os.getuid(), os.getgid())
    with recv_fds(b, 16, SCM_MAX_FD) as msg:  # the helper copes with the extra record too
        assert msg.data == b"y"
        assert len(msg.fds) == SCM_MAX_FD


def test_254_fds_refused_before_anything_is_sent(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    with OwnedFd(os.open(os.devnull, os.O_RDONLY)) as fd:
        with pytest.raises(TooManyFdsError, match="254"):
            send_fds(a, b"x", [fd] * (SCM_MAX_FD + 1))
        assert nothing_queued(b)


def test_surplus_fds_closed_and_counted(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    sent = memfds(5)
    try:
        send_fds(a, b"five", sent)
        before = fd_count()
        with recv_fds(b, 64, 2) as msg:
            assert fd_count() == before + 2  # the other 3 were closed on arrival
            assert msg.discarded_fds == 3
            assert [same_file(fd.fileno(), s) for fd, s in zip(msg.fds, sent, strict=False)] == [
                True,
                True,
            ]
        send_fds(a, b"none wanted", sent)
        with recv_fds(b, 64, 0) as msg:
            assert msg.fds == ()
            assert msg.discarded_fds == 5
            assert fd_count() == before
    finally:
        close_quietly(sent)


def test_negative_maxfds_refused_before_receiving(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    with OwnedFd(os.open(os.devnull, os.O_RDONLY)) as fd:
        send_fds(a, b"kept", [fd])
    before = fd_count()
    with pytest.raises(ValueError, match="maxfds"):
        recv_fds(b, 64, -1)
    with pytest.raises(ValueError, match="maxfds"):
        recv_fds_into(b, bytearray(64), -1)
    assert fd_count() == before  # nothing was received
    with recv_fds(b, 64, 1) as msg:  # the message is still there
        assert msg.data == b"kept"
        assert len(msg.fds) == 1


@pytest.mark.parametrize(
    "receive",
    [
        lambda sock, flags: recv_fds(sock, 64, 1, flags),
        lambda sock, flags: recv_fds_into(sock, bytearray(64), 1, flags),
    ],
    ids=["recv_fds", "recv_fds_into"],
)
def test_msg_peek_refused(
    pair: tuple[socket.socket, ...], receive: Callable[[socket.socket, int], object]
) -> None:
    a, b = pair
    with OwnedFd(os.open(os.devnull, os.O_RDONLY)) as fd:
        send_fds(a, b"peek", [fd])
    before = fd_count()
    with pytest.raises(ValueError, match="MSG_PEEK"):
        receive(b, socket.MSG_PEEK)
    with pytest.raises(ValueError, match="MSG_PEEK"):
        receive(b, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    assert fd_count() == before
    with recv_fds(b, 64, 1) as msg:
        assert msg.data == b"peek"
        assert len(msg.fds) == 1


def test_recv_fds_into_bytearray(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    sent = memfds(3)
    try:
        send_fds(a, b"into", sent)
        buf = bytearray(32)
        result = recv_fds_into(b, buf, 2)
        assert isinstance(result, ReceivedInto)
        nbytes, fds = result
        with contextlib.ExitStack() as stack:
            for fd in fds:
                stack.enter_context(fd)
            assert nbytes == 4
            assert buf[:4] == b"into"
            assert len(fds) == 2  # the third was closed on arrival
            assert same_file(fds[1].fileno(), sent[1])
            assert not os.get_inheritable(fds[0].fileno())
    finally:
        close_quietly(sent)


def test_recv_fds_into_memoryview_slice(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    with OwnedFd(os.open(os.devnull, os.O_RDONLY)) as fd:
        send_fds(a, b"view", [fd])
    backing = bytearray(b"\x00" * 40)
    nbytes, fds = recv_fds_into(b, memoryview(backing)[10:20], 1)
    with fds[0]:
        assert nbytes == 4
        assert backing[10:14] == b"view"
        assert backing[:10] == b"\x00" * 10
        assert backing[14:] == b"\x00" * 26


def test_eof_gives_an_empty_message() -> None:
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        with b:
            a.close()
            with recv_fds(b, 64, 4) as msg:
                assert msg.data == b""
                assert msg.fds == ()
            nbytes, fds = recv_fds_into(b, bytearray(8), 4)
            assert (nbytes, fds) == (0, ())


def test_unread_fds_closed_by_kernel_when_socket_closes() -> None:
    r, w = os.pipe()
    try:
        a, b = socket.socketpair()
        with a, b:
            send_fds(a, b"x", [w])
            os.close(w)
        assert os.read(r, 10) == b""  # the in-flight write end died with the socket
    finally:
        close_quietly([r, w])


def test_nonblocking_nothing_to_read(pair: tuple[socket.socket, ...]) -> None:
    _a, b = pair
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        recv_fds(b, 64, 1)


# -- truncation ---------------------------------------------------------------------------


def test_ctrunc_with_tiny_control_buffer(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    sent = memfds(5)
    try:
        send_fds(a, b"cut", sent)
    finally:
        close_quietly(sent)
    before = fd_count()
    # The low-level path, as a careless caller would write it: room for 2 fds only.
    data, ancdata, flags, _ = b.recvmsg(64, socket.CMSG_SPACE(4), CLOEXEC)
    assert flags & socket.MSG_CTRUNC
    assert fd_count() == before + 2  # the kernel installed what fit and dropped the rest
    anc = SocketAncillary.parse(ancdata, flags, recv_flags=CLOEXEC)
    assert data == b"cut"
    assert anc.is_truncated
    assert anc.truncated_fds == 2
    assert anc.fds == ()
    assert fd_count() == before


def test_msg_trunc_closes_fds(msg_pair: tuple[socket.socket, ...]) -> None:
    a, b = msg_pair
    with OwnedFd(os.open(os.devnull, os.O_RDONLY)) as fd:
        send_fds(a, b"0123456789abcdef", [fd, fd, fd])
        send_fds(a, b"0123456789abcdef", [fd])
        send_fds(a, b"0123456789abcdef", [])
    before = fd_count()
    with pytest.raises(DataTruncatedError, match="MSG_TRUNC") as info:
        recv_fds(b, 10, 5)
    assert info.value.data == b"0123456789"
    assert info.value.closed_fds == 3
    assert fd_count() == before
    buf = bytearray(4)
    with pytest.raises(DataTruncatedError) as info:
        recv_fds_into(b, buf, 5)
    assert info.value.data == b"0123"
    assert info.value.closed_fds == 1
    assert fd_count() == before
    with pytest.raises(DataTruncatedError) as info:
        recv_fds(b, 10, 5)
    assert info.value.closed_fds == 0
    assert nothing_queued(b)  # the tails were discarded by the kernel, not left queued


def test_stream_short_buffer_is_not_truncation(stream_pair: tuple[socket.socket, ...]) -> None:
    a, b = stream_pair
    with OwnedFd(os.open(os.devnull, os.O_RDONLY)) as fd:
        send_fds(a, b"0123456789", [fd])
    with recv_fds(b, 4, 1) as first:
        assert first.data == b"0123"
        assert len(first.fds) == 1
    with recv_fds(b, 64, 1) as rest:
        assert rest.data == b"456789"
        assert rest.fds == ()


def test_stream_recv_stops_after_a_chunk_with_fds(stream_pair: tuple[socket.socket, ...]) -> None:
    # The kernel fact the framing layer relies on (unix_stream_read_generic): one recvmsg
    # returns the fds of at most one sendmsg, with the fd-less data queued before it.
    a, b = stream_pair
    with OwnedFd(os.open(os.devnull, os.O_RDONLY)) as fd:
        a.sendall(b"plain ")
        send_fds(a, b"one", [fd])
        send_fds(a, b"two", [fd, fd])
        a.sendall(b" tail")
    with recv_fds(b, 64, 10) as m1:
        assert (m1.data, len(m1.fds)) == (b"plain one", 1)
    with recv_fds(b, 64, 10) as m2:
        assert (m2.data, len(m2.fds)) == (b"two", 2)
    with recv_fds(b, 64, 10) as m3:
        assert (m3.data, len(m3.fds)) == (b" tail", 0)


# -- send errors --------------------------------------------------------------------------


def test_stream_fds_with_empty_data_refused(stream_pair: tuple[socket.socket, ...]) -> None:
    a, b = stream_pair
    with (
        OwnedFd(os.open(os.devnull, os.O_RDONLY)) as fd,
        pytest.raises(ValueError, match="at least one byte"),
    ):
        send_fds(a, b"", [fd])
    assert nothing_queued(b)
    assert send_fds(a, b"", []) == 0  # no fds: an empty write is harmless


def test_message_sockets_carry_fds_with_empty_data(msg_pair: tuple[socket.socket, ...]) -> None:
    a, b = msg_pair
    r, w = os.pipe()
    try:
        assert send_fds(a, b"", [w]) == 0
        with recv_fds(b, 64, 1) as msg:
            assert msg.data == b""
            assert len(msg.fds) == 1
            assert same_file(msg.fds[0].fileno(), w)
    finally:
        close_quietly([r, w])


def test_send_closed_fd_number_refused(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    num = os.open(os.devnull, os.O_RDONLY)
    os.close(num)
    with pytest.raises(InvalidFdError, match="EBADF"):
        send_fds(a, b"x", [num])  # nothing opened since: the number is not reused
    assert nothing_queued(b)


def test_send_closed_objects_refused(pair: tuple[socket.socket, ...]) -> None:
    a, b = pair
    sock = socket.socket(socket.AF_UNIX)
    sock.close()
    owned = OwnedFd(os.open(os.devnull, os.O_RDONLY))
    owned.close()
    for bad in (sock, owned, -1):
        with pytest.raises(InvalidFdError):
            send_fds(a, b"x", [bad])
    assert nothing_queued(b)


# -- across processes ---------------------------------------------------------------------


@FORKS_THE_TEST_PROCESS
def test_fds_from_a_child_process() -> None:
    parent, child = socket.socketpair()
    with parent:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                parent.close()
                r, w = os.pipe()
                os.write(w, f"from child {os.getpid()}".encode())
                os.close(w)
                mine, theirs = socket.socketpair()
                send_fds(child, b"handoff", [r, theirs])
                os.close(r)
                theirs.close()
                mine.sendall(b"over the passed socket")
                status = 0 if mine.recv(100) == b"reply" else 2
            finally:
                os._exit(status)
        child.close()
        try:
            with recv_fds(parent, 64, 2) as msg:
                assert msg.data == b"handoff"
                pipe_end, sock_fd = msg.take_fds()
            with pipe_end:
                assert os.read(pipe_end.fileno(), 100) == f"from child {pid}".encode()
            with sock_fd.into_socket() as sock:
                assert sock.type == socket.SOCK_STREAM
                assert sock.recv(100) == b"over the passed socket"
                sock.sendall(b"reply")
        finally:
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
