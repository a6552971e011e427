"""Raw mode (framed=False) against peers that do not frame: the stdlib and anyio.

A raw stream has no message boundaries, only ``sendmsg`` calls: every fd-carrying message must
go out in its own ``sendmsg``, so that a peer reading one message at a time with room for one
fd (``socket.recv_fds(sock, n, 1)``) gets every fd with its own bytes.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import anyio
import pytest
from helpers import close_all, read_all, read_tags, tagged_pipe, tagged_pipes, within

from aioancillary import (
    SCM_MAX_FD,
    AncillaryConnection,
    AncillaryMessage,
    ConnectionClosedError,
    open_unix_connection,
    start_unix_server,
)

MSG_LEN = 8  # every test message is exactly this long, so the stdlib peer can read one at a time


def msg(i: int) -> bytes:
    return b"m%07d" % i


def stdlib_receive(sock: socket.socket, count: int, maxfds: int = 1) -> list[tuple[bytes, bytes]]:
    """Blocking stdlib receiver: one message at a time, ``maxfds`` room; (data, fd content)."""
    sock.settimeout(5)
    out = []
    for _ in range(count):
        data, fds, flags, _addr = socket.recv_fds(sock, MSG_LEN, maxfds)
        try:
            assert not flags & socket.MSG_CTRUNC, f"fds dropped (MSG_CTRUNC) at {data!r}"
            assert len(fds) <= 1, f"{len(fds)} fds arrived with {data!r}"
            out.append((data, read_all(fds[0]) if fds else b"-"))
        finally:
            for fd in fds:
                os.close(fd)
    return out


async def raw_sender_pair() -> tuple[AncillaryConnection, socket.socket]:
    left, right = socket.socketpair()
    conn = await open_unix_connection(sock=left, framed=False)
    return conn, right


# -- aioancillary sends, the stdlib receives --------------------------------------------------


async def test_raw_sender_to_stdlib_receiver_one_fd_per_message() -> None:
    conn, peer = await raw_sender_pair()
    try:
        pipes = tagged_pipes(range(100))
        receiving = asyncio.create_task(asyncio.to_thread(stdlib_receive, peer, 100))
        for i, r in enumerate(pipes):
            # Written back to back in one loop iteration: the transport batches what it can.
            conn.transport.write_fds(msg(i), [r])
        for r in pipes:
            os.close(r)
        got = await within(receiving)
        assert got == [(msg(i), b"%d" % i) for i in range(100)]
    finally:
        peer.close()
        await close_all(conn)


async def test_raw_sender_to_stdlib_receiver_with_send_fds_awaited() -> None:
    conn, peer = await raw_sender_pair()
    try:
        receiving = asyncio.create_task(asyncio.to_thread(stdlib_receive, peer, 30))
        for i in range(30):
            r = tagged_pipe(b"%d" % i)
            await conn.send_fds(msg(i), [r])
            os.close(r)
        got = await within(receiving)
        assert got == [(msg(i), b"%d" % i) for i in range(30)]
    finally:
        peer.close()
        await close_all(conn)


async def test_raw_sender_mixing_messages_with_and_without_fds() -> None:
    """An fd-less message queued before an fd-carrying one must not take its fds."""
    conn, peer = await raw_sender_pair()
    try:
        n = 30
        receiving = asyncio.create_task(asyncio.to_thread(stdlib_receive, peer, n))
        pipes = {i: tagged_pipe(b"%d" % i) for i in range(n) if i % 3 != 1}
        for i in range(n):
            conn.transport.write_fds(msg(i), [pipes[i]] if i in pipes else [])
        for r in pipes.values():
            os.close(r)
        got = await within(receiving)
        assert got == [(msg(i), b"%d" % i if i in pipes else b"-") for i in range(n)]
    finally:
        peer.close()
        await close_all(conn)


async def test_raw_sender_with_a_full_socket_keeps_fds_with_their_message() -> None:
    """The same, when every message is queued behind a full socket first."""
    conn, peer = await raw_sender_pair()
    try:
        conn.transport.set_write_buffer_limits(high=4 << 20)
        filler = 300 * 1024
        conn.transport.write(b"\0" * filler)
        pipes = tagged_pipes(range(20))
        for i, r in enumerate(pipes):
            conn.transport.write_fds(msg(i), [r])
        for r in pipes:
            os.close(r)
        assert conn.transport.get_write_buffer_size() > 0

        def receive() -> list[tuple[bytes, bytes]]:
            peer.settimeout(5)
            left = filler
            while left:
                left -= len(peer.recv(min(left, 65536)))
            return stdlib_receive(peer, 20)

        got = await within(asyncio.to_thread(receive))
        assert got == [(msg(i), b"%d" % i) for i in range(20)]
    finally:
        peer.close()
        await close_all(conn)


async def test_raw_sender_many_fds_per_message_to_stdlib() -> None:
    conn, peer = await raw_sender_pair()
    try:

        def receive() -> list[list[bytes]]:
            peer.settimeout(5)
            out = []
            for _ in range(3):
                data, fds, flags, _ = socket.recv_fds(peer, MSG_LEN, SCM_MAX_FD)
                assert not flags & socket.MSG_CTRUNC
                out.append([data] + [read_all(fd) for fd in fds])
                for fd in fds:
                    os.close(fd)
            return out

        receiving = asyncio.create_task(asyncio.to_thread(receive))
        expected = []
        for i, nfds in enumerate([SCM_MAX_FD, 1, SCM_MAX_FD]):
            tags = [b"%d.%d" % (i, k) for k in range(nfds)]
            pipes = tagged_pipes(tags)
            conn.transport.write_fds(msg(i), pipes)
            for r in pipes:
                os.close(r)
            expected.append([msg(i), *tags])
        assert await within(receiving) == expected
    finally:
        peer.close()
        await close_all(conn)


# -- the stdlib sends, aioancillary receives --------------------------------------------------


async def receive_raw(conn: AncillaryConnection, nbytes: int) -> tuple[bytes, list[bytes]]:
    """Collect a raw stream's bytes and its fds' contents, in order, until ``nbytes`` arrived."""
    data = b""
    tags: list[bytes] = []
    while len(data) < nbytes:
        for m in await within(conn.recv_batch()):
            with m:
                data += m.data
                tags += read_tags(m.fds)
    return data, tags


async def test_stdlib_sender_to_raw_receiver() -> None:
    left, right = socket.socketpair()
    conn = await open_unix_connection(sock=left, framed=False)
    try:

        def send() -> None:
            for i in range(100):
                r = tagged_pipe(b"%d" % i)
                try:
                    socket.send_fds(right, [msg(i)], [r])
                finally:
                    os.close(r)

        sending = asyncio.create_task(asyncio.to_thread(send))
        data, tags = await receive_raw(conn, 100 * MSG_LEN)
        await within(sending)
        assert data == b"".join(msg(i) for i in range(100))
        assert tags == [b"%d" % i for i in range(100)]
    finally:
        right.close()
        await close_all(conn)


async def test_stdlib_sender_fds_arrive_no_later_than_their_bytes() -> None:
    """Each raw read holds the fds of at most one sendmsg, along with that sendmsg's bytes."""
    left, right = socket.socketpair()
    conn = await open_unix_connection(sock=left, framed=False)
    try:
        for i in range(20):
            r = tagged_pipe(b"%d" % i)
            socket.send_fds(right, [msg(i)], [r, r])
            os.close(r)
        right.shutdown(socket.SHUT_WR)
        position = 0
        async with asyncio.timeout(5):
            async for m in conn:
                with m:
                    if m.fds:
                        # The fds came with the bytes of their own sendmsg.
                        first = position // MSG_LEN + (1 if position % MSG_LEN else 0)
                        last = (position + len(m.data) - 1) // MSG_LEN
                        tags = read_tags(m.fds)
                        assert len(tags) == 2
                        owner = int(tags[0])
                        assert first <= owner <= last
                    position += len(m.data)
        assert position == 20 * MSG_LEN
    finally:
        right.close()
        await close_all(conn)


