"""An ``AncillaryConnection``'s receive side (``_asyncio/_inbox.py``): its states and their
allowed moves, written down and checked, and what each state means for ``recv()``,
``async for`` and ``at_eof()``."""

from __future__ import annotations

import asyncio
import socket

import pytest
from helpers import half_raw, pair, within

from aioancillary import AncillaryConnection, ConnectionClosedError, connection_pair, frame_header
from aioancillary._asyncio._inbox import _MOVES, State


def state_of(conn: AncillaryConnection) -> State:
    """The connection's state, read afresh (not narrowed by an earlier assert)."""
    return conn._state


def test_the_table_of_moves() -> None:
    assert set(_MOVES) == set(State)
    assert _MOVES[State.OPEN] == {State.EOF, State.LOST, State.CLOSED}
    assert _MOVES[State.EOF] == {State.LOST, State.CLOSED}
    assert _MOVES[State.LOST] == {State.CLOSED}
    assert _MOVES[State.CLOSED] == set()  # closed here is the end


async def test_a_move_the_table_does_not_allow_is_refused() -> None:
    async with pair() as (a, _b):
        a.close()
        for state in State:
            with pytest.raises(RuntimeError, match="cannot go from CLOSED"):
                a._move(state)
        assert state_of(a) is State.CLOSED


async def test_open_then_eof_then_closed() -> None:
    async with half_raw() as (conn, peer):
        assert state_of(conn) is State.OPEN
        assert not conn.at_eof()
        peer.sendall(frame_header(0, 2) + b"hi")
        peer.shutdown(socket.SHUT_WR)
        with await within(conn.recv()) as msg:
            assert msg.data == b"hi"
        with pytest.raises(ConnectionClosedError):
            await within(conn.recv())
        assert state_of(conn) is State.EOF
        assert conn.at_eof()
        await conn.send(b"sending goes on after the peer's EOF")
        conn.close()
        assert state_of(conn) is State.CLOSED
        assert conn.at_eof()
        assert "closed" in repr(conn)


async def test_lost_when_the_transport_closes_under_the_connection() -> None:
    a, b = await connection_pair()
    try:
        a.transport.abort()  # not the connection's close(): the socket goes under it
        await within(a.wait_closed())
        assert state_of(a) is State.LOST
        assert a.at_eof()  # nothing more will ever arrive
        with pytest.raises(ConnectionClosedError):
            await within(a.recv())
        a.close()
        assert state_of(a) is State.CLOSED
    finally:
        a.close()
        b.close()
        await within(asyncio.gather(a.wait_closed(), b.wait_closed()))


async def test_a_failure_is_kept_after_the_connection_is_lost_and_closed() -> None:
    async with half_raw() as (conn, peer):
        peer.sendall(b"\x07not a frame")
        with pytest.raises(Exception, match="wire-format version") as raised:
            await within(conn.recv())
        await within(conn.wait_closed())
        assert state_of(conn) is State.LOST
        conn.close()
        with pytest.raises(type(raised.value)):
            await within(conn.recv())  # the cause, not a plain "closed"
        with pytest.raises(type(raised.value)):
            async for _msg in conn:
                pass


async def test_messages_arriving_after_close_are_closed() -> None:
    async with half_raw() as (conn, _peer):
        conn.close()
        import os  # noqa: PLC0415

        from aioancillary._core._message import new_message  # noqa: PLC0415

        r, w = os.pipe()
        os.close(w)
        msg = new_message(b"late", [r])
        conn._on_messages([msg])
        assert msg.fd_count == 0
