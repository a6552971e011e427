"""AncillaryConnection: send/recv/iteration/closing, framing over real sockets, backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Callable

import pytest
from helpers import (
    BIG,
    close_all,
    drain_big,
    fill_until_queued,
    half_raw,
    nofile_at_least,
    open_fd_count,
    pair,
    read_all,
    read_tags,
    tagged_pipe,
    tagged_pipes,
    wait_until,
    within,
)

from aioancillary import (
    FRAME_HEADER_SIZE,
    SCM_MAX_FD,
    AncillaryConnection,
    AncillaryError,
    AncillaryMessage,
    AncillaryTransport,
    ConnectionClosedError,
    Credentials,
    DataTruncatedError,
    OwnedFd,
    ProtocolError,
    connection_pair,
    frame_header,
    open_unix_connection,
)

ME = Credentials(os.getpid(), os.getuid(), os.getgid())


async def recv_until_error(
    conn: AncillaryConnection, check: Callable[[AncillaryMessage], bool] = lambda _m: True
) -> None:
    """Receive (and close) messages until ``recv`` raises; each must pass ``check``."""
    while True:
        with await within(conn.recv()) as msg:
            assert check(msg), msg


# -- sending and receiving --------------------------------------------------------------------


async def test_send_fds_and_recv() -> None:
    async with pair() as (a, b):
        r = tagged_pipe(b"hello")
        await a.send_fds(b"data", [r])
        os.close(r)
        msg = await within(b.recv())
        with msg:
            assert isinstance(msg, AncillaryMessage)
            assert msg.data == b"data"
            (fd,) = msg.fds
            assert isinstance(fd, OwnedFd)
            assert read_all(fd) == b"hello"
        assert msg.fds == ()
        assert fd.closed


async def test_send_without_fds_both_ways() -> None:
    async with pair() as (a, b):
        await a.send(b"ping")
        with await within(b.recv()) as msg:
            assert (msg.data, msg.fds) == (b"ping", ())
        await b.send(b"pong")
        with await within(a.recv()) as msg:
            assert msg.data == b"pong"


async def test_recv_returns_messages_in_order() -> None:
    async with pair() as (a, b):
        for i in range(50):
            await a.send(b"%d" % i)
        for i in range(50):
            with await within(b.recv()) as msg:
                assert msg.data == b"%d" % i


async def test_recv_batch_hands_over_everything_queued() -> None:
    async with pair() as (a, b):
        pipes = tagged_pipes(range(20))
        for i, r in enumerate(pipes):
            await a.send_fds(b"%d" % i, [r])
        for r in pipes:
            os.close(r)
        received: list[AncillaryMessage] = []
        while len(received) < 20:
            batch = await within(b.recv_batch())
            assert batch  # never empty
            received.extend(batch)
        assert len(received) == 20
        for i, msg in enumerate(received):
            with msg:
                assert msg.data == b"%d" % i
                assert read_tags(msg.fds) == [b"%d" % i]


async def test_recv_batch_gets_several_messages_from_one_read() -> None:
    async with pair() as (a, b):
        b.transport.pause_reading()
        for i in range(10):
            await a.send(b"%d" % i)
        await wait_until(lambda: a.transport.get_write_buffer_size() == 0)
        b.transport.resume_reading()
        batch = await within(b.recv_batch())
        assert [m.data for m in batch] == [b"%d" % i for i in range(10)]


async def test_async_for_ends_cleanly_at_eof() -> None:
    async with pair() as (a, b):
        pipes = tagged_pipes(range(5))
        for i, r in enumerate(pipes):
            await a.send_fds(b"%d" % i, [r])
        for r in pipes:
            os.close(r)
        a.close()
        seen = []
        async with asyncio.timeout(5):
            async for msg in b:
                with msg:
                    seen.append((msg.data, read_tags(msg.fds)))
        assert seen == [(b"%d" % i, [b"%d" % i]) for i in range(5)]


async def test_async_for_ends_at_the_peer_write_eof_and_replies_still_go_out() -> None:
    async with pair() as (a, b):
        await a.send(b"question")
        a.write_eof()
        async with asyncio.timeout(5):
            async for msg in b:
                with msg:
                    await b.send(b"answer to " + msg.data)
        with await within(a.recv()) as msg:
            assert msg.data == b"answer to question"


async def test_recv_raises_connection_closed_after_eof() -> None:
    async with pair() as (a, b):
        await a.send(b"last")
        a.close()
        with await within(b.recv()) as msg:
            assert msg.data == b"last"
        for _ in range(2):
            with pytest.raises(ConnectionClosedError):
                await within(b.recv())
        with pytest.raises(ConnectionClosedError):
            await within(b.recv_batch())
        assert isinstance(ConnectionClosedError(), ConnectionError)


async def test_recv_wakes_up_at_eof() -> None:
    async with pair() as (a, b):
        waiting = asyncio.create_task(b.recv())
        await asyncio.sleep(0)
        a.close()
        with pytest.raises(ConnectionClosedError):
            await within(waiting)


async def test_concurrent_recv_is_refused() -> None:
    async with pair() as (a, b):
        first = asyncio.create_task(b.recv())
        await asyncio.sleep(0)  # first is now waiting
        with pytest.raises(RuntimeError, match="another task"):
            await within(b.recv())
        with pytest.raises(RuntimeError):
            await within(b.recv_batch())

        async def iterate() -> None:
            async for _msg in b:
                pass

        with pytest.raises(RuntimeError):
            await within(iterate())
        # The first receiver is unaffected.
        await a.send(b"for the first")
        with await within(first) as msg:
            assert msg.data == b"for the first"


async def test_send_after_close_raises() -> None:
    async with pair() as (a, _b):
        a.close()
        assert a.is_closing()
        with pytest.raises(ConnectionClosedError):
            await a.send(b"x")
        r, w = os.pipe()
        os.close(r)
        with pytest.raises(ConnectionClosedError):
            await a.send_fds(b"x", [w])
        os.fstat(w)  # a borrowed fd stays open when the send is refused
        with pytest.raises(ConnectionClosedError):
            await a.send_fds(b"x", [w], close_fds=True)
        with pytest.raises(OSError, match=os.strerror(errno.EBADF)):
            os.fstat(w)  # given with close_fds=True: closed even though refused


async def test_send_to_a_closed_peer_raises_connection_closed() -> None:
    async with pair() as (a, b):
        b.close()
        await within(b.wait_closed())

        async def send_until_refused() -> None:
            for _ in range(100):  # the first sends may still be taken by the kernel
                await a.send(b"into the void")

        with pytest.raises(ConnectionClosedError):
            await send_until_refused()
        assert a.is_closing()
        with pytest.raises(ConnectionClosedError):
            await a.send(b"again")


@pytest.mark.parametrize(
    "sock_type", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"]
)
async def test_messages_sent_before_the_peer_left_are_still_received(sock_type: int) -> None:
    """Our send fails (the peer is gone), but what it sent before leaving is still ours."""
    async with pair(sock_type) as (a, b):
        a.transport.pause_reading()
        pipes = tagged_pipes(range(3))
        for i, r in enumerate(pipes):
            await b.send_fds(b"%d" % i, [r])
        for r in pipes:
            os.close(r)
        b.close()
        await within(b.wait_closed())

        async def send_until_refused() -> None:
            for _ in range(100):
                await a.send(b"to nobody")

        with pytest.raises(ConnectionClosedError):
            await within(send_until_refused())
        a.transport.resume_reading()
        for i in range(3):
            with await within(a.recv()) as msg:
                assert msg.data == b"%d" % i
                assert read_tags(msg.fds) == [b"%d" % i]
        with pytest.raises(ConnectionClosedError):
            await within(a.recv())


async def test_recv_after_local_close_raises_and_queued_messages_are_closed() -> None:
    async with pair(max_queued_fds=0) as (a, b):
        r, w = os.pipe()
        await a.send_fds(b"never read", [w])
        os.close(w)
        # With a budget of 0 fds, the first queued fd pauses reading: the message is queued.
        await wait_until(lambda: not b.transport.is_reading())
        b.close()  # closes the received message's fd
        assert os.read(r, 1) == b""  # every write end is closed: the queued one included
        os.close(r)
        with pytest.raises(ConnectionClosedError):
            await within(b.recv())
        b.close()  # idempotent
        await within(b.wait_closed())


async def test_recv_in_progress_is_woken_by_local_close() -> None:
    async with pair() as (_a, b):
        waiting = asyncio.create_task(b.recv())
        await asyncio.sleep(0)
        b.close()
        with pytest.raises(ConnectionClosedError):
            await within(waiting)


async def test_async_with_closes_and_waits() -> None:
    a, b = await connection_pair()
    async with a as entered:
        assert entered is a
        await a.send(b"x")
    assert a.is_closing()
    with pytest.raises(ConnectionClosedError):
        await a.send(b"y")
    async with b:
        with await within(b.recv()) as msg:
            assert msg.data == b"x"


async def test_close_sends_queued_messages_first() -> None:
    async with pair() as (a, b):
        b.transport.pause_reading()
        fill_until_queued(a)
        r = tagged_pipe(b"after the big one")
        await a.send_fds(b"tail", [r])
        os.close(r)
        a.close()
        b.transport.resume_reading()
        await drain_big(b)
        with await within(b.recv()) as msg:
            assert msg.data == b"tail"
            assert read_tags(msg.fds) == [b"after the big one"]
        await within(a.wait_closed())
        with pytest.raises(ConnectionClosedError):
            await within(b.recv())


async def test_abort_drops_queued_messages() -> None:
    async with pair() as (a, b):
        b.transport.pause_reading()
        fill_until_queued(a)
        r, w = os.pipe()
        await a.send_fds(b"dropped", [w])
        os.close(w)
        a.abort()
        await within(a.wait_closed())
        assert os.read(r, 1) == b""  # the queued duplicate was closed
        os.close(r)
        b.transport.resume_reading()
        with pytest.raises(AncillaryError):  # the big message was cut: ProtocolError
            await recv_until_error(b, lambda msg: msg.data != b"dropped")


async def test_drain() -> None:
    async with pair() as (a, b):
        await within(a.drain())  # nothing queued: returns at once
        a.transport.set_write_buffer_limits(high=1024)
        b.transport.pause_reading()
        a.transport.write(b"\0" * BIG)
        drained = asyncio.create_task(a.drain())
        await asyncio.sleep(0.01)
        assert not drained.done()
        b.transport.resume_reading()
        await within(drained)
        assert a.transport.get_write_buffer_size() <= 256
        await drain_big(b)


async def test_drain_raises_when_the_connection_failed() -> None:
    async with pair() as (a, b):
        a.transport.set_write_buffer_limits(high=1024)
        b.transport.pause_reading()
        a.transport.write(b"\0" * BIG)
        drained = asyncio.create_task(a.drain())
        await asyncio.sleep(0)
        b.abort()
        with pytest.raises(ConnectionClosedError):
            await within(drained)
        with pytest.raises(ConnectionClosedError):
            await within(a.drain())


# -- fd ownership when sending ----------------------------------------------------------------


@pytest.mark.parametrize("queued", [False, True], ids=["sent-at-once", "queued"])
async def test_send_fds_borrows_and_caller_may_close_right_after(queued: bool) -> None:
    async with pair() as (a, b):
        if queued:
            b.transport.pause_reading()
            fill_until_queued(a)
        r, w = os.pipe()
        ino = os.fstat(w).st_ino
        wfile = os.fdopen(w, "wb", buffering=0)
        await a.send_fds(b"pipe", [wfile])
        assert not wfile.closed  # borrowed: still open after send_fds
        wfile.close()
        # Take the number back at once with another file: the message must not follow it.
        decoy = os.open(os.devnull, os.O_RDONLY)
        try:
            if queued:
                assert a.transport.get_write_buffer_fds() == 1
                b.transport.resume_reading()
                await drain_big(b)
            with await within(b.recv()) as msg:
                (fd,) = msg.fds
                assert os.fstat(fd.fileno()).st_ino == ino
                os.write(fd.fileno(), b"written through the received fd")
            assert read_all(r) == b"written through the received fd"
        finally:
            os.close(decoy)
            os.close(r)


async def test_send_fds_close_fds_takes_ownership() -> None:
    async with pair() as (a, b):
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        owned = OwnedFd(w1)
        s1, s2 = socket.socketpair()
        await a.send_fds(b"x", [owned, s1, w2], close_fds=True)
        assert owned.closed  # detached from the caller
        assert s1.fileno() == -1
        with await within(b.recv()) as msg:
            f0, f1, f2 = msg.fds
            os.write(f0.fileno(), b"A")
            os.write(f2.fileno(), b"B")
            with f1.into_socket() as passed:
                passed.sendall(b"C")
        # The received copies are closed, and so are the sender's: every reader sees EOF.
        assert read_all(r1) == b"A"
        assert read_all(r2) == b"B"
        assert s2.recv(10) == b"C"
        assert s2.recv(10) == b""
        os.close(r1)
        os.close(r2)
        s2.close()


async def test_send_fds_close_fds_refuses_unownable_items() -> None:
    async with pair() as (a, _b):
        r, w = os.pipe()
        with os.fdopen(w, "wb") as f, pytest.raises(TypeError):
            await a.send_fds(b"x", [f], close_fds=True)
        os.close(r)


async def test_peercred_and_extra_info() -> None:
    async with pair() as (a, b):
        assert a.peercred == ME
        assert b.peercred == (os.getpid(), os.getuid(), os.getgid())
        assert isinstance(a.transport, AncillaryTransport)
        assert isinstance(a.get_extra_info("socket"), socket.socket)
        assert a.get_extra_info("framed") is True
        assert a.get_extra_info("missing", "d") == "d"
        assert "AncillaryConnection" in repr(a)


async def test_open_unix_connection_wraps_a_connected_socket() -> None:
    left, right = socket.socketpair()
    conn = await open_unix_connection(sock=left)
    try:
        r = tagged_pipe(b"via sock=")
        await conn.send_fds(b"hi", [r])
        os.close(r)
        right.setblocking(False)
        loop = asyncio.get_running_loop()
        header = await within(loop.sock_recv(right, FRAME_HEADER_SIZE + 2))
        assert header == frame_header(1, 2) + b"hi"
    finally:
        right.close()
        await close_all(conn)


# -- socket types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sock_type",
    [socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM],
    ids=["stream", "seqpacket", "dgram"],
)
async def test_connection_pair_carries_messages_and_fds(sock_type: int) -> None:
    async with pair(sock_type) as (a, b):
        assert a.get_extra_info("socket_type") == sock_type
        pipes = tagged_pipes(range(30))
        for i in range(30):
            fds = [pipes[i]] if i % 3 else []  # every third message carries no fd
            await a.send_fds(b"msg %d" % i, fds)
        for r in pipes:
            os.close(r)
        for i in range(30):
            with await within(b.recv()) as msg:
                assert msg.data == b"msg %d" % i
                assert read_tags(msg.fds) == ([b"%d" % i] if i % 3 else [])
        await b.send(b"back")
        with await within(a.recv()) as msg:
            assert msg.data == b"back"


@pytest.mark.parametrize(
    "sock_type",
    [socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM],
    ids=["stream", "seqpacket", "dgram"],
)
async def test_flood_of_messages_with_fds_arrives_in_order(sock_type: int) -> None:
    """More messages than the kernel queue holds (the sender waits for the writer)."""
    count = 500
    async with pair(sock_type) as (a, b):

        async def sender() -> None:
            for i in range(count):
                r = tagged_pipe(b"%d" % i)
                try:
                    await a.send_fds(b"%d" % i, [r])
                finally:
                    os.close(r)

        task = asyncio.create_task(sender())
        for i in range(count):
            with await within(b.recv()) as msg:
                assert msg.data == b"%d" % i
                assert read_tags(msg.fds) == [b"%d" % i]
        await within(task)


@pytest.mark.parametrize(
    "sock_type", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"]
)
async def test_connection_pair_peer_close_ends_iteration(sock_type: int) -> None:
    async with pair(sock_type) as (a, b):
        await a.send(b"one")
        a.close()
        got = [m.data async for m in b]
        assert got == [b"one"]


@pytest.mark.parametrize(
    "sock_type",
    [socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM],
    ids=["stream", "seqpacket", "dgram"],
)
async def test_empty_messages_are_messages(sock_type: int) -> None:
    """An empty send arrives as an empty message, never as a silent end of the connection.

    On SOCK_SEQPACKET an empty record without fds reads exactly like EOF (``recvmsg``
    returns 0 for both), so the library may refuse to send one; with fds it is unambiguous.
    """
    async with pair(sock_type) as (a, b):
        r = tagged_pipe(b"after empty")
        try:
            expected: list[tuple[bytes, list[bytes]]] = []
            refused: ValueError | None = None
            try:
                await a.send(b"")
            except ValueError as exc:
                refused = exc
            if refused is None:
                expected.append((b"", []))
            else:
                assert sock_type == socket.SOCK_SEQPACKET, refused
            await a.send_fds(b"", [r])
            await a.send_fds(b"x", [r])
        finally:
            os.close(r)
        expected += [(b"", [b"after empty"]), (b"x", [b""])]  # the pipe was drained
        for data, tags in expected:
            with await within(b.recv()) as msg:
                assert msg.data == data
                assert read_tags(msg.fds) == tags


@pytest.mark.parametrize(
    "sock_type", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM], ids=["seqpacket", "dgram"]
)
async def test_message_too_big_for_the_kernel_leaves_the_connection_usable(
    sock_type: int,
) -> None:
    """A datagram the kernel refuses (EMSGSIZE) sent nothing: the connection must survive.

    300 KiB is below the default ``max_message_size`` (1 MiB) but above a Unix datagram
    socket's default send buffer (about 208 KiB), so ``sendmsg`` fails before sending.
    """
    async with pair(sock_type) as (a, b):
        with pytest.raises((OSError, ValueError)) as info:
            await a.send(b"\0" * (300 * 1024))
        assert not isinstance(info.value, ConnectionClosedError)
        assert not a.is_closing()
        await a.send(b"small")
        with await within(b.recv()) as msg:
            assert msg.data == b"small"


@pytest.mark.parametrize(
    "sock_type", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM], ids=["seqpacket", "dgram"]
)
async def test_message_too_big_for_the_kernel_while_queued(sock_type: int) -> None:
    """The same datagram, written while earlier ones wait in the queue (socket full).

    Refusing it at write time, or dropping it alone when its turn comes, are both fine; the
    connection and the messages around it must survive.
    """
    async with pair(sock_type) as (a, b):
        b.transport.pause_reading()
        a.transport.set_write_buffer_limits(high=1 << 30)
        count = 0
        while a.transport.get_write_buffer_size() == 0:
            a.transport.write(b"%d" % count)
            count += 1
        with contextlib.suppress(ValueError):  # MessageTooLargeError at write time is fine
            a.transport.write(b"\0" * (300 * 1024))
        a.transport.write(b"after")
        b.transport.resume_reading()
        for i in range(count):
            with await within(b.recv()) as msg:
                assert msg.data == b"%d" % i
        with await within(b.recv(), 1.0) as msg:  # dgram has no EOF: a lost one times out
            assert msg.data == b"after"
        assert not a.is_closing()


# -- framing over a real socket ---------------------------------------------------------------


async def test_many_framed_messages_each_with_its_own_fds() -> None:
    """Messages with 0, 1, a few and 253 fds, empty and large, written back to back."""
    sizes = [0, 1, 3, SCM_MAX_FD, 0, 2, SCM_MAX_FD, 1, 0, 5] * 6
    payloads = [b"", b"x", b"%d" % 7, b"\xff" * 70_000, b"", b"y" * 9000] * 10
    with nofile_at_least(4096):
        async with pair() as (a, b):

            async def sender() -> None:
                for i, nfds in enumerate(sizes):
                    pipes = tagged_pipes(b"%d/%d" % (i, k) for k in range(nfds))
                    try:
                        await a.send_fds(payloads[i], pipes)
                    finally:
                        for r in pipes:
                            os.close(r)

            async with asyncio.timeout(10):
                task = asyncio.create_task(sender())
                for i, nfds in enumerate(sizes):
                    with await b.recv() as msg:
                        assert msg.data == payloads[i]
                        assert read_tags(msg.fds) == [b"%d/%d" % (i, k) for k in range(nfds)]
                await task


async def test_large_payload_spans_many_reads() -> None:
    payload = os.urandom(300 * 1024)
    async with pair() as (a, b):
        r = tagged_pipe(b"big")
        await a.send_fds(payload, [r])
        await a.send_fds(payload[::-1], [r, r])
        os.close(r)
        with await within(b.recv()) as msg:
            assert msg.data == payload
            assert read_tags(msg.fds) == [b"big"]
        with await within(b.recv()) as msg:
            assert msg.data == payload[::-1]
            assert len(msg.fds) == 2


async def test_message_of_max_message_size() -> None:
    async with pair(max_message_size=BIG) as (a, b):
        await a.send(b"\7" * BIG)
        with pytest.raises(ValueError, match="max_message_size"):
            await a.send(b"\7" * (BIG + 1))
        with await within(b.recv()) as msg:
            assert msg.data == b"\7" * BIG


async def test_fds_identified_by_inode_across_many_messages() -> None:
    async with pair() as (a, b):
        pipes = [os.pipe() for _ in range(100)]
        try:
            inode_to_index = {os.fstat(r).st_ino: i for i, (r, _w) in enumerate(pipes)}
            for i, (r, _w) in enumerate(pipes):
                a.transport.write_fds(b"%d" % i, [r])  # synchronous: one batch per iteration
            for i in range(100):
                with await within(b.recv()) as msg:
                    (fd,) = msg.fds
                    assert inode_to_index[os.fstat(fd.fileno()).st_ino] == i
                    assert msg.data == b"%d" % i
        finally:
            for r, w in pipes:
                os.close(r)
                os.close(w)


# -- a peer that breaks the framing protocol --------------------------------------------------


async def _expect_protocol_error(conn: AncillaryConnection) -> None:
    with pytest.raises(ProtocolError):
        await recv_until_error(conn)
    await within(conn.wait_closed())
    assert conn.is_closing()
    with pytest.raises((ProtocolError, ConnectionClosedError)):
        await within(conn.recv())
    with pytest.raises(ConnectionClosedError):
        await conn.send(b"x")


async def test_garbage_bytes_raise_protocol_error() -> None:
    async with half_raw() as (conn, peer):
        before = open_fd_count()
        r = tagged_pipe(b"")
        socket.send_fds(peer, [b"GET / HTTP/1.1\r\n\r\n"], [r])
        os.close(r)
        await _expect_protocol_error(conn)
        assert open_fd_count() <= before  # the garbage's fd was closed


async def test_header_claiming_fds_that_never_come() -> None:
    async with half_raw() as (conn, peer):
        peer.sendall(frame_header(2, 3) + b"abc")
        await _expect_protocol_error(conn)


async def test_header_claiming_more_fds_than_sent() -> None:
    async with half_raw() as (conn, peer):
        r = tagged_pipe(b"")
        socket.send_fds(peer, [frame_header(3, 1) + b"a"], [r])
        os.close(r)
        await _expect_protocol_error(conn)


async def test_oversized_length_raises_protocol_error() -> None:
    async with half_raw(max_message_size=1000) as (conn, peer):
        peer.sendall(frame_header(0, 1001))
        await _expect_protocol_error(conn)


async def test_fds_no_frame_claims_raise_protocol_error_at_eof() -> None:
    async with half_raw() as (conn, peer):
        r = tagged_pipe(b"")
        socket.send_fds(peer, [frame_header(0, 2) + b"ok"], [r, r])  # 2 fds, none claimed
        os.close(r)
        peer.shutdown(socket.SHUT_WR)
        with await within(conn.recv()) as msg:
            assert (msg.data, msg.fds) == (b"ok", ())
        await _expect_protocol_error(conn)


async def test_valid_messages_before_the_fault_are_delivered() -> None:
    async with half_raw() as (conn, peer):
        r = tagged_pipe(b"good")
        socket.send_fds(peer, [frame_header(1, 4) + b"good"], [r])
        os.close(r)
        peer.sendall(frame_header(0, 3) + b"two" + b"\x02\x00" + b"junk...")
        with await within(conn.recv()) as msg:
            assert msg.data == b"good"
            assert read_tags(msg.fds) == [b"good"]
        with await within(conn.recv()) as msg:
            assert msg.data == b"two"
        await _expect_protocol_error(conn)


async def test_peer_closing_mid_frame_raises_protocol_error() -> None:
    async with half_raw() as (conn, peer):
        r = tagged_pipe(b"")
        socket.send_fds(peer, [frame_header(1, 100) + b"only part"], [r])
        os.close(r)
        peer.shutdown(socket.SHUT_WR)
        await _expect_protocol_error(conn)


async def test_async_for_raises_protocol_error() -> None:
    async with half_raw() as (conn, peer):
        peer.sendall(frame_header(0, 1) + b"a" + b"\xff" * 8)
        seen = []

        async def iterate() -> None:
            async for msg in conn:
                seen.append(msg.data)

        with pytest.raises(ProtocolError):
            await within(iterate())
        assert seen == [b"a"]


@pytest.mark.parametrize(
    "sock_type", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM], ids=["seqpacket", "dgram"]
)
async def test_oversized_datagram_is_reported_and_its_fds_closed(sock_type: int) -> None:
    async with half_raw(sock_type, max_message_size=100) as (conn, peer):
        r = tagged_pipe(b"")
        socket.send_fds(peer, [b"fits"], [r])
        socket.send_fds(peer, [b"\0" * 200], [r, r])  # cut by the 100-byte receive buffer
        os.close(r)
        with await within(conn.recv()) as msg:
            assert msg.data == b"fits"
        with pytest.raises(DataTruncatedError):
            await within(conn.recv())
        await within(conn.wait_closed())


async def test_recv_after_peer_reset_raises_connection_closed() -> None:
    """A peer that closes with unread data makes the kernel report ECONNRESET.

    ``recv`` documents ConnectionClosedError (or ProtocolError) only; a bare
    ``ConnectionResetError`` escapes the library's exception tree.
    """
    async with pair() as (a, b):
        b.transport.pause_reading()
        await a.send(b"never read by b")
        b.close()  # b's kernel queue still holds the message: a gets ECONNRESET
        await within(b.wait_closed())
        with pytest.raises(ConnectionClosedError):
            await within(a.recv())


# -- receive-side backpressure ----------------------------------------------------------------


async def test_slow_receiver_bounds_the_fds_it_holds() -> None:
    """A flood of 253-fd messages: the receiver stops reading instead of filling its fd table.

    Both ends live in this process, so the bound counts both: the receiver's queue budget
    (4 * 253, plus one read beyond it), fds waiting in its frame decoder (at most 2 * 253), the
    message the consumer holds (253), and the sender's queued duplicates (its fd high-water
    mark of 2 * 253, plus the message that crossed it).
    """
    count = 40  # 10120 fds in all: far above the bound
    bound = 4 * SCM_MAX_FD + SCM_MAX_FD + 2 * SCM_MAX_FD + SCM_MAX_FD + 3 * SCM_MAX_FD + 32
    assert count * SCM_MAX_FD > 3 * bound
    with nofile_at_least(16384):
        async with pair() as (a, b):
            baseline = open_fd_count()
            r = tagged_pipe(b"")

            async def flood() -> None:
                for i in range(count):
                    await a.send_fds(b"%d" % i, [r] * SCM_MAX_FD)

            peak = 0
            reading_states = set()
            try:
                async with asyncio.timeout(10):
                    task = asyncio.create_task(flood())
                    for i in range(count):
                        await asyncio.sleep(0.001)  # a slow consumer
                        peak = max(peak, open_fd_count() - baseline)
                        reading_states.add(b.transport.is_reading())
                        with await b.recv() as msg:
                            assert msg.data == b"%d" % i
                            assert len(msg.fds) == SCM_MAX_FD
                    await task
            finally:
                os.close(r)
            assert peak <= bound, f"receiver held {peak} fds (bound {bound})"
            assert False in reading_states  # reading was paused at some point
            assert b.transport.is_reading()  # and resumed


async def test_max_queued_fds_is_honoured() -> None:
    async with pair(max_queued_fds=10) as (a, b):
        r = tagged_pipe(b"")
        try:
            for i in range(30):
                await a.send_fds(b"%d" % i, [r, r])
        finally:
            os.close(r)
        await wait_until(lambda: not b.transport.is_reading())
        for i in range(30):
            with await within(b.recv()) as msg:
                assert msg.data == b"%d" % i
        assert b.transport.is_reading()


async def test_max_queued_bytes_is_honoured() -> None:
    async with pair(max_queued_bytes=64 * 1024) as (a, b):

        async def sender() -> None:
            for i in range(100):
                await a.send(b"%03d" % i + b"\0" * 10_000)

        task = asyncio.create_task(sender())
        await wait_until(lambda: not b.transport.is_reading())
        for i in range(100):
            with await within(b.recv()) as msg:
                assert msg.data[:3] == b"%03d" % i
        await within(task)
        assert b.transport.is_reading()