async def test_stdlib_sender_253_fds_to_raw_receiver() -> None:
    left, right = socket.socketpair()
    conn = await open_unix_connection(sock=left, framed=False)
    try:
        tags = [b"%d" % k for k in range(SCM_MAX_FD)]
        pipes = tagged_pipes(tags)
        socket.send_fds(right, [b"lots"], pipes)
        for r in pipes:
            os.close(r)
        with await within(conn.recv()) as m:
            assert m.data == b"lots"
            assert read_tags(m.fds) == tags
    finally:
        right.close()
        await close_all(conn)


async def test_stdlib_seqpacket_peer_keeps_boundaries() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = await open_unix_connection(sock=left)
    try:
        for i in range(10):
            r = tagged_pipe(b"%d" % i)
            socket.send_fds(right, [b"seq %d" % i], [r])
            os.close(r)
        for i in range(10):
            with await within(conn.recv()) as m:
                assert m.data == b"seq %d" % i
                assert read_tags(m.fds) == [b"%d" % i]
        r = tagged_pipe(b"back")
        await conn.send_fds(b"reply", [r])
        os.close(r)
        right.settimeout(5)
        data, fds, _flags, _ = socket.recv_fds(right, 100, 1)
        assert data == b"reply"
        assert read_all(fds[0]) == b"back"
        os.close(fds[0])
    finally:
        right.close()
        await close_all(conn)


