"""What an idle connection holds: no queue of its own, no instance dict on its transport.

Memory per connection is measured by ``benchmarks/memory_bench.py``; these tests pin the
structure behind the figure (no sizes, no timing): CPython gives every deque, empty or not, a
64-slot block, so a connection with nothing queued must hold no deque of its own, in either
direction, before or after traffic; and the transport, with some thirty attributes, has
slots instead of a dict.
"""

from __future__ import annotations

import collections
import gc
import os
import socket
import weakref
from typing import Any

import pytest
from helpers import pair, tagged_pipe, within

from aioancillary import AncillaryConnection
from aioancillary._asyncio._inbox import NO_MESSAGES
from aioancillary._core import _outbox

SOCK_TYPES = [
    pytest.param((socket.SOCK_STREAM, True), id="framed"),
    pytest.param((socket.SOCK_STREAM, False), id="raw"),
    pytest.param((socket.SOCK_SEQPACKET, None), id="seqpacket"),
]


def own_containers(conn: AncillaryConnection) -> list[Any]:
    """The deques and lists a connection, its transport and its outbox hold (shared empties
    excepted)."""
    shared = (NO_MESSAGES, _outbox._NO_BATCHES)
    transport = conn.transport
    held: list[Any] = list(vars(conn).values())
    for obj in (transport, transport._outbox):
        for ref in gc.get_referents(obj):
            held += ref.values() if isinstance(ref, dict) else [ref]
    return [
        value
        for value in held
        if isinstance(value, collections.deque | list) and all(value is not s for s in shared)
    ]


async def exchange(a: AncillaryConnection, b: AncillaryConnection) -> None:
    """One message with an fd each way, received and closed."""
    for sender, receiver in ((a, b), (b, a)):
        r = tagged_pipe(b"x")
        try:
            await sender.send_fds(b"hello", [r])
        finally:
            os.close(r)
        with await within(receiver.recv()) as msg:
            assert msg.fd_count == 1


@pytest.mark.parametrize("kind", SOCK_TYPES)
async def test_an_idle_connection_holds_no_queue_of_its_own(kind: tuple[int, bool | None]) -> None:
    sock_type, framed = kind
    async with pair(sock_type, framed=framed) as (a, b):
        for conn in (a, b):
            assert own_containers(conn) == []
            assert not hasattr(conn.transport, "__dict__")
        await exchange(a, b)
        for conn in (a, b):
            assert own_containers(conn) == [], "a queue was kept after the traffic"
    assert not NO_MESSAGES
    assert not _outbox._NO_BATCHES


async def test_queues_are_given_up_once_emptied() -> None:
    async with pair() as (a, b):
        # A burst: the first message goes out at once, the next ones are queued and flushed
        # together; the receiver's queue fills, then the application takes every message.
        for i in range(10):
            await a.send(b"%d" % i)
        assert own_containers(a), "the burst was not queued: the test tests nothing"
        got = [await within(b.recv()) for _ in range(3)]
        assert own_containers(b), "the receiver's queue is empty: the test tests nothing"
        while len(got) < 10:
            got += await within(b.recv_batch())
        assert [m.data for m in got] == [b"%d" % i for i in range(10)]
        assert own_containers(a) == []
        assert own_containers(b) == []
        # drain(): a write above the high watermark waits, then the waiters go too.
        a.transport.set_write_buffer_limits(high=0)
        await a.send(b"first")  # out at once
        await a.send(b"second")  # queued: above the mark, so send waits in drain()
        assert own_containers(a) == []
        for _ in range(2):
            (await within(b.recv())).close()
        assert own_containers(b) == []
    assert not NO_MESSAGES
    assert not _outbox._NO_BATCHES


async def test_transport_keeps_weak_references() -> None:
    async with pair() as (a, _b):
        assert weakref.ref(a.transport)() is a.transport
        assert weakref.ref(a)() is a
