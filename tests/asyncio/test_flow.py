"""The transport's write-side flow control (``_asyncio/_flow.py``): watermarks that pause and
resume the protocol (on bytes and on queued fds), and ``write_eof``."""

from __future__ import annotations

import os
import socket

import pytest
from helpers import (
    BIG,
    nofile_at_least,
    tagged_pipe,
    transport_pair,
    within,
)

from aioancillary import (
    SCM_MAX_FD,
    ConnectionClosedError,
)


async def test_write_buffer_limits_pause_and_resume_reach_the_protocol() -> None:
    async with transport_pair() as (ta, pa, tb, _pb):
        ta.set_write_buffer_limits(high=4096, low=1024)
        assert ta.get_write_buffer_limits() == (1024, 4096)
        ta.set_write_buffer_limits(high=8192)
        assert ta.get_write_buffer_limits() == (2048, 8192)
        with pytest.raises(ValueError, match="high"):
            ta.set_write_buffer_limits(high=10, low=20)
        tb.pause_reading()
        ta.write(b"\0" * 100)
        assert "pause_writing" not in pa.events
        ta.write(b"\0" * BIG)
        assert ta.get_write_buffer_size() > 8192
        assert pa.paused.is_set()
        assert not pa.resumed.is_set()
        tb.resume_reading()
        await within(pa.resumed.wait())
        assert ta.get_write_buffer_size() <= 2048
        assert pa.events == ["made", "pause_writing", "resume_writing"]


async def test_lowering_the_limits_below_the_queue_pauses_at_once() -> None:
    """As asyncio's own transports do: set_write_buffer_limits re-checks the watermark."""
    async with transport_pair() as (ta, pa, tb, _pb):
        tb.pause_reading()
        ta.set_write_buffer_limits(high=BIG)
        ta.write(b"\0" * BIG)
        queued = ta.get_write_buffer_size()
        assert 0 < queued <= BIG
        assert not pa.paused.is_set()
        ta.set_write_buffer_limits(high=queued // 2)
        assert pa.paused.is_set()
        tb.resume_reading()
        await within(pa.resumed.wait())


async def test_queued_fds_alone_pause_writing() -> None:
    with nofile_at_least(4096):
        async with transport_pair() as (ta, pa, tb, _pb):
            tb.pause_reading()
            ta.write(b"\0" * BIG)
            ta.set_write_buffer_limits(high=BIG * 4)  # bytes alone never pause here
            r = tagged_pipe(b"")
            try:
                for _ in range(3):
                    ta.write_fds(b"f", [r] * SCM_MAX_FD)
                assert ta.get_write_buffer_fds() == 3 * SCM_MAX_FD
                assert pa.paused.is_set()
            finally:
                os.close(r)
            tb.resume_reading()
            await within(pa.resumed.wait())


async def test_write_eof_half_closes() -> None:
    async with transport_pair() as (ta, pa, tb, pb):
        pb.keep_open_on_eof = True
        assert ta.can_write_eof()
        ta.write(b"last")
        ta.write_eof()
        ta.write_eof()  # idempotent
        with pytest.raises(ConnectionClosedError):
            ta.write(b"after eof")
        await within(pb.eof.wait())
        assert [m.data for m in pb.messages] == [b"last"]
        # The other direction still works.
        tb.write(b"reply")
        (reply,) = await pa.wait_messages(1)
        assert reply.data == b"reply"


async def test_write_eof_waits_for_the_queue() -> None:
    async with transport_pair() as (ta, _pa, tb, pb):
        pb.keep_open_on_eof = True
        tb.pause_reading()
        ta.write(b"\2" * BIG)
        ta.write(b"tail")
        ta.write_eof()
        tb.resume_reading()
        await within(pb.eof.wait())
        assert [len(m.data) for m in pb.messages] == [BIG, 4]


async def test_dgram_transport_cannot_write_eof() -> None:
    async with transport_pair(socket.SOCK_DGRAM) as (ta, _pa, _tb, pb):
        assert not ta.can_write_eof()
        ta.write(b"")
        ta.write(b"dgram")
        msgs = await pb.wait_messages(2)
        assert [m.data for m in msgs] == [b"", b"dgram"]
