"""Cancellation at every await of the connection API: nothing is lost, duplicated or leaked.

The fd-count fixture checks every test for leaked fds (queued duplicates, received fds of
messages that a cancelled task never took).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile

import pytest
from helpers import (
    BIG,
    drain_big,
    pair,
    read_all,
    read_tags,
    tagged_pipe,
    tagged_pipes,
    within,
)

from aioancillary import (
    AncillaryConnection,
    AncillaryMessage,
    ConnectionClosedError,
    open_unix_connection,
)

# -- receiving --------------------------------------------------------------------------------


async def test_cancelled_recv_loses_no_message() -> None:
    async with pair() as (a, b):
        waiting = asyncio.create_task(b.recv())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        r = tagged_pipe(b"still here")
        await a.send_fds(b"after cancel", [r])
        os.close(r)
        with await within(b.recv()) as msg:
            assert msg.data == b"after cancel"
            assert read_tags(msg.fds) == [b"still here"]


async def test_recv_timeout_then_recv() -> None:
    async with pair() as (a, b):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.recv(), 0.01)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await b.recv()
        await a.send(b"late")
        with await within(b.recv()) as msg:
            assert msg.data == b"late"


@pytest.mark.parametrize("method", ["recv", "recv_batch", "anext"])
async def test_cancel_at_every_point_loses_and_duplicates_nothing(method: str) -> None:
    """Cancel a receiver k loop iterations after the message was sent, for k = 0..7.

    Depending on k the cancellation lands before the message arrives, between its arrival
    (the waiter resolved) and the task's resumption, or after the task returned. In every
    case each message must be received exactly once, with its own fd.
    """

    async def receive(conn: AncillaryConnection) -> list[AncillaryMessage]:
        if method == "recv":
            return [await conn.recv()]
        if method == "recv_batch":
            return await conn.recv_batch()
        return [await conn.__anext__()]

    async with pair() as (a, b):
        received: list[AncillaryMessage] = []
        sent = 0
        for _round in range(3):
            for k in range(8):
                task = asyncio.create_task(receive(b))
                await asyncio.sleep(0)  # the receiver is waiting
                r = tagged_pipe(b"%d" % sent)
                await a.send_fds(b"%d" % sent, [r])
                os.close(r)
                sent += 1
                for _ in range(k):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    received.extend(await task)
        while len(received) < sent:
            received.extend(await within(b.recv_batch()))
        assert [m.data for m in received] == [b"%d" % i for i in range(sent)]
        for i, msg in enumerate(received):
            with msg:
                assert read_tags(msg.fds) == [b"%d" % i]


async def test_cancelled_async_for_keeps_the_rest_for_the_next_loop() -> None:
    async with pair() as (a, b):
        first: list[bytes] = []
        got_two = asyncio.Event()

        async def consume() -> None:
            async for msg in b:
                with msg:
                    first.append(msg.data)
                if len(first) == 2:
                    got_two.set()

        task = asyncio.create_task(consume())
        await a.send(b"0")
        await a.send(b"1")
        await within(got_two.wait())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for i in range(2, 5):
            await a.send(b"%d" % i)
        a.close()
        rest = []
        async with asyncio.timeout(5):
            async for msg in b:
                with msg:
                    rest.append(msg.data)
        assert first + rest == [b"%d" % i for i in range(5)]


async def test_task_group_receivers_cancelled_while_messages_arrive() -> None:
    async with pair() as (a, b):
        pipes = tagged_pipes(range(50))
        taken: list[AncillaryMessage] = []

        async def consumer() -> None:
            while True:
                taken.append(await b.recv())
                await asyncio.sleep(0)

        async def producer() -> None:
            for i, r in enumerate(pipes):
                await a.send_fds(b"%d" % i, [r])
                if i == 25:
                    raise RuntimeError("producer fails half-way")

        async def group() -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(consumer())
                tg.create_task(producer())

        with pytest.raises(ExceptionGroup):
            await group()
        for r in pipes:
            os.close(r)
        # Whatever the consumer had not taken is still there, in order, with its fds.
        while len(taken) < 26:
            taken.extend(await within(b.recv_batch()))
        assert [m.data for m in taken] == [b"%d" % i for i in range(26)]
        for i, msg in enumerate(taken):
            with msg:
                assert read_tags(msg.fds) == [b"%d" % i]


async def test_messages_left_in_the_queue_are_closed_by_close() -> None:
    async with pair() as (a, b):
        r, w = os.pipe()
        for _ in range(5):
            await a.send_fds(b"x", [w])
        os.close(w)
        (await within(b.recv())).close()
        b.close()  # four messages never taken: their fds are closed here
        await within(b.wait_closed())
        assert os.read(r, 1) == b""  # every copy of the write end is closed
        os.close(r)


# -- sending ----------------------------------------------------------------------------------


async def _paused_sender(a: AncillaryConnection, b: AncillaryConnection) -> None:
    """Make ``a``'s write side paused: ``b`` does not read and ``a``'s queue is over its mark."""
    a.transport.set_write_buffer_limits(high=1024)
    b.transport.pause_reading()
    a.transport.write(b"\0" * BIG)
    assert a.transport.get_write_buffer_size() > 1024


async def test_cancelled_drain_leaves_the_data_queued() -> None:
    async with pair() as (a, b):
        await _paused_sender(a, b)
        draining = asyncio.create_task(a.drain())
        await asyncio.sleep(0)
        draining.cancel()
        with pytest.raises(asyncio.CancelledError):
            await draining
        assert a.transport.get_write_buffer_size() > 0
        b.transport.resume_reading()
        await within(a.drain())
        await drain_big(b)


async def test_cancelled_send_fds_delivers_the_message_exactly_once() -> None:
    async with pair() as (a, b):
        await _paused_sender(a, b)
        r, w = os.pipe()
        sending = asyncio.create_task(a.send_fds(b"cancelled while draining", [w]))
        await asyncio.sleep(0)
        assert not sending.done()  # waiting in drain(): the message is queued already
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        os.close(w)  # the caller's copy: the queued duplicate must carry the file
        a.transport.write(b"next")  # queued behind it (a send() would wait in drain)
        b.transport.resume_reading()
        await drain_big(b)
        with await within(b.recv()) as msg:
            assert msg.data == b"cancelled while draining"
            (fd,) = msg.fds
            os.write(fd.fileno(), b"ok")
        assert read_all(r) == b"ok"
        os.close(r)
        with await within(b.recv()) as msg:
            assert msg.data == b"next"


async def test_task_group_of_senders_cancelled_while_queued() -> None:
    """Every send_fds that started queued its message: exactly those arrive, once each."""
    async with pair() as (a, b):
        await _paused_sender(a, b)
        queued: list[int] = []
        pipes = tagged_pipes(range(40))

        async def sender(first: int) -> None:
            for i in range(first, 40, 4):
                try:
                    await a.send_fds(b"%d" % i, [pipes[i]])
                finally:
                    queued.append(i)  # reached only if send_fds ran, i.e. queued

        async def stopper() -> None:
            await asyncio.sleep(0)
            raise RuntimeError("stop the group")

        async def group() -> None:
            async with asyncio.TaskGroup() as tg:
                for first in range(4):
                    tg.create_task(sender(first))
                tg.create_task(stopper())

        with pytest.raises(ExceptionGroup):
            await group()
        for r in pipes:
            os.close(r)
        assert queued  # the senders got as far as their first (paused) send
        b.transport.resume_reading()
        await drain_big(b)
        got = []
        for _ in queued:
            with await within(b.recv()) as msg:
                got.append(int(msg.data))
                assert read_tags(msg.fds) == [msg.data]
        assert sorted(got) == sorted(queued)
        a.close()
        with pytest.raises(ConnectionClosedError):
            await within(b.recv())  # nothing more: no duplicate


async def test_abort_with_cancelled_senders_closes_their_queued_fds() -> None:
    async with pair() as (a, b):
        await _paused_sender(a, b)
        r, w = os.pipe()

        async def sender() -> None:
            for _ in range(10):
                await a.send_fds(b"x", [w] * 50)

        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(sender())
            await asyncio.sleep(0)
            task.cancel()
        os.close(w)
        assert a.transport.get_write_buffer_fds() > 0
        a.abort()
        await within(a.wait_closed())
        assert os.read(r, 1) == b""  # every queued duplicate closed
        os.close(r)


async def test_async_with_cancelled_does_not_wait_for_a_peer_that_never_reads() -> None:
    """Leaving ``async with conn`` by cancellation must not hang flushing the queue."""
    async with pair() as (a, b):
        r, w = os.pipe()
        entered = asyncio.Event()

        async def user() -> None:
            async with a:
                await _paused_sender(a, b)
                a.transport.write_fds(b"queued", [w])
                entered.set()
                await asyncio.Event().wait()  # until cancelled

        task = asyncio.create_task(user())
        await within(entered.wait())
        os.close(w)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(task, 1.0)
        assert a.is_closing()
        await within(a.wait_closed(), 1.0)
        assert os.read(r, 1) == b""  # the queued duplicate was closed
        os.close(r)


async def test_cancelled_while_async_with_flushes() -> None:
    """Cancelled while ``__aexit__`` waits for the queue to drain: abort, close every fd."""
    async with pair() as (a, b):
        r, w = os.pipe()
        flushing = asyncio.Event()

        async def user() -> None:
            async with a:
                await _paused_sender(a, b)
                a.transport.write_fds(b"queued", [w])
                flushing.set()
            # __aexit__ now waits for a peer that does not read

        task = asyncio.create_task(user())
        await within(flushing.wait())
        os.close(w)
        await asyncio.sleep(0)
        assert not task.done()  # in __aexit__, waiting for the queue to drain
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(task, 1.0)
        await within(a.wait_closed(), 1.0)
        assert os.read(r, 1) == b""
        os.close(r)


async def test_cancelled_wait_closed_does_not_stop_the_close() -> None:
    async with pair() as (a, b):
        await _paused_sender(a, b)
        a.close()
        waiting = asyncio.create_task(a.wait_closed())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        b.transport.resume_reading()
        await drain_big(b)  # the queued message still went out
        await within(a.wait_closed())


async def test_cancelled_open_unix_connection_closes_its_socket() -> None:
    """A connect waiting for room in a full backlog is cancelled: its socket is closed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "full.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(0)
        waiting_clients = []
        try:
            while True:  # fill the backlog: further connects cannot complete
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                try:
                    client.connect(path)
                except BlockingIOError:
                    client.close()
                    break
                waiting_clients.append(client)
            # The connect waits for room in the backlog; the timeout cancels it.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(open_unix_connection(path), 0.05)
            task = asyncio.create_task(open_unix_connection(path))
            await asyncio.sleep(0.01)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await within(task)
        finally:
            for client in waiting_clients:
                client.close()
            listener.close()
