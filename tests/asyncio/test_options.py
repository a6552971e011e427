"""What the client and server entry points share (``_asyncio/_options.py``)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from helpers import RecordingProtocol, close_all, within

from aioancillary import AncillaryConnection, AncillaryTransport
from aioancillary._asyncio._options import ConnectionOptions, closed_on_error, path_or_sock


def test_path_or_sock_wants_exactly_one(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        for path, given in ((None, None), (tmp_path / "s", sock)):
            with pytest.raises(ValueError, match="exactly one of path= or sock="):
                path_or_sock(path, given)
        assert path_or_sock(None, sock) is None
    assert path_or_sock(tmp_path / "s", None) == str(tmp_path / "s")
    assert path_or_sock(b"\0name", None) == b"\0name"


def test_closed_on_error_closes_only_on_error() -> None:
    sock = socket.socket(socket.AF_UNIX)
    with closed_on_error(sock):
        pass
    assert sock.fileno() != -1
    with pytest.raises(KeyError), closed_on_error(sock):
        raise KeyError("anything")
    assert sock.fileno() == -1


async def test_options_reach_the_connection_and_the_transport() -> None:
    options = ConnectionOptions(
        framed=False, max_message_size=1234, max_fds_per_send=7, max_queued_bytes=99
    )
    left, right = socket.socketpair()
    closed: list[Exception | None] = []
    conn = options.connection(left, on_closed=closed.append)
    assert isinstance(conn, AncillaryConnection)
    protocol = RecordingProtocol()
    transport = options.transport(right, protocol)
    assert isinstance(transport, AncillaryTransport)
    for each in (conn.transport, transport):
        assert each.get_extra_info("framed") is False
        assert each._max_message_size == 1234
        assert each._fd_cap == 7
    assert conn._max_qbytes == 99
    transport.close()
    await within(protocol.lost)
    await close_all(conn)
    assert closed == [None]  # on_closed ran once, with connection_lost's argument
