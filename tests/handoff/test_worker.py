"""The worker side: clients as sockets, streams or protocols; the handler form; a bad acceptor."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import socket
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, assert_type

import pytest
from helpers import is_open, wait_until, within
from helpers.acceptor import acceptor_with_workers

from aioancillary import AncillaryConnection, PeerRejectedError, ProtocolError
from aioancillary._handoff import _wire as wire
from aioancillary._handoff._acceptor import Acceptor
from aioancillary._handoff._client import HandedClient
from aioancillary._handoff._worker import Worker


@pytest.fixture
async def acceptor_and_worker() -> AsyncIterator[tuple[Acceptor, Worker, tuple[str, int]]]:
    acceptor = Acceptor()
    listener = socket.create_server(("127.0.0.1", 0))
    acceptor.add_listener(listener, name="web")
    ours, theirs = socket.socketpair()
    acceptor.add_worker(ours)
    worker = await Worker.connect(sock=theirs)
    yield acceptor, worker, listener.getsockname()
    acceptor.close()
    worker.close()
    await within(worker.wait_closed())
    await within(acceptor.wait_closed())


async def talk(addr: tuple[str, int], text: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(text)
    writer.write_eof()
    answer = await within(reader.read())
    writer.close()
    await writer.wait_closed()
    return answer


async def test_client_socket_is_ready_and_described(
    acceptor_and_worker: tuple[Acceptor, Worker, tuple[str, int]],
) -> None:
    acceptor, worker, addr = acceptor_and_worker
    reader, writer = await asyncio.open_connection(*addr)
    client = await within(worker.__anext__())
    with client:
        assert client.sock.gettimeout() == 0.0  # non-blocking, ready for the loop
        assert (client.sock.family, client.sock.type) == (socket.AF_INET, socket.SOCK_STREAM)
        assert client.peername == writer.get_extra_info("sockname")
        assert client.sock.getpeername() == client.peername
        assert (client.listener, client.metadata) == ("web", {})
        assert worker.listeners == {"web": {}}
        assert acceptor.stats().in_flight == 1
        fd = client.sock.fileno()
    assert not is_open(fd)  # leaving the block closed it...
    await wait_until(lambda: acceptor.stats().in_flight == 0)  # ...and reported it
    client.done()  # again: nothing happens
    assert acceptor.stats().completed == 1
    assert await within(reader.read()) == b""
    writer.close()
    await writer.wait_closed()


async def test_a_tcp_client_is_described_as_tcp_and_its_streams_do_not_wait_for_nagle(
    acceptor_and_worker: tuple[Acceptor, Worker, tuple[str, int]],
) -> None:
    """The listener was made by ``socket.create_server`` (proto 0); the handed client still says
    ``IPPROTO_TCP``, so the loop's transport sets ``TCP_NODELAY`` on it as it does on the sockets
    it accepts itself (asyncio checks the proto; uvloop sets it on any TCP socket)."""
    _acceptor, worker, addr = acceptor_and_worker
    reader, writer = await asyncio.open_connection(*addr)
    client = await within(worker.__anext__())
    async with client:
        assert client.sock.proto == socket.IPPROTO_TCP
        assert client.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        _client_reader, client_writer = await client.open_streams()
        sock = client_writer.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert await within(reader.read()) == b""
    writer.close()
    await writer.wait_closed()


async def test_streams_one_liner(
    acceptor_and_worker: tuple[Acceptor, Worker, tuple[str, int]],
) -> None:
    acceptor, worker, addr = acceptor_and_worker

    async def serve() -> None:
        async for client in worker:
            async with client:
                reader, writer = await client.open_streams()
                writer.write(b"streams: " + await reader.read())
                await writer.drain()

    task = asyncio.ensure_future(serve())
    assert await talk(addr, b"abc") == b"streams: abc"
    await wait_until(lambda: acceptor.stats().completed == 1)
    task.cancel()


async def test_handler_form_with_streams_closes_the_writer_it_handed_out(
    acceptor_and_worker: tuple[Acceptor, Worker, tuple[str, int]],
) -> None:
    """The prefork-pool how-to's handler: open the streams, write, drain, return. The writer
    the handler drops on return is closed by the client (no "unclosed StreamWriter" warning,
    an error in this suite), and its bytes reach the peer before the connection ends."""
    acceptor, worker, addr = acceptor_and_worker
    writers: list[weakref.ref[asyncio.StreamWriter]] = []

    async def handle(client: HandedClient) -> None:
        reader, writer = await client.open_streams()
        writers.append(weakref.ref(writer))  # weak: the handler's reference is the only one
        writer.write(b"hello " + await reader.read())
        await writer.drain()

    serving = asyncio.ensure_future(worker.serve(handle))
    answers = await within(asyncio.gather(*(talk(addr, b"%d" % n) for n in range(5))))
    assert sorted(answers) == [b"hello %d" % n for n in range(5)]
    await wait_until(lambda: acceptor.stats().completed == 5)
    gc.collect()  # a writer collected while its transport was open warned by now
    alive = [writer for ref in writers if (writer := ref()) is not None]
    assert all(writer.transport.is_closing() for writer in alive)
    acceptor.close()
    await within(serving)


class Upper(asyncio.Protocol):
    def __init__(self, client: HandedClient) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.done()


async def test_protocol_one_liner(
    acceptor_and_worker: tuple[Acceptor, Worker, tuple[str, int]],
) -> None:
    acceptor, worker, addr = acceptor_and_worker
    made: list[Upper] = []

    async def serve() -> None:
        async for client in worker:
            _transport, protocol = await client.connect_protocol(functools.partial(Upper, client))
            # The factory's own type comes back, for mypy (tests are type-checked) and at run
            # time: no cast needed to reach the protocol's attributes.
            assert_type(protocol, Upper)
            assert protocol.client is client
            made.append(protocol)

    task = asyncio.ensure_future(serve())
    assert await talk(addr, b"shout") == b"SHOUT"
    await wait_until(lambda: acceptor.stats().completed == 1)
    assert len(made) == 1
    task.cancel()


async def test_handler_form_reports_every_client_even_when_the_handler_fails(
    acceptor_and_worker: tuple[Acceptor, Worker, tuple[str, int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    acceptor, worker, addr = acceptor_and_worker

    async def handler(client: HandedClient) -> None:
        loop = asyncio.get_running_loop()
        data = await loop.sock_recv(client.sock, 100)
        if data == b"boom":
            raise RuntimeError("handler bug")
        await loop.sock_sendall(client.sock, data[::-1])

    serving = asyncio.ensure_future(worker.serve(handler))
    with caplog.at_level(logging.ERROR, logger="aioancillary"):
        answers = await within(asyncio.gather(*(talk(addr, t) for t in (b"abc", b"boom", b"xy"))))
    assert answers == [b"cba", b"", b"yx"]
    assert "client handler failed" in caplog.text
    await wait_until(lambda: acceptor.stats().completed == 3)
    acceptor.close()
    await within(serving)  # the acceptor closed: serve() returns


async def test_clients_queued_when_the_worker_closes_are_closed_and_reported(
    acceptor_and_worker: tuple[Acceptor, Worker, tuple[str, int]],
) -> None:
    acceptor, worker, addr = acceptor_and_worker
    reader, writer = await asyncio.open_connection(*addr)
    await wait_until(lambda: acceptor.stats().handed == 1)
    await asyncio.sleep(0)  # the worker reads it
    worker.close()
    assert await within(reader.read()) == b""
    writer.close()
    await writer.wait_closed()
    await within(worker.wait_closed())


@pytest.mark.parametrize(
    "message",
    [
        b"Cxx",  # a record cut short
        b"C\x00\x00\x7f\x00\x00\x01\x00\x50",  # an address cut short
        b"C\x00\x05\x06\x7f\x00\x00\x01\x00\x50",  # a listener never announced
        b"C\x00\x00\x06\x7f\x00\x00\x01\x00\x50" * 2,  # two clients, one fd
        b"Q",
        b'W{"v": 99}',
    ],
)
async def test_a_misbehaving_acceptor_gets_a_clear_error_and_its_fds_are_closed(
    message: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    ours, theirs = socket.socketpair()
    fake = AncillaryConnection(ours)
    worker = await Worker.connect(sock=theirs)
    if not message.startswith(b"W"):
        await fake.send(wire.welcome_message())
    r, w = os.pipe()
    with caplog.at_level(logging.ERROR, logger="aioancillary"):
        await fake.send_fds(message, [r])
        os.close(r)
        with pytest.raises(ProtocolError):
            await within(worker.__anext__())
    assert "closing the link to the acceptor" in caplog.text
    with pytest.raises(BrokenPipeError):  # the worker closed the read end it got
        os.write(w, b"x")
    os.close(w)
    worker.close()
    await within(worker.wait_closed())
    fake.close()
    await within(fake.wait_closed())


async def test_worker_refuses_an_unauthorized_acceptor(tmp_path: Path) -> None:
    acceptor = Acceptor()
    await acceptor.listen_for_workers(tmp_path / "w.sock")
    with pytest.raises(PeerRejectedError):
        await Worker.connect(tmp_path / "w.sock", authorize=lambda creds: False)
    with pytest.raises(ValueError, match="exactly one"):
        await Worker.connect()
    acceptor.close()
    await within(acceptor.wait_closed())


async def test_two_iterators_are_refused() -> None:
    async with acceptor_with_workers(0) as (acceptor, _workers, _addr):
        ours, theirs = socket.socketpair()
        acceptor.add_worker(ours)
        async with await Worker.connect(sock=theirs) as worker:
            first = asyncio.ensure_future(worker.__anext__())
            await asyncio.sleep(0)
            with pytest.raises(RuntimeError, match="already iterating"):
                await worker.__anext__()
            first.cancel()


async def _fake_acceptor() -> tuple[AncillaryConnection, Worker, socket.socket]:
    """A worker linked to a hand-written acceptor with one TCP listener (id 0, "web")."""
    ours, theirs = socket.socketpair()
    fake = AncillaryConnection(ours)
    worker = await Worker.connect(sock=theirs)
    listener = socket.create_server(("127.0.0.1", 0))
    await fake.send(wire.welcome_message())
    await fake.send(wire.listener_message(0, listener, "web", {}))
    return fake, worker, listener


async def _hand(fake: AncillaryConnection, accepted: list[socket.socket]) -> None:
    pack = wire.record_packer(0, socket.AF_INET)
    records = [pack(("127.0.0.1", n)) for n in range(1, len(accepted) + 1)]
    await fake.send_fds(wire.client_message(records), accepted, close_fds=True)


async def _finished(fake: AncillaryConnection, count: int) -> None:
    done = 0
    while done < count:
        with await within(fake.recv()) as report:
            done += wire.parse_done(report.data)
    assert done == count


async def _close_fake(fake: AncillaryConnection, worker: Worker, *socks: socket.socket) -> None:
    for sock in socks:
        sock.close()
    fake.close()  # the worker's client stream ends
    await within(fake.wait_closed())
    worker.close()
    await within(worker.wait_closed())


async def test_a_client_fd_that_is_not_a_socket_is_closed_and_reported_the_rest_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, worker, listener = await _fake_acceptor()
    pack = wire.record_packer(0, socket.AF_INET)
    good1, peer1 = _tcp_pair(listener)
    good2, peer2 = _tcp_pair(listener)
    r, w = os.pipe()
    records = [pack(("127.0.0.1", n)) for n in (1, 2, 3)]
    with caplog.at_level(logging.ERROR, logger="aioancillary"):
        await fake.send_fds(wire.client_message(records), [good1, r, good2], close_fds=True)
        first = await within(worker.__anext__())
        second = await within(worker.__anext__())
    assert "cannot use a client from listener 'web'" in caplog.text
    with pytest.raises(BrokenPipeError):  # the worker closed the pipe's read end at once
        os.write(w, b"x")
    os.close(w)
    assert [c.peername for c in (first, second)] == [("127.0.0.1", 1), ("127.0.0.1", 3)]
    with first, second:
        first.sock.sendall(b"one")
        second.sock.sendall(b"three")
    assert (peer1.recv(8), peer2.recv(8)) == (b"one", b"three")
    # Every client counts as finished, the refused one too: 3 in all, in one or more reports.
    finished = 0
    while finished < 3:
        with await within(fake.recv()) as report:
            finished += wire.parse_done(report.data)
    assert finished == 3
    for sock in (peer1, peer2, listener):
        sock.close()
    worker.close()
    await within(worker.wait_closed())
    fake.close()
    await within(fake.wait_closed())


async def test_completions_pending_when_the_acceptor_is_gone_are_dropped_quietly() -> None:
    """A worker closing (or flushing its reports) after the acceptor died does not raise."""
    fake, worker, listener = await _fake_acceptor()
    accepted, peer = _tcp_pair(listener)
    record = wire.record_packer(0, socket.AF_INET)(("127.0.0.1", 1))
    await fake.send_fds(wire.client_message([record]), [accepted], close_fds=True)
    client = await within(worker.__anext__())
    fake.abort()  # the acceptor dies
    await within(fake.wait_closed())
    await within(_end(worker))  # the worker saw the end of the link
    client.done()  # a report for nobody
    worker.close()  # sends what is pending: fails with EPIPE, quietly
    await within(worker.wait_closed())
    for sock in (peer, listener):
        sock.close()


async def _end(worker: Worker) -> None:
    with pytest.raises(StopAsyncIteration):
        await worker.__anext__()


def _tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    peer = socket.create_connection(listener.getsockname())
    accepted, _addr = listener.accept()
    return accepted, peer


async def test_client_sockets_store_the_enum_family_and_type_that_socket_socket_reports(
    acceptor_and_worker: tuple[Acceptor, Worker, tuple[str, int]],
) -> None:
    """Stored once from the listener's announcement instead of rebuilt on each read; the
    values are the ones a plain ``socket.socket`` gives for the same fd, and a dup keeps them."""
    _acceptor, worker, addr = acceptor_and_worker
    _reader, writer = await asyncio.open_connection(*addr)
    with await within(worker.__anext__()) as client:
        plain = socket.socket(fileno=os.dup(client.sock.fileno()))
        with plain:
            assert client.sock.family is plain.family is socket.AF_INET
            assert client.sock.type is plain.type is socket.SOCK_STREAM
        copy = client.sock.dup()
        with copy:
            assert isinstance(copy, socket.socket)
            assert (copy.family, copy.type) == (socket.AF_INET, socket.SOCK_STREAM)
            assert copy.getpeername() == client.peername
            assert "family=" in repr(copy)
    writer.close()
    await writer.wait_closed()


async def test_deliver_calls_the_sink_from_the_link_for_each_client_queued_ones_first() -> None:
    fake, worker, listener = await _fake_acceptor()
    pairs = [_tcp_pair(listener) for _ in range(3)]
    await _hand(fake, [pairs[0][0]])
    queued = await within(worker.__anext__())  # taken before the sink existed: not re-queued
    await _hand(fake, [pairs[1][0]])
    await wait_until(lambda: len(worker._queue) == 1)
    seen: list[tuple[Any, asyncio.Task[Any] | None]] = []

    def sink(client: HandedClient) -> None:
        seen.append((client.peername, asyncio.current_task()))
        client.sock.sendall(b"hi")
        client.done()

    delivering = asyncio.create_task(worker._deliver(sink))
    await wait_until(lambda: len(seen) == 1)  # the queued one, from the delivering task
    await _hand(fake, [pairs[2][0]])
    await wait_until(lambda: len(seen) == 2)
    assert [peer for peer, _task in seen] == [("127.0.0.1", 1), ("127.0.0.1", 1)]
    assert seen[0][1] is delivering
    assert seen[1][1] is None  # called in the link's read callback, no task in between
    assert not worker._queue
    with queued:
        queued.sock.sendall(b"hi")
    assert [peer.recv(8) for _accepted, peer in pairs] == [b"hi"] * 3
    await _finished(fake, 3)
    await _close_fake(fake, worker, listener, *(peer for _accepted, peer in pairs))
    await within(delivering)  # the stream ended: _deliver returns
    assert worker._sink is None


async def test_a_sink_that_raises_gets_the_client_finished_and_the_next_one_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, worker, listener = await _fake_acceptor()
    (a, peer_a), (b, peer_b) = _tcp_pair(listener), _tcp_pair(listener)
    served: list[HandedClient] = []

    def sink(client: HandedClient) -> None:
        if client.peername == ("127.0.0.1", 1):
            raise RuntimeError("cannot serve this one")
        served.append(client)

    delivering = asyncio.create_task(worker._deliver(sink))
    with caplog.at_level(logging.ERROR, logger="aioancillary"):
        await _hand(fake, [a, b])
        await wait_until(lambda: len(served) == 1)
    assert "could not start serving" in caplog.text
    assert "cannot serve this one" in caplog.text
    assert peer_a.recv(8) == b""  # closed...
    await _finished(fake, 1)  # ...and reported, while the other is still served
    with served[0]:
        served[0].sock.sendall(b"ok")
    assert peer_b.recv(8) == b"ok"
    await _finished(fake, 1)
    await _close_fake(fake, worker, listener, peer_a, peer_b)
    await within(delivering)


async def test_adopting_passes_sockets_on_as_they_came_and_the_loop_makes_them_nonblocking() -> (
    None
):
    """With ``adopting``, the worker does not call ``setblocking(False)``: the loop's transport
    does it when it takes the socket (``_adopt``). The fd here comes blocking, as
    ``socket.accept()`` makes it, so the test sees who set the flag."""
    fake, worker, listener = await _fake_acceptor()
    accepted, peer = _tcp_pair(listener)
    assert os.get_blocking(accepted.fileno())
    blocking_in_sink: list[bool] = []
    transports: list[asyncio.Transport] = []
    clients: list[HandedClient] = []

    class Upper(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)  # type: ignore[arg-type]

        def data_received(self, data: bytes) -> None:
            transports[0].write(data.upper())

        def connection_lost(self, exc: Exception | None) -> None:
            clients[0].done()

    def failed(exc: Exception) -> None:
        pytest.fail(f"the loop refused the socket: {exc!r}")

    def sink(client: HandedClient) -> None:
        clients.append(client)
        blocking_in_sink.append(os.get_blocking(client.sock.fileno()))
        client._adopt(Upper, failed)

    delivering = asyncio.create_task(worker._deliver(sink, adopting=True))
    await _hand(fake, [accepted])
    await wait_until(lambda: bool(transports))
    assert blocking_in_sink == [True]
    assert not os.get_blocking(transports[0].get_extra_info("socket").fileno())
    peer.sendall(b"abc")
    assert await within(asyncio.to_thread(peer.recv, 8)) == b"ABC"
    peer.close()  # the transport sees the end; Upper finishes the client
    await _finished(fake, 1)
    await _close_fake(fake, worker, listener)
    await within(delivering)


async def test_adopt_reports_a_refused_socket_to_its_callback_and_done_closes_it() -> None:
    """The loop never made a transport (the protocol factory raised): ``failed`` gets the
    error, and the client, still owning its socket, is closed and reported by ``done()``."""
    fake, worker, listener = await _fake_acceptor()
    accepted, peer = _tcp_pair(listener)
    failures: list[Exception] = []

    def factory() -> asyncio.Protocol:
        raise RuntimeError("no protocol today")

    def sink(client: HandedClient) -> None:
        client._adopt(factory, failures.append)
        assert failures  # at once: the factory runs before the coroutine first waits
        client.done()

    delivering = asyncio.create_task(worker._deliver(sink, adopting=True))
    await _hand(fake, [accepted])
    await _finished(fake, 1)
    assert [str(exc) for exc in failures] == ["no protocol today"]
    assert peer.recv(8) == b""
    await _close_fake(fake, worker, listener, peer)
    await within(delivering)
