"""What an idle connection holds: no queue of its own, no instance dict in its transport.

Memory per connection is measured by ``benchmarks/memory_bench.py``; these tests pin the
structure behind the figure (no sizes, no timing): CPython gives every deque, empty or not, a
64-slot block, so a connection with nothing queued must hold no deque of its own, in either
direction, before or after traffic; and the transport, with some thirty attributes, keeps
them in slots (an instance dict is made only if someone sets an attribute of their own).
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
    if type(transport._outbox) is not _outbox.Outbox and transport._outbox:
        # The C outbox (_speedups_send.c) keeps its batches in C memory, freed as soon as it
        # is empty: a non-empty one stands for a queue of its own.
        held.append(["the C outbox's batches"])
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
        await exchange(a, b)
        for conn in (a, b):
            assert own_containers(conn) == [], "a queue was kept after the traffic"
            # (vars() makes the dict if there is none: checked last)
            assert vars(conn.transport) == {}, "the transport's state is not all in slots"
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


async def test_transport_keeps_weak_references_and_attributes_of_ones_own() -> None:
    async with pair() as (a, b):
        transport = a.transport
        assert weakref.ref(transport)() is transport
        assert weakref.ref(a)() is a
        # As on asyncio's transports: a caller's attribute, or a method patched on the instance.
        sent: list[bytes] = []
        real = transport.write_fds

        def spy(data: Any, fds: Any = (), *, close_fds: bool = False) -> None:
            sent.append(bytes(data))
            real(data, fds, close_fds=close_fds)

        transport.write_fds = spy  # type: ignore[method-assign]
        transport.tag = "mine"  # type: ignore[attr-defined]
        await a.send(b"spied")
        assert sent == [b"spied"]
        assert transport.tag == "mine"  # type: ignore[attr-defined]
        assert set(vars(transport)) == {"write_fds", "tag"}
        (await within(b.recv())).close()
