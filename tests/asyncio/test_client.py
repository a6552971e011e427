"""The client entry points (``_asyncio/_client.py``): ``open_unix_connection`` and
``create_unix_connection`` to a path, an abstract name or a ``sock=``, their argument checks,
``connection_pair``; the socket they made or were given is closed whenever they fail."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import close_all, within
from helpers.servers import echo_fds, roundtrip, serving

from aioancillary import (
    AncillaryConnection,
    Credentials,
    PeerRejectedError,
    connection_pair,
    open_unix_connection,
)

ME = Credentials(os.getpid(), os.getuid(), os.getgid())


async def test_open_unix_connection_to_a_server_path(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with serving(echo_fds, path) as server:
        assert server.is_serving()
        (listening,) = server.sockets
        assert listening.getsockname() == str(path)
        conn = await within(open_unix_connection(path))
        try:
            await roundtrip(conn, b"one")
            await roundtrip(conn, b"two")
            assert conn.get_extra_info("peername") == str(path)
            assert conn.get_extra_info("sockname") == ""  # the client socket is unbound
            assert conn.peercred == ME
        finally:
            await close_all(conn)


@pytest.mark.parametrize("kind", ["str", "bytes", "pathlike"])
async def test_path_types(tmp_path: Path, kind: str) -> None:
    convert: dict[str, Callable[[Path], Any]] = {"str": str, "bytes": os.fsencode, "pathlike": Path}
    path = convert[kind](tmp_path / "p.sock")
    async with serving(echo_fds, path):
        conn = await within(open_unix_connection(path))
        try:
            await roundtrip(conn, kind.encode())
        finally:
            await close_all(conn)
    assert not (tmp_path / "p.sock").exists()


async def test_open_unix_connection_with_sock(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with serving(echo_fds, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        conn = await open_unix_connection(sock=sock)
        try:
            await roundtrip(conn, b"inherited")
        finally:
            await close_all(conn)


async def test_open_unix_connection_argument_errors() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        await open_unix_connection()
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ValueError, match="exactly one"):
            await open_unix_connection("/nonexistent", sock=a)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with tcp, pytest.raises(ValueError, match="AF_UNIX"):
            await open_unix_connection(sock=tcp)


async def test_open_unix_connection_errors_leak_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await within(open_unix_connection(tmp_path / "missing.sock"))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()  # the file stays, nobody listens
    with pytest.raises(ConnectionRefusedError):
        await within(open_unix_connection(tmp_path / "stale.sock"))


async def test_client_authorize_rejecting_raises_peer_rejected(tmp_path: Path) -> None:
    ended = asyncio.Event()
    received: list[bytes] = []

    async def handler(conn: AncillaryConnection) -> None:
        async for msg in conn:
            with msg:
                received.append(msg.data)
        ended.set()

    path = tmp_path / "r.sock"
    async with serving(handler, path):
        with pytest.raises(PeerRejectedError) as info:
            await within(open_unix_connection(path, authorize=lambda creds: creds is None))
        assert isinstance(info.value, PermissionError)
        await within(ended.wait())  # the server saw the client go
        assert received == []


@pytest.mark.parametrize("sock_type", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET])
async def test_connection_pair(sock_type: int) -> None:
    a, b = await connection_pair(sock_type, max_queued_bytes=1000)
    try:
        await a.send(b"ping")
        with await within(b.recv()) as msg:
            assert msg.data == b"ping"
        assert a.transport.get_extra_info("socket_type") == sock_type
        assert b._max_qbytes == 1000
    finally:
        await close_all(a, b)


async def test_connection_pair_closes_both_sockets_when_it_fails() -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="max_fds_per_send"):
        await connection_pair(max_fds_per_send=0)
    assert len(os.listdir("/proc/self/fd")) == before
