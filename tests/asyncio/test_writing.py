"""write_batch / send_batch, the per-sendmsg fd cap, and taking back what never left.

Where the number of ``sendmsg`` calls matters, the peer is a plain socket read with
``recvmsg``: on Linux one stream ``recvmsg`` returns the fds of at most one ``sendmsg``, so the
fds each read brings tell how the sender grouped them.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from helpers import (
    RecordingProtocol,
    half_raw,
    is_open,
    pair,
    read_all,
    tagged_pipe,
    tagged_pipes,
    transport_pair,
    wait_until,
    within,
)

from aioancillary import (
    SCM_MAX_FD,
    AncillaryMessage,
    AncillaryTransport,
    FrameDecoder,
    InvalidFdError,
    OwnedFd,
    TooManyFdsError,
    connection_pair,
    frame_header,
)
from aioancillary._core._platform import current_platform
from aioancillary._kernel._syscalls import receive_into


def read_sendmsg_groups(sock: socket.socket, expected_fds: int) -> list[list[int]]:
    """Read a blocking peer until ``expected_fds`` fds came; return each read's fds."""
    buf = bytearray(1 << 20)
    groups: list[list[int]] = []
    while sum(map(len, groups)) < expected_fds:
        _n, fds, _anc = receive_into(sock, buf, 0, current_platform())
        if fds:
            groups.append(fds)
    return groups


def close_groups(groups: list[list[int]]) -> None:
    for group in groups:
        for fd in group:
            os.close(fd)


async def test_a_batch_goes_out_in_one_sendmsg() -> None:
    async with half_raw() as (conn, peer):
        tags = tagged_pipes(range(10))
        try:
            await conn.send_batch([(b"m%d" % i, [fd]) for i, fd in enumerate(tags)])
        finally:
            for fd in tags:
                os.close(fd)  # borrowed: the kernel has its own references
        groups = await asyncio.to_thread(read_sendmsg_groups, peer, 10)
        assert [len(g) for g in groups] == [10]
        assert [read_all(fd) for fd in groups[0]] == [b"%d" % i for i in range(10)]
        close_groups(groups)


@pytest.mark.parametrize("cap", [1, 4, SCM_MAX_FD])
async def test_max_fds_per_send_caps_every_sendmsg(cap: int) -> None:
    count = 40
    async with half_raw(max_fds_per_send=cap) as (conn, peer):
        fds = tagged_pipes(range(2 * count))
        try:
            await conn.send_batch([(b"%d" % i, [fd]) for i, fd in enumerate(fds[:count])])
            for i, fd in enumerate(fds[count:], count):  # and single sends: one burst
                await conn.send_fds(b"%d" % i, [fd])
        finally:
            for fd in fds:
                os.close(fd)
        groups = await asyncio.to_thread(read_sendmsg_groups, peer, 2 * count)
        try:
            assert max(map(len, groups)) <= cap
            tags = [read_all(fd) for g in groups for fd in g]
            assert tags == [b"%d" % i for i in range(2 * count)]
        finally:
            close_groups(groups)


async def test_max_fds_per_send_refuses_a_bigger_message() -> None:
    r, w = os.pipe()
    try:
        async with pair(max_fds_per_send=2) as (a, b):
            with pytest.raises(TooManyFdsError, match="at most 2"):
                await a.send_fds(b"three", [r, w, r])
            with pytest.raises(ValueError, match="max_fds_per_send"):
                await connection_pair(max_fds_per_send=SCM_MAX_FD + 1)
            await a.send_fds(b"two", [r, w])
            with await within(b.recv()) as msg:
                assert msg.fd_count == 2
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    ("sock_type", "framed"),
    [(socket.SOCK_STREAM, True), (socket.SOCK_SEQPACKET, None), (socket.SOCK_DGRAM, None)],
    ids=["framed", "seqpacket", "dgram"],
)
@pytest.mark.parametrize("close_fds", [False, True], ids=["borrowed", "close_fds"])
async def test_batch_messages_arrive_each_with_its_own_fds(
    sock_type: int, framed: bool | None, close_fds: bool
) -> None:
    async with pair(sock_type, framed=framed) as (a, b):
        batch: list[tuple[bytes, list[int]]] = [
            (b"one", [tagged_pipe("1a")]),
            (b"none", []),
            (b"two", [tagged_pipe("2a"), tagged_pipe("2b")]),
            (b"", [tagged_pipe("3a")]),
        ]
        await a.send_batch(batch, close_fds=close_fds)
        for _data, fds in batch:
            for fd in fds:
                assert is_open(fd) is not close_fds
                if not close_fds:
                    os.close(fd)
        got = []
        for _ in batch:
            with await within(b.recv()) as msg:
                got.append((msg.data, [read_all(fd) for fd in msg.fds]))
        assert got == [
            (b"one", [b"1a"]),
            (b"none", []),
            (b"two", [b"2a", b"2b"]),
            (b"", [b"3a"]),
        ]


