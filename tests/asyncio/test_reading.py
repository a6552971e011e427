"""The transport's read side (``_asyncio/_reading.py``): what every read hands over.

Received fds are close-on-exec, set atomically by the kernel (``MSG_CMSG_CLOEXEC``, where the
platform has it) on every receive the transport makes, in every mode: a ``fork()`` + ``exec()``
in another thread can never inherit one.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from helpers import close_all, half_raw, read_all, tagged_pipes, within
from helpers.speedups import use_receive_path

from aioancillary import (
    AncillaryConnection,
    DataTruncatedError,
    current_platform,
    frame_header,
    send_fds,
)

CLOEXEC = current_platform().cmsg_cloexec


@pytest.fixture(params=["python", "C"])
def receive_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each receive path: the pure-Python ``Receiver``, then the C extension's, whichever path
    this process selected (so the pure-Python CI job covers both too)."""
    use_receive_path(monkeypatch, str(request.param))
    return str(request.param)


class RecordingSocket(socket.socket):
    """A socket that records the flags of every ``recvmsg_into`` made on it."""

    flags: list[int]

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> Any:
        self.flags.append(flags)
        return super().recvmsg_into(buffers, ancbufsize, flags)


@asynccontextmanager
async def receiving(
    sock_type: int, framed: bool | None
) -> AsyncIterator[tuple[AncillaryConnection, RecordingSocket, socket.socket]]:
    """A connection over a recording socket, and the plain socket that sends to it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, sock_type)
    recording = RecordingSocket(ours.family, ours.type, fileno=ours.detach())
    recording.flags = []
    conn = AncillaryConnection(recording, framed=framed)
    try:
        yield conn, recording, theirs
    finally:
        theirs.close()
        await close_all(conn)


MODES = [
    pytest.param(socket.SOCK_STREAM, None, id="framed"),
    pytest.param(socket.SOCK_STREAM, False, id="raw"),
    pytest.param(socket.SOCK_SEQPACKET, None, id="seqpacket"),
]


@pytest.mark.parametrize(("sock_type", "framed"), MODES)
@pytest.mark.parametrize("count", [1, 3, 253])
async def test_received_fds_are_close_on_exec(
    sock_type: int, framed: bool | None, count: int, receive_path: str
) -> None:
    async with receiving(sock_type, framed) as (conn, recording, peer):
        tags = [f"fd {i}" for i in range(count)]
        fds = tagged_pipes(tags)
        try:
            for fd in fds:  # what the peer sends is inheritable: only the receive makes it not
                os.set_inheritable(fd, True)
            payload = b"x"
            header = (
                frame_header(count, len(payload))
                if framed is None and (sock_type == socket.SOCK_STREAM)
                else b""
            )
            send_fds(peer, header + payload, fds)
        finally:
            for fd in fds:
                os.close(fd)
        with await within(conn.recv()) as msg:
            received = msg.fds
            assert len(received) == count
            for owned in received:
                assert fcntl.fcntl(owned.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC, owned
            assert [read_all(owned) for owned in received] == [tag.encode() for tag in tags]
        if CLOEXEC and receive_path == "python":
            # Set by the kernel as it installed them, not by a later fcntl() a concurrent
            # fork()+exec() could overtake: every receive asked for MSG_CMSG_CLOEXEC. (The C
            # path calls recvmsg itself; its flags cannot be recorded from here.)
            assert recording.flags
            assert all(flags & CLOEXEC for flags in recording.flags), recording.flags


@pytest.mark.parametrize(
    "sock_type", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM], ids=["seqpacket", "dgram"]
)
async def test_an_oversized_message_without_fds_fails_the_connection_cleanly(
    sock_type: int, receive_path: str
) -> None:
    """The kernel cuts a datagram longer than the receive buffer (``MSG_TRUNC``) and, with no
    fds, returns no control record at all: the read fails with ``DataTruncatedError`` like a
    cut message with fds, after the messages read before it were delivered."""
    reports: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reports.append(ctx))
    async with half_raw(sock_type, max_message_size=100) as (conn, peer):
        peer.send(b"fits")
        peer.send(b"\0" * 200)  # cut by the 100-byte receive buffer
        with await within(conn.recv()) as msg:
            assert msg.data == b"fits"
        with pytest.raises(DataTruncatedError):
            await within(conn.recv())
        await within(conn.wait_closed())
    assert reports == []
