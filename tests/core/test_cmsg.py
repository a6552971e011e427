"""SocketAncillary and extract_fds: building and parsing ancdata, no sockets involved.

Every fd number put into a parsed record is a real open fd (the parser closes fds it owns, so a
made-up number could close one of pytest's).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from helpers import is_open
from hypothesis import given, settings
from hypothesis import strategies as st

from aioancillary import (
    SCM_MAX_FD,
    Credentials,
    FdTruncatedError,
    HasFileno,
    InvalidFdError,
    OwnedFd,
    Platform,
    SocketAncillary,
    TooManyFdsError,
    buffer_size_for_rights,
)
from aioancillary._core._cmsg import extract_fds

SOL = socket.SOL_SOCKET
RIGHTS = socket.SCM_RIGHTS
CREDS = 0x02  # SCM_CREDENTIALS on Linux
PIDFD = 0x04  # SCM_PIDFD on Linux 6.5+
CLOEXEC = socket.MSG_CMSG_CLOEXEC
LINUX = Platform("linux", SCM_MAX_FD, CLOEXEC)


def devnull(*, inheritable: bool = False) -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    if inheritable:
        os.set_inheritable(fd, True)
    return fd


def ints(fds: list[int]) -> bytes:
    return array.array("i", fds).tobytes()


def rights(fds: list[int]) -> tuple[int, int, bytes]:
    return (SOL, RIGHTS, ints(fds))


def close_quietly(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@contextlib.contextmanager
def real_fds(n: int, *, inheritable: bool = False) -> Iterator[list[int]]:
    """``n`` open fds; whatever the test did not close is closed afterwards."""
    fds = [devnull(inheritable=inheritable) for _ in range(n)]
    try:
        yield fds
    finally:
        close_quietly(fds)


# -- building -----------------------------------------------------------------------------


def test_empty_builder() -> None:
    anc = SocketAncillary()
    assert anc.ancdata() == []
    assert anc.fds_to_send == ()


def test_add_fds_accepts_ints_and_fileno_objects() -> None:
    with (
        real_fds(1) as (num,),
        tempfile.TemporaryFile() as tmp,
        socket.socket(socket.AF_UNIX) as sock,
        OwnedFd(devnull()) as owned,
    ):
        anc = SocketAncillary()
        anc.add_fds([num, tmp])
        objects: list[HasFileno] = [sock, owned]
        anc.add_fds(iter(objects))  # any iterable
        expected = [num, tmp.fileno(), sock.fileno(), owned.fileno()]
        assert anc.fds_to_send == tuple(expected)
        assert anc.ancdata() == [(SOL, RIGHTS, ints(expected))]
        (record,) = anc.ancdata()
        assert len(record[2]) == 4 * len(expected)
        # Borrowed: nothing was closed or duplicated.
        assert is_open(num)
        assert not tmp.closed
        assert not owned.closed
        anc.clear()
        assert anc.ancdata() == []
        assert is_open(num)


def test_add_fds_cap_is_253_in_total() -> None:
    with real_fds(1) as (num,):
        anc = SocketAncillary(platform=LINUX)
        anc.add_fds([num] * 200)
        with pytest.raises(TooManyFdsError, match="254"):
            anc.add_fds([num] * 54)
        assert len(anc.fds_to_send) == 200  # all or nothing
        anc.add_fds([num] * 53)
        assert len(anc.fds_to_send) == SCM_MAX_FD
        with pytest.raises(TooManyFdsError):
            anc.add_fds([num])
        assert len(anc.fds_to_send) == SCM_MAX_FD


def test_add_fds_254_at_once_refused() -> None:
    with real_fds(1) as (num,):
        anc = SocketAncillary()
        with pytest.raises(TooManyFdsError) as info:
            anc.add_fds([num] * (SCM_MAX_FD + 1))
        assert isinstance(info.value, ValueError)
        assert anc.fds_to_send == ()


def test_add_fds_no_cap_without_scm_max_fd() -> None:
    with real_fds(1) as (num,):
        anc = SocketAncillary(platform=Platform("darwin", None, 0))
        anc.add_fds([num] * 300)
        assert len(anc.fds_to_send) == 300


def test_add_fds_invalid_adds_nothing() -> None:
    closed_sock = socket.socket(socket.AF_UNIX)
    closed_sock.close()
    with tempfile.TemporaryFile() as closed_file:
        pass
    closed_owned = OwnedFd(devnull())
    closed_owned.close()
    with real_fds(1) as (num,):
        for bad in (-1, closed_sock, closed_file, closed_owned):
            anc = SocketAncillary()
            anc.add_fds([num])
            with pytest.raises(InvalidFdError):
                anc.add_fds([num, bad])
            assert anc.fds_to_send == (num,)


# -- parsing: examples --------------------------------------------------------------------


def test_parse_nothing() -> None:
    anc = SocketAncillary.parse([], 0)
    assert anc.fds == ()
    assert not anc.is_truncated
    assert anc.credentials is None
    assert anc.other == []
    assert anc.pidfd is None


def test_parse_multiple_rights_records_in_order() -> None:
    with real_fds(5) as fds:
        with SocketAncillary.parse([rights(fds[:2]), rights(fds[2:3]), rights(fds[3:])], 0) as anc:
            assert [fd.fileno() for fd in anc.fds] == fds
            assert all(isinstance(fd, OwnedFd) for fd in anc.fds)
        assert not any(is_open(fd) for fd in fds)


def test_parse_drops_trailing_partial_int() -> None:
    with real_fds(3) as fds:
        record = (SOL, RIGHTS, ints(fds)[:-1])  # the last int is cut short
        with SocketAncillary.parse([record], 0) as anc:
            assert [fd.fileno() for fd in anc.fds] == fds[:2]
        assert is_open(fds[2])  # never read, never closed


def test_parse_skips_negative_ints() -> None:
    with real_fds(1) as (num,):
        with SocketAncillary.parse([rights([-1, num, -5])], 0) as anc:
            assert [fd.fileno() for fd in anc.fds] == [num]
        assert not is_open(num)


def test_parse_keeps_unknown_records_without_touching_fds() -> None:
    with real_fds(3) as bait:
        records = [
            (socket.IPPROTO_IP, RIGHTS, ints(bait)),  # SCM_RIGHTS's number, wrong level
            (SOL, 0x7F, ints(bait)),
            (SOL, 3, b"system_u:object_r:foo"),  # SCM_SECURITY
            (SOL, CREDS, ints(bait[:2])),  # too short for a ucred
        ]
        anc = SocketAncillary.parse(records, 0)
        assert anc.other == records
        assert anc.fds == ()
        assert anc.credentials is None
        assert all(is_open(fd) for fd in bait)


def test_parse_credentials() -> None:
    record = (SOL, CREDS, struct.pack("iII", 1234, 1000, 100))
    anc = SocketAncillary.parse([record], 0)
    assert anc.credentials == Credentials(pid=1234, uid=1000, gid=100)
    assert anc.other == []


def test_parse_pidfd_is_owned_separately() -> None:
    with real_fds(2) as (sent, pidfd):
        anc = SocketAncillary.parse([rights([sent]), (SOL, PIDFD, ints([pidfd]))], CLOEXEC)
        assert [fd.fileno() for fd in anc.fds] == [sent]
        assert anc.pidfd is not None
        assert anc.pidfd.fileno() == pidfd
        taken = anc.take_fds()
        anc.close()
        assert not is_open(pidfd)
        assert is_open(sent)
        taken[0].close()


def test_extract_fds_closes_pidfd() -> None:
    with real_fds(2) as (sent, pidfd):
        fds = extract_fds([(SOL, PIDFD, ints([pidfd])), rights([sent])], 0, CLOEXEC, LINUX)
        assert not is_open(pidfd)
        assert fds == [sent]  # raw numbers, now owned by the caller
        os.close(fds[0])


def test_parse_ctrunc_closes_everything() -> None:
    with real_fds(4) as fds:
        records = [rights(fds[:3]), (SOL, PIDFD, ints(fds[3:]))]
        anc = SocketAncillary.parse(records, socket.MSG_CTRUNC, recv_flags=CLOEXEC)
        assert not any(is_open(fd) for fd in fds)
        assert anc.is_truncated
        assert anc.truncated_fds == 4
        assert anc.fds == ()
        assert anc.pidfd is None


def test_extract_fds_ctrunc_raises() -> None:
    with real_fds(2) as fds:
        with pytest.raises(FdTruncatedError, match="MSG_CTRUNC") as info:
            extract_fds([rights(fds)], socket.MSG_CTRUNC, CLOEXEC, LINUX)
        assert not any(is_open(fd) for fd in fds)
    assert info.value.closed_fds == 2


def test_extract_fds_nothing() -> None:
    assert extract_fds([], 0, 0, LINUX) == []


@pytest.mark.parametrize(("maxfds", "kept"), [(0, 0), (2, 2), (5, 5), (9, 5)])
def test_parse_maxfds_closes_surplus(maxfds: int, kept: int) -> None:
    with real_fds(5) as fds, SocketAncillary.parse([rights(fds)], 0, maxfds=maxfds) as anc:
        assert [fd.fileno() for fd in anc.fds] == fds[:kept]
        assert anc.discarded_fds == 5 - kept
        assert not any(is_open(fd) for fd in fds[kept:])
        assert all(is_open(fd) for fd in fds[:kept])


def test_parse_negative_maxfds_closes_all() -> None:
    with real_fds(3) as fds:
        with pytest.raises(ValueError, match="maxfds"):
            SocketAncillary.parse([rights(fds)], 0, maxfds=-1)
        assert not any(is_open(fd) for fd in fds)


def test_parse_sets_cloexec_without_msg_cmsg_cloexec() -> None:
    with (
        real_fds(3, inheritable=True) as fds,
        SocketAncillary.parse([rights(fds)], 0, recv_flags=0) as anc,
    ):
        assert len(anc.fds) == 3
        assert not any(os.get_inheritable(fd.fileno()) for fd in anc.fds)


def test_parse_trusts_msg_cmsg_cloexec() -> None:
    # With MSG_CMSG_CLOEXEC the kernel set the flag: no fcntl per fd. Proved by an fd that is
    # (artificially) inheritable staying so.
    with (
        real_fds(1, inheritable=True) as fds,
        SocketAncillary.parse([rights(fds)], 0, recv_flags=CLOEXEC) as anc,
    ):
        assert os.get_inheritable(anc.fds[0].fileno())


def test_take_fds_and_close() -> None:
    with real_fds(2) as fds:
        anc = SocketAncillary.parse([rights(fds)], 0)
        taken = anc.take_fds()
        assert anc.fds == ()
        anc.close()
        assert all(is_open(fd) for fd in fds)
        for fd in taken:
            fd.close()


def test_receive_buffer_size_and_flags() -> None:
    size = SocketAncillary.receive_buffer_size()
    assert size >= socket.CMSG_SPACE(SCM_MAX_FD * 4) + socket.CMSG_SPACE(12)
    assert SocketAncillary.receive_flags() == CLOEXEC
    assert SocketAncillary.receive_flags(Platform("darwin", None, 0)) == 0
    assert SocketAncillary.receive_buffer_size(LINUX) == LINUX.receive_ancbufsize()


def test_buffer_size_for_rights() -> None:
    assert buffer_size_for_rights(0) == 0
    assert buffer_size_for_rights(1) == socket.CMSG_SPACE(4)
    assert buffer_size_for_rights(SCM_MAX_FD) == socket.CMSG_SPACE(4 * SCM_MAX_FD)
    with pytest.raises(ValueError, match="-1"):
        buffer_size_for_rights(-1)


# -- parsing: properties ------------------------------------------------------------------

_GARBAGE_KINDS = st.sampled_from(
    [
        (socket.IPPROTO_IP, RIGHTS),
        (socket.IPPROTO_IPV6, RIGHTS),
        (socket.IPPROTO_TCP, 2),
        (SOL, 3),
        (SOL, 0x7F),
        (SOL, 0),
        (SOL, CREDS),  # bait ints only: kept as other when shorter than a ucred
    ]
)


@dataclass
class Rights:
    nfds: int
    cut: int  # bytes cut off the end (a truncated record's partial int)


@dataclass
class Garbage:
    level: int
    kind: int
    nbait: int
    junk: bytes


@dataclass
class Built:
    ancdata: list[tuple[int, int, bytes]] = field(default_factory=list)
    expected: list[int] = field(default_factory=list)  # whole fds in SCM_RIGHTS, in order
    untouchable: list[int] = field(default_factory=list)  # bait + partial ints: never closed
    other: list[tuple[int, int, bytes]] = field(default_factory=list)

    def all_fds(self) -> list[int]:
        return self.expected + self.untouchable


def _rights() -> st.SearchStrategy[Rights]:
    return st.builds(Rights, st.integers(0, 6), st.integers(0, 3))


def _garbage() -> st.SearchStrategy[Garbage]:
    return _GARBAGE_KINDS.flatmap(
        lambda lk: st.builds(
            Garbage,
            st.just(lk[0]),
            st.just(lk[1]),
            st.integers(0, 2),
            st.binary(max_size=0 if lk == (SOL, CREDS) else 9),
        )
    )


def _build(records: list[Rights | Garbage], *, inheritable: bool) -> Built:
    built = Built()
    try:
        for rec in records:
            if isinstance(rec, Rights):
                fds = [devnull(inheritable=inheritable) for _ in range(rec.nfds)]
                payload = ints(fds)
                cut = min(rec.cut, len(payload))
                if cut:
                    payload = payload[:-cut]
                    built.untouchable.append(fds.pop())
                built.expected.extend(fds)
                built.ancdata.append((SOL, RIGHTS, payload))
            else:
                bait = [devnull() for _ in range(rec.nbait)]
                built.untouchable.extend(bait)
                record = (rec.level, rec.kind, ints(bait) + rec.junk)
                built.ancdata.append(record)
                built.other.append(record)
    except BaseException:
        close_quietly(built.all_fds())
        raise
    return built


_RECORDS = st.lists(st.one_of(_rights(), _garbage()), max_size=6)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    records=_RECORDS,
    ctrunc=st.booleans(),
    maxfds=st.none() | st.integers(0, 8),
    kernel_cloexec=st.booleans(),
)
def test_parse_property(
    records: list[Rights | Garbage], ctrunc: bool, maxfds: int | None, kernel_cloexec: bool
) -> None:
    built = _build(records, inheritable=not kernel_cloexec)
    flags = socket.MSG_CTRUNC if ctrunc else 0
    recv_flags = CLOEXEC if kernel_cloexec else 0
    try:
        anc = SocketAncillary.parse(
            built.ancdata, flags, recv_flags=recv_flags, maxfds=maxfds, platform=LINUX
        )
        # Checked at once: nothing opens an fd between the parse and these checks.
        assert anc.other == built.other
        assert all(is_open(fd) for fd in built.untouchable)
        if ctrunc:
            assert anc.is_truncated
            assert anc.fds == ()
            assert anc.truncated_fds == len(built.expected)
            assert not any(is_open(fd) for fd in built.expected)
            return
        assert not anc.is_truncated
        keep = len(built.expected) if maxfds is None else maxfds
        kept, dropped = built.expected[:keep], built.expected[keep:]
        assert [fd.fileno() for fd in anc.fds] == kept
        assert anc.discarded_fds == len(dropped)
        assert not any(is_open(fd) for fd in dropped)
        assert all(is_open(fd) for fd in kept)
        assert not any(os.get_inheritable(fd) for fd in kept)
        anc.close()
        assert not any(is_open(fd) for fd in kept)
    finally:
        close_quietly(built.untouchable)
        # Only when the test already failed can an expected fd still be open here.
        close_quietly([fd for fd in built.expected if is_open(fd)])


@settings(max_examples=100, deadline=None, derandomize=True)
@given(records=_RECORDS, ctrunc=st.booleans())
def test_extract_fds_property(records: list[Rights | Garbage], ctrunc: bool) -> None:
    built = _build(records, inheritable=False)
    flags = socket.MSG_CTRUNC if ctrunc else 0
    try:
        if ctrunc:
            with pytest.raises(FdTruncatedError) as info:
                extract_fds(built.ancdata, flags, CLOEXEC, LINUX)
            assert info.value.closed_fds == len(built.expected)
            assert not any(is_open(fd) for fd in built.expected)
        else:
            fds = extract_fds(built.ancdata, flags, CLOEXEC, LINUX)
            assert fds == built.expected
            for fd in fds:
                os.close(fd)
        assert all(is_open(fd) for fd in built.untouchable)
    finally:
        close_quietly(built.untouchable)
        close_quietly([fd for fd in built.expected if is_open(fd)])