async def test_batch_behind_a_full_socket_is_queued_and_arrives_in_order() -> None:
    async with pair() as (a, b):
        b.transport.pause_reading()
        a.transport.set_write_buffer_limits(high=1 << 24)
        while not a.transport.get_write_buffer_size():
            a.transport.write(b"x" * 65536)
            await asyncio.sleep(0)
        fds = tagged_pipes(range(300))  # more than one sendmsg's worth
        try:
            await a.send_batch([(b"%d" % i, [fd]) for i, fd in enumerate(fds)])
            assert a.transport.get_write_buffer_fds() == 300  # duplicates, queued
        finally:
            for fd in fds:
                os.close(fd)
        b.transport.resume_reading()
        seen: list[tuple[bytes, bytes]] = []
        while len(seen) < 300:
            with await within(b.recv()) as msg:
                if msg.fd_count:
                    seen.append((msg.data, read_all(msg.fds[0])))
        assert seen == [(b"%d" % i, b"%d" % i) for i in range(300)]


@pytest.mark.parametrize("close_fds", [False, True], ids=["borrowed", "close_fds"])
async def test_a_refused_batch_sends_nothing(close_fds: bool) -> None:
    r, w = os.pipe()
    handed = [os.dup(r), os.dup(w)]
    sock_a, sock_b = socket.socketpair()
    try:
        async with pair() as (a, b):
            with pytest.raises(TypeError, match="bytes-like"):
                await a.send_batch(
                    [(b"ok", [handed[0]]), ("text", [sock_a]), (b"later", [handed[1]])],  # type: ignore[list-item]
                    close_fds=close_fds,
                )
            assert [is_open(fd) for fd in handed] == [not close_fds] * 2
            assert (sock_a.fileno() == -1) is close_fds
            with pytest.raises(TypeError, match="pairs"):
                await a.send_batch([b"not a pair"])  # type: ignore[list-item]
            closed = os.open(os.devnull, os.O_RDONLY)
            os.close(closed)
            with pytest.raises(InvalidFdError):
                await a.send_batch([(b"ok", [r]), (b"bad", [closed])])
            await a.send(b"after")
            with await within(b.recv()) as msg:
                assert msg.data == b"after"  # nothing of the refused batches arrived
    finally:
        if not close_fds:
            for fd in handed:
                os.close(fd)
        sock_a.close()
        sock_b.close()
        os.close(r)
        os.close(w)


async def test_empty_batch_is_a_no_op() -> None:
    async with pair() as (a, b):
        await a.send_batch([])
        await a.send(b"only")
        with await within(b.recv()) as msg:
            assert msg.data == b"only"


# -- messages that never left come back to the protocol ----------------------------------------


class Unsent(RecordingProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.unsent: list[AncillaryMessage] = []

    def messages_unsent(self, messages: list[AncillaryMessage]) -> None:
        self.events.append("unsent")
        self.unsent += messages


@pytest.mark.parametrize("how", ["abort", "peer-gone"])
async def test_queued_messages_that_never_left_come_back(how: str) -> None:
    loop = asyncio.get_running_loop()
    left, peer = socket.socketpair()
    right: socket.socket | None = peer
    proto = Unsent()
    transport = AncillaryTransport(loop, left, proto)
    try:
        transport.set_write_buffer_limits(high=1 << 24)
        while not transport.get_write_buffer_size():
            transport.write(b"x" * 65536)  # the peer never reads: the kernel fills up
            await asyncio.sleep(0)
        fds = tagged_pipes(range(6))
        transport.write_batch([(b"msg%d" % i, [fd]) for i, fd in enumerate(fds[:5])])
        transport.write_fds(b"single", [fds[5]])
        for fd in fds:
            os.close(fd)
        if how == "abort":
            transport.abort()
        else:
            peer.close()  # unread data: the next send fails with EPIPE
            right = None
            await wait_until(lambda: "unsent" in proto.events)
        await within(proto.lost)
        assert proto.events.index("unsent") < proto.events.index("lost")
        datas = [m.data for m in proto.unsent]
        # Everything queued behind the partly sent batch came back, with its own fds.
        assert datas[-6:] == [b"msg0", b"msg1", b"msg2", b"msg3", b"msg4", b"single"]
        got = [[read_all(fd) for fd in m.fds] for m in proto.unsent[-6:]]
        assert got == [[b"0"], [b"1"], [b"2"], [b"3"], [b"4"], [b"5"]]
    finally:
        for msg in proto.unsent:
            msg.close()
        proto.close_messages()
        transport.abort()
        if right is not None:
            right.close()


async def test_default_messages_unsent_closes_them() -> None:
    r, w = os.pipe()
    async with transport_pair() as (ta, _pa, tb, _pb):
        tb.pause_reading()
        ta.set_write_buffer_limits(high=1 << 24)
        while not ta.get_write_buffer_size():
            ta.write(b"x" * 65536)
            await asyncio.sleep(0)
        ta.write_fds(b"queued", [w])
        os.close(w)
        ta.abort()  # RecordingProtocol keeps the default: the duplicate is closed
    assert os.read(r, 1) == b""  # no write end left anywhere
    os.close(r)


async def test_framed_decoder_still_takes_owned_fds() -> None:
    r, w = os.pipe()
    dec = FrameDecoder()
    owned = [OwnedFd(r), OwnedFd(w)]
    (msg,) = dec.feed(frame_header(2, 2) + b"hi", owned)
    assert all(fd.closed for fd in owned)  # detached: the decoder owns the numbers
    with msg:
        assert [fd.fileno() for fd in msg.fds] == [r, w]
    assert not is_open(r)
    assert not is_open(w)
