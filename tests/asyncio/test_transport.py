"""AncillaryTransport: the asyncio.Transport contract, plus fds, with a custom protocol."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from helpers import (
    BIG,
    RecordingProtocol,
    is_open,
    read_all,
    tagged_pipe,
    transport_pair,
    wait_until,
    within,
)

from aioancillary import (
    SCM_MAX_FD,
    AncillaryConnection,
    AncillaryMessage,
    AncillaryTransport,
    ConnectionClosedError,
    Credentials,
    InvalidFdError,
    OwnedFd,
    Platform,
    ProtocolError,
    TooManyFdsError,
    connection_pair,
    frame_header,
)

ME = Credentials(os.getpid(), os.getuid(), os.getgid())


async def test_custom_protocol_receives_messages_with_their_fds() -> None:
    async with transport_pair() as (ta, pa, _tb, pb):
        assert pa.transport is ta
        assert pa.events == ["made"]
        r1, r2 = tagged_pipe(b"one"), tagged_pipe(b"two")
        ta.write_fds(b"first", [r1])
        ta.write(b"second")
        ta.write_fds(b"third", [r2, r1])
        os.close(r1)
        os.close(r2)
        first, second, third = await pb.wait_messages(3)
        assert all(isinstance(m, AncillaryMessage) for m in (first, second, third))
        assert [m.data for m in (first, second, third)] == [b"first", b"second", b"third"]
        assert all(isinstance(fd, OwnedFd) for fd in first.fds + third.fds)
        assert read_all(first.fds[0]) == b"one"
        assert second.fds == ()
        assert read_all(third.fds[0]) == b"two"
        assert read_all(third.fds[1]) == b""  # the same pipe as the first message's: drained


async def test_writelines_sends_one_message_per_item() -> None:
    async with transport_pair() as (ta, _pa, _tb, pb):
        ta.writelines([b"a", bytearray(b"bc"), memoryview(b"def"), b""])
        msgs = await pb.wait_messages(4)
        assert [m.data for m in msgs] == [b"a", b"bc", b"def", b""]


async def test_get_extra_info() -> None:
    async with transport_pair() as (ta, _pa, tb, _pb):
        sock = ta.get_extra_info("socket")
        assert isinstance(sock, socket.socket)
        assert sock.family == socket.AF_UNIX
        assert ta.get_extra_info("sockname") == ""  # socketpair ends are unnamed
        assert ta.get_extra_info("peername") == ""
        assert ta.get_extra_info("peercred") == ME
        assert tuple(tb.get_extra_info("peercred")) == (os.getpid(), os.getuid(), os.getgid())
        assert ta.get_extra_info("framed") is True
        assert ta.get_extra_info("socket_type") == socket.SOCK_STREAM
        assert ta.get_extra_info("no-such-key") is None
        assert ta.get_extra_info("no-such-key", 42) == 42


async def test_is_closing_and_close_is_idempotent() -> None:
    async with transport_pair() as (ta, pa, _tb, _pb):
        assert not ta.is_closing()
        assert ta.is_reading()
        ta.close()
        assert ta.is_closing()
        assert not ta.is_reading()
        ta.close()
        assert await within(pa.lost) is None
        assert pa.events == ["made", "lost"]
        with pytest.raises(ConnectionClosedError):
            ta.write(b"late")


async def test_close_sends_everything_queued_first() -> None:
    async with transport_pair() as (ta, pa, tb, pb):
        tb.pause_reading()
        ta.write(b"\1" * BIG)
        r = tagged_pipe(b"queued")
        ta.write_fds(b"with-fd", [r])
        os.close(r)
        assert ta.get_write_buffer_size() > 0
        assert ta.get_write_buffer_fds() == 1
        ta.close()
        assert ta.is_closing()
        assert not pa.lost.done()
        tb.resume_reading()
        big, small = await pb.wait_messages(2)
        assert big.data == b"\1" * BIG
        assert small.data == b"with-fd"
        assert read_all(small.fds[0]) == b"queued"
        assert await within(pa.lost) is None
        await within(pb.eof.wait())


async def test_abort_drops_the_queue_and_closes_queued_fds() -> None:
    async with transport_pair() as (ta, pa, tb, pb):
        tb.pause_reading()
        ta.write(b"\1" * BIG)
        r, w = os.pipe()
        try:
            ta.write_fds(b"dropped", [w])
            os.close(w)  # the transport's duplicate is now the only write end
            assert ta.get_write_buffer_fds() == 1
            ta.abort()
            assert ta.is_closing()
            assert ta.get_write_buffer_size() == 0
            assert ta.get_write_buffer_fds() == 0
            assert await within(pa.lost) is None
            assert os.read(r, 1) == b""  # EOF: the queued duplicate was closed
        finally:
            os.close(r)
        tb.resume_reading()
        await within(pb.lost)  # the peer sees the connection end; "dropped" never arrives
        assert all(m.data != b"dropped" for m in pb.messages)


async def test_write_fds_caller_may_close_its_fd_while_the_message_is_queued() -> None:
    async with transport_pair() as (ta, _pa, tb, pb):
        tb.pause_reading()
        ta.write(b"\1" * BIG)
        r, w = os.pipe()
        ino = os.fstat(w).st_ino
        ta.write_fds(b"pipe", [w])
        os.close(w)
        # Reuse the number at once: the queued message must still carry the original file.
        decoy_r, decoy_w = os.pipe()
        try:
            tb.resume_reading()
            _, msg = await pb.wait_messages(2)
            (fd,) = msg.fds
            assert os.fstat(fd.fileno()).st_ino == ino
            os.write(fd.fileno(), b"through the received fd")
            fd.close()
            assert read_all(r) == b"through the received fd"
        finally:
            os.close(r)
            os.close(decoy_r)
            os.close(decoy_w)


async def test_write_fds_close_fds_takes_ownership() -> None:
    async with transport_pair() as (ta, _pa, _tb, pb):
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        r3, w3 = os.pipe()
        owned = OwnedFd(w1)
        sock_a, sock_b = socket.socketpair()
        ta.write_fds(b"x", [owned, sock_a, w2, w3], close_fds=True)
        assert owned.closed
        assert sock_a.fileno() == -1  # detached: the transport owns the fd now
        (msg,) = await pb.wait_messages(1)
        with msg:
            assert len(msg.fds) == 4
            os.write(msg.fds[0].fileno(), b"1")
            msg.fds[1].into_socket().close()
            os.write(msg.fds[2].fileno(), b"2")
        # Every write end is closed now: the sender's originals too.
        assert read_all(r1) == b"1"
        assert read_all(r2) == b"2"
        assert read_all(r3) == b""
        assert sock_b.recv(1) == b""
        for fd in (r1, r2, r3):
            os.close(fd)
        sock_b.close()


async def test_write_validation_refuses_and_queues_nothing() -> None:
    async with transport_pair() as (ta, _pa, _tb, pb):
        r = tagged_pipe(b"ok")
        try:
            with pytest.raises(TooManyFdsError):
                ta.write_fds(b"x", [r] * (SCM_MAX_FD + 1))
            closed_r, closed_w = os.pipe()
            os.close(closed_r)
            os.close(closed_w)
            with pytest.raises(InvalidFdError):
                ta.write_fds(b"x", [r, closed_r])
            with pytest.raises(InvalidFdError):
                ta.write_fds(b"x", [-1])
            with pytest.raises(ValueError, match="max_message_size"):
                ta.write(b"\0" * ((1 << 20) + 1))
            assert ta.get_write_buffer_size() == 0
            assert ta.get_write_buffer_fds() == 0
            ta.write_fds(b"still usable", [r])
        finally:
            os.close(r)
        (msg,) = await pb.wait_messages(1)
        assert msg.data == b"still usable"
        assert read_all(msg.fds[0]) == b"ok"


async def test_write_validation_while_queued_refuses_a_closed_fd() -> None:
    """A closed fd in the list is refused when the message must be queued (duplicated) too.

    ``dup()`` returns the lowest free number: if that is the closed fd's number, duplicating
    the fds in order would make the closed entry a copy of an earlier one.
    """
    async with transport_pair() as (ta, _pa, tb, pb):
        tb.pause_reading()
        ta.set_write_buffer_limits(high=4 * BIG)
        ta.write(b"\0" * BIG)
        assert ta.get_write_buffer_size() > 0  # later writes are queued, as duplicates
        r = tagged_pipe(b"ok")
        closed = os.open(os.devnull, os.O_RDONLY)
        os.close(closed)  # now the lowest free number: the next dup() returns it
        try:
            queued = ta.get_write_buffer_fds()
            with pytest.raises(InvalidFdError):
                ta.write_fds(b"x", [r, closed])
            assert ta.get_write_buffer_fds() == queued
            with pytest.raises(InvalidFdError):
                ta.write_fds(b"x", [closed])
            ta.write_fds(b"still usable", [r])
        finally:
            os.close(r)
        tb.resume_reading()
        big, msg = await pb.wait_messages(2)
        assert len(big.data) == BIG
        assert msg.data == b"still usable"
        assert read_all(msg.fds[0]) == b"ok"


async def test_raw_stream_refuses_fds_without_data() -> None:
    async with transport_pair(framed=False) as (ta, _pa, _tb, _pb):
        assert ta.get_extra_info("framed") is False
        r = tagged_pipe(b"")
        try:
            with pytest.raises(ValueError, match="at least one byte"):
                ta.write_fds(b"", [r])
        finally:
            os.close(r)


async def test_pause_and_resume_reading() -> None:
    async with transport_pair() as (ta, _pa, tb, pb):
        tb.pause_reading()
        assert not tb.is_reading()
        tb.pause_reading()  # idempotent
        ta.write(b"while paused")
        await asyncio.sleep(0.05)  # an absence check: give the loop every chance to deliver
        assert pb.messages == []
        tb.resume_reading()
        assert tb.is_reading()
        tb.resume_reading()
        (msg,) = await pb.wait_messages(1)
        assert msg.data == b"while paused"


async def test_pause_reading_in_connection_made_is_honoured() -> None:
    """asyncio's transports honour pause_reading() called from connection_made."""
    loop = asyncio.get_running_loop()

    class PausesAtOnce(RecordingProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            assert isinstance(transport, AncillaryTransport)
            transport.pause_reading()

    left, right = socket.socketpair()
    proto = PausesAtOnce()
    transport = AncillaryTransport(loop, right, proto)
    try:
        left.sendall(frame_header(0, 3) + b"abc")
        await asyncio.sleep(0.05)  # an absence check
        assert not transport.is_reading()
        assert proto.messages == []
        transport.resume_reading()
        (msg,) = await proto.wait_messages(1)
        assert msg.data == b"abc"
    finally:
        left.close()
        transport.abort()
        await within(proto.lost)


async def test_eof_closes_the_transport_unless_the_protocol_keeps_it() -> None:
    async with transport_pair() as (ta, _pa, tb, pb):
        ta.write_eof()
        assert await within(pb.lost) is None  # eof_received returned None: transport closed
        assert pb.events == ["made", "eof", "lost"]
        assert tb.is_closing()


async def test_peer_close_calls_connection_lost_with_none() -> None:
    async with transport_pair() as (ta, pa, _tb, pb):
        ta.close()
        assert await within(pa.lost) is None
        assert await within(pb.lost) is None


async def test_protocol_error_reaches_connection_lost() -> None:
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    proto = RecordingProtocol()
    transport = AncillaryTransport(loop, right, proto)
    try:
        r = tagged_pipe(b"")
        socket.send_fds(left, [frame_header(0, 2) + b"ok" + b"garbage!"], [r])
        os.close(r)
        exc = await within(proto.lost)
        assert isinstance(exc, ProtocolError)
        assert [m.data for m in proto.messages] == [b"ok"]  # decoded before the fault
        assert transport.is_closing()
    finally:
        proto.close_messages()
        left.close()


async def test_seqpacket_transport_keeps_message_boundaries() -> None:
    async with transport_pair(socket.SOCK_SEQPACKET) as (ta, _pa, _tb, pb):
        assert ta.get_extra_info("framed") is False
        assert ta.get_extra_info("socket_type") == socket.SOCK_SEQPACKET
        r = tagged_pipe(b"seq")
        ta.write_fds(b"one", [r])
        os.close(r)
        ta.write(b"two")
        ta.writelines([b"three", b"four"])
        msgs = await pb.wait_messages(4)
        assert [m.data for m in msgs] == [b"one", b"two", b"three", b"four"]
        assert read_all(msgs[0].fds[0]) == b"seq"


async def test_raw_stream_transport_delivers_reads() -> None:
    async with transport_pair(framed=False) as (ta, _pa, _tb, pb):
        r = tagged_pipe(b"raw")
        ta.write_fds(b"abc", [r])
        os.close(r)
        ta.write(b"def")
        await wait_until(lambda: sum(len(m.data) for m in pb.messages) == 6)
        assert b"".join(m.data for m in pb.messages) == b"abcdef"
        fds = [fd for m in pb.messages for fd in m.fds]
        assert len(fds) == 1
        assert read_all(fds[0]) == b"raw"


async def test_transport_requires_an_af_unix_socket() -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock, pytest.raises(ValueError, match="AF_UNIX"):
        AncillaryTransport(loop, sock, RecordingProtocol())


async def test_repr_tells_the_state() -> None:
    async with transport_pair() as (ta, pa, _tb, _pb):
        assert "open" in repr(ta)
        assert "framed" in repr(ta)
        ta.close()
        assert "closing" in repr(ta)
        await within(pa.lost)
        assert "closed" in repr(ta)


async def test_close_fds_refuses_the_same_fd_twice_and_closes_it() -> None:
    a, b = await connection_pair()
    r, w = os.pipe()
    try:
        owned = OwnedFd(os.dup(w))
        num = owned.fileno()
        with pytest.raises(ValueError, match="twice"):
            await a.send_fds(b"x", [owned, num], close_fds=True)
        assert owned.closed  # handed over: closed on refusal, like every other refusal
        assert not is_open(num)
    finally:
        os.close(r)
        os.close(w)
        a.abort()
        b.abort()
        await a.wait_closed()
        await b.wait_closed()


async def test_seqpacket_empty_messages_without_so_passcred() -> None:
    """The portable path (no SO_PASSCRED, as on macOS/BSD), simulated on Linux."""
    cloexec = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bsd = Platform("freebsd", 253, cloexec)
    a = AncillaryConnection(left, platform=bsd)
    b = AncillaryConnection(right, platform=bsd)
    try:
        await a.send(b"")
        await a.send(b"after")
        first = await within(b.recv())
        second = await within(b.recv())
        assert (first.data, second.data) == (b"", b"after")
        await a.send(b"")  # the peer is alive and nothing follows yet: still a message
        with await within(b.recv()) as msg:
            assert msg.data == b""
        a.close()
        await a.wait_closed()
        with pytest.raises(ConnectionClosedError):
            await within(b.recv())  # end of stream, not an endless run of empty messages
    finally:
        a.abort()
        b.abort()
        await a.wait_closed()
        await b.wait_closed()
