"""The macOS and BSD code paths, exercised on Linux through simulated Platform values.

Real sockets wherever the Linux kernel can play the part (no MSG_CMSG_CLOEXEC is simply not
passing it); a fake socket only for kernel behaviour Linux does not have (FreeBSD's truncation
without an SCM_RIGHTS record, macOS's EMFILE from recvmsg).
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import resource
import socket
import sys
from collections.abc import Iterator

import pytest
from helpers import is_open

import aioancillary._core._cmsg
from aioancillary import (
    SCM_MAX_FD,
    CloexecError,
    FdTruncatedError,
    OwnedFd,
    Platform,
    SocketAncillary,
    TooManyFdsError,
    buffer_size_for_rights,
    current_platform,
    recv_fds,
    recv_fds_into,
    send_fds,
)
from aioancillary._core._cmsg import extract_fds
from aioancillary._core._platform import _detect

CLOEXEC = socket.MSG_CMSG_CLOEXEC
DARWIN = Platform("darwin", None, 0)
FREEBSD = Platform("freebsd", SCM_MAX_FD, CLOEXEC)
SOL = socket.SOL_SOCKET


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1


@pytest.fixture
def nofile() -> Iterator[tuple[int, int]]:
    """The RLIMIT_NOFILE limits, restored after the test."""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        yield limits
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


# -- detection and sizing -----------------------------------------------------------------


def test_current_platform_is_linux() -> None:
    assert current_platform() == Platform("linux", SCM_MAX_FD, CLOEXEC)
    assert current_platform().receive_fd_capacity() == SCM_MAX_FD


@pytest.mark.parametrize(
    ("sys_platform", "expected"),
    [
        ("linux", Platform("linux", SCM_MAX_FD, CLOEXEC)),
        ("darwin", DARWIN),
        ("freebsd14", FREEBSD),
        ("openbsd7", Platform("openbsd", SCM_MAX_FD, CLOEXEC)),
    ],
)
def test_detect(monkeypatch: pytest.MonkeyPatch, sys_platform: str, expected: Platform) -> None:
    monkeypatch.setattr(sys, "platform", sys_platform)
    assert _detect() == expected


def test_darwin_buffer_follows_rlimit_nofile(nofile: tuple[int, int]) -> None:
    _soft, hard = nofile
    for soft in (300, 1000, 4096):
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert DARWIN.receive_fd_capacity() == soft
        expected = buffer_size_for_rights(soft) + DARWIN.extra_cmsg_space
        assert DARWIN.receive_ancbufsize() == expected
        assert SocketAncillary.receive_buffer_size(DARWIN) == expected
        # The fixed-cap platforms do not care.
        assert FREEBSD.receive_fd_capacity() == SCM_MAX_FD


@pytest.mark.parametrize(
    ("soft", "capacity"),
    [(resource.RLIM_INFINITY, 1 << 16), (10**7, 1 << 16), (1 << 16, 1 << 16), (0, 1)],
)
def test_darwin_capacity_is_bounded(
    monkeypatch: pytest.MonkeyPatch, soft: int, capacity: int
) -> None:
    # An unlimited (or huge) limit must not become a huge allocation on every receive. The
    # limit is faked: raising it that far needs privileges this test must not rely on.
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, resource.RLIM_INFINITY))
    assert DARWIN.receive_fd_capacity() == capacity


# -- no MSG_CMSG_CLOEXEC: the fcntl path --------------------------------------------------


def test_darwin_receive_sets_cloexec_with_fcntl(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    calls: list[int] = []
    real = aioancillary._core._cmsg._set_cloexec

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(aioancillary._core._cmsg, "_set_cloexec", counting)
    r, w = os.pipe()
    try:
        send_fds(a, b"x", [r, w])
        # Without MSG_CMSG_CLOEXEC the kernel installs inheritable fds: only fcntl fixes that.
        with recv_fds(b, 16, 4, platform=DARWIN) as msg:
            nums = [fd.fileno() for fd in msg.fds]
            assert len(nums) == 2
            assert calls == nums
            assert not any(os.get_inheritable(fd) for fd in nums)
        calls.clear()
        send_fds(a, b"y", [r])
        nbytes, fds = recv_fds_into(b, bytearray(8), 1, platform=DARWIN)
        with fds[0]:
            assert nbytes == 1
            assert calls == [fds[0].fileno()]
            assert not os.get_inheritable(fds[0].fileno())
        calls.clear()
        send_fds(a, b"z", [r])
        with recv_fds(b, 16, 4) as msg:  # Linux: the kernel sets it, no fcntl
            assert calls == []
            assert not os.get_inheritable(msg.fds[0].fileno())
    finally:
        os.close(r)
        os.close(w)


def test_without_any_cloexec_fds_would_be_inheritable(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # The control experiment for the test above: the kernel really does hand out inheritable
    # fds when MSG_CMSG_CLOEXEC is not passed.
    a, b = pair
    with OwnedFd(os.open(os.devnull, os.O_RDONLY)) as fd:
        send_fds(a, b"x", [fd])
    _data, ancdata, _flags, _ = b.recvmsg(16, SocketAncillary.receive_buffer_size(DARWIN))
    ((_, _, payload),) = ancdata
    (num,) = array.array("i", payload)
    with OwnedFd(num):
        assert os.get_inheritable(num)


@pytest.mark.parametrize("fail_at", [0, 1, 2])
def test_cloexec_failure_closes_every_fd(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    a, b = pair
    seen: list[int] = []

    def failing(fd: int) -> None:
        seen.append(fd)
        if len(seen) > fail_at:
            raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(aioancillary._core._cmsg, "_set_cloexec", failing)
    with OwnedFd(os.open(os.devnull, os.O_RDONLY)) as fd:
        send_fds(a, b"x", [fd, fd, fd])
    before = fd_count()
    with pytest.raises(CloexecError, match="all 3 were closed") as info:
        recv_fds(b, 16, 4, platform=DARWIN)
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.EPERM
    assert isinstance(info.value.__cause__, PermissionError)
    assert fd_count() == before
    assert not any(is_open(num) for num in seen)


def test_cloexec_failure_in_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(aioancillary._core._cmsg, "_set_cloexec", failing)
    nums = [os.open(os.devnull, os.O_RDONLY) for _ in range(2)]
    record = (SOL, socket.SCM_RIGHTS, array.array("i", nums).tobytes())
    try:
        with pytest.raises(CloexecError):
            SocketAncillary.parse([record], 0, recv_flags=0, platform=DARWIN)
        assert not any(is_open(num) for num in nums)
    finally:
        for num in nums:
            with contextlib.suppress(OSError):
                os.close(num)


# -- BSD ----------------------------------------------------------------------------------


def test_freebsd_round_trip_and_cap(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        send_fds(a, b"bsd", [w], platform=FREEBSD)
        with recv_fds(b, 16, 1, platform=FREEBSD) as msg:
            assert msg.data == b"bsd"
            with msg.take_fd() as got:
                assert not os.get_inheritable(got.fileno())
                os.write(got.fileno(), b"through")
        assert os.read(r, 16) == b"through"
        with pytest.raises(TooManyFdsError, match="freebsd"):
            send_fds(a, b"x", [w] * (SCM_MAX_FD + 1), platform=FREEBSD)
    finally:
        os.close(r)
        os.close(w)


def test_freebsd_truncation_without_rights_record() -> None:
    # FreeBSD delivers no SCM_RIGHTS record at all on truncation: MSG_CTRUNC alone.
    anc = SocketAncillary.parse([], socket.MSG_CTRUNC, recv_flags=CLOEXEC, platform=FREEBSD)
    assert anc.is_truncated
    assert anc.truncated_fds == 0
    assert anc.fds == ()
    with pytest.raises(FdTruncatedError) as info:
        extract_fds([], socket.MSG_CTRUNC, CLOEXEC, FREEBSD)
    assert info.value.closed_fds == 0


class FakeSocket:
    """Stands in for a kernel Linux is not: a scripted ``recvmsg_into``."""

    type = socket.SOCK_STREAM

    def __init__(self, data: bytes, msg_flags: int = 0, error: OSError | None = None) -> None:
        self.data = data
        self.msg_flags = msg_flags
        self.error = error
        self.calls: list[tuple[int, int]] = []

    def recvmsg_into(
        self, buffers: list[bytearray | memoryview], ancbufsize: int, flags: int
    ) -> tuple[int, list[tuple[int, int, bytes]], int, None]:
        self.calls.append((ancbufsize, flags))
        if self.error is not None:
            raise self.error
        (buf,) = buffers
        buf[: len(self.data)] = self.data
        return len(self.data), [], self.msg_flags, None


def test_freebsd_truncation_through_the_receive_path() -> None:
    sock = FakeSocket(b"payload", socket.MSG_CTRUNC)
    with pytest.raises(FdTruncatedError) as info:
        recv_fds(sock, 64, 4, platform=FREEBSD)  # type: ignore[arg-type]
    assert info.value.data == b"payload"
    assert info.value.closed_fds == 0
    assert sock.calls == [(FREEBSD.receive_ancbufsize(), CLOEXEC)]


def test_macos_emfile_from_recvmsg() -> None:
    sock = FakeSocket(b"", error=OSError(errno.EMFILE, "Too many open files"))
    with pytest.raises(FdTruncatedError, match="EMFILE") as info:
        recv_fds(sock, 64, 4, platform=DARWIN)  # type: ignore[arg-type]
    assert isinstance(info.value.__cause__, OSError)
    assert sock.calls == [(DARWIN.receive_ancbufsize(), 0)]


def test_other_recvmsg_errors_pass_through() -> None:
    sock = FakeSocket(b"", error=ConnectionResetError(errno.ECONNRESET, "reset"))
    with pytest.raises(ConnectionResetError):
        recv_fds(sock, 64, 4, platform=DARWIN)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("platform", "kind"),
    [
        (FREEBSD, 2),  # SCM_TIMESTAMP
        (FREEBSD, 4),  # SCM_BINTIME
        (DARWIN, 2),  # SCM_TIMESTAMP
        (DARWIN, 4),  # SCM_TIMESTAMP_MONOTONIC
    ],
)
def test_linux_only_record_numbers_mean_nothing_elsewhere(platform: Platform, kind: int) -> None:
    # On Linux SOL_SOCKET type 4 is SCM_PIDFD (an fd to close) and 2 is SCM_CREDENTIALS; on the
    # BSDs and macOS those numbers are timestamps. Their bytes must never be taken for fds.
    bait = [os.open(os.devnull, os.O_RDONLY) for _ in range(4)]
    record = (SOL, kind, array.array("i", bait).tobytes())  # 16 bytes, like a timespec pair
    try:
        anc = SocketAncillary.parse([record], 0, recv_flags=0, platform=platform)
        assert all(is_open(fd) for fd in bait)
        assert anc.other == [record]
        assert anc.credentials is None
        assert anc.pidfd is None
        assert extract_fds([record], 0, 0, platform) == []
        assert all(is_open(fd) for fd in bait)
    finally:
        for fd in bait:
            os.close(fd)