async def test_stdlib_seqpacket_peer_empty_records_are_messages() -> None:
    """Empty records from a live peer are messages (recvmsg returns 0 for them and for EOF)."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = await open_unix_connection(sock=left)
    try:
        for data in (b"", b"a", b"", b"", b"b"):
            right.send(data)
        for data in (b"", b"a", b"", b"", b"b"):
            with await within(conn.recv()) as m:
                assert m.data == data
        right.send(b"last")
        right.close()
        with await within(conn.recv()) as m:
            assert m.data == b"last"
        with pytest.raises(ConnectionClosedError):
            await within(conn.recv())
    finally:
        right.close()
        await close_all(conn)


# -- anyio ------------------------------------------------------------------------------------


async def test_anyio_client_and_raw_server(tmp_path: Path) -> None:
    received: list[AncillaryMessage] = []
    path = tmp_path / "anyio.sock"

    async def handler(conn: AncillaryConnection) -> None:
        async for m in conn:
            received.append(m)
            r = tagged_pipe(b"from the server")
            try:
                await conn.send_fds(b"ok", [r])
            finally:
                os.close(r)

    server = await start_unix_server(handler, path, framed=False)
    try:
        stream = await within(anyio.connect_unix(path))
        try:
            r = tagged_pipe(b"from anyio")
            await stream.send_fds(b"hello", [r])
            os.close(r)
            data, fds = await within(stream.receive_fds(10, 1))
            assert data == b"ok"
            assert read_all(fds[0]) == b"from the server"
            os.close(fds[0])
        finally:
            await stream.aclose()
    finally:
        server.close()
        await within(server.wait_closed())
    (m,) = received
    with m:
        assert m.data == b"hello"
        assert read_tags(m.fds) == [b"from anyio"]


async def test_raw_sender_to_anyio_receiver_with_maxfds_1(tmp_path: Path) -> None:
    """anyio sizes its control buffer for maxfds: each message must carry its own fd only."""
    path = tmp_path / "anyio.sock"
    count = 20

    async def handler(conn: AncillaryConnection) -> None:
        pipes = tagged_pipes(range(count))
        for i, r in enumerate(pipes):
            conn.transport.write_fds(msg(i), [r])
        for r in pipes:
            os.close(r)
        async for m in conn:  # until the client hangs up
            m.close()

    server = await start_unix_server(handler, path, framed=False)
    try:
        stream = await within(anyio.connect_unix(path))
        try:
            for i in range(count):
                data, fds = await within(stream.receive_fds(MSG_LEN, 1))
                assert data == msg(i)
                assert len(fds) == 1
                assert read_all(fds[0]) == b"%d" % i
                os.close(fds[0])
        finally:
            await stream.aclose()
    finally:
        server.close()
        await within(server.wait_closed())
