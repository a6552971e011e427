"""The acceptor with workers in this process: listeners, dispatch, limits, bad workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import open_fd_count, wait_until, within
from helpers.acceptor import (
    acceptor_with_workers,
    fake_worker,
    link_transport,
    linked_worker,
    request,
)
from helpers.speedups import require_extension

from aioancillary import (
    Acceptor,
    AncillaryConnection,
    AncillaryMessage,
    ConnectionClosedError,
    Credentials,
    Worker,
    WorkerInfo,
)
from aioancillary._kernel import _accel


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(params=["python", "C"])
def hand_off_path(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, Counter[str]]:
    """The acceptor's accept burst and hand-off on the Python path, then on the C one
    (whichever the process selected); counts the C functions' calls."""
    calls: Counter[str] = Counter()
    names = ("accept_into", "client_batch", "close_item_fds")
    if request.param == "python":
        for name in names:
            monkeypatch.setattr(_accel, name, None)
        return "python", calls
    module = require_extension()

    def counted(name: str) -> Any:
        real = getattr(module, name)

        def call(*args: Any) -> Any:
            calls[name] += 1
            return real(*args)

        return call

    for name in names:
        monkeypatch.setattr(_accel, name, counted(name))
    return "C", calls


async def test_metadata_and_addresses_on_ipv4_ipv6_and_unix_listeners(
    tmp_path: Path, hand_off_path: tuple[str, Counter[str]]
) -> None:
    async with acceptor_with_workers(1) as (acceptor, _workers, v4):
        if _ipv6_loopback():
            v6_listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
            v6 = v6_listener.getsockname()
            acceptor.add_listener(v6_listener, metadata={"v": 6, "nested": {"a": [1, "é"]}})
        unix_listener = socket.socket(socket.AF_UNIX)
        unix_listener.bind(str(tmp_path / "clients.sock"))
        unix_listener.listen()
        acceptor.add_listener(unix_listener, name="unix")

        answer = await request(v4)
        assert answer["listener"] == "tcp"
        assert answer["metadata"] == {"plain": True}
        assert answer["peer"][0] == "127.0.0.1"

        if _ipv6_loopback():
            reader, writer = await asyncio.open_connection(*v6[:2])
            peer = writer.get_extra_info("sockname")
            writer.write(b"six")
            answer = json.loads(await within(reader.readline()))
            writer.close()
            await writer.wait_closed()
            assert answer["listener"] == f"[::1]:{v6[1]}"
            assert answer["metadata"] == {"v": 6, "nested": {"a": [1, "é"]}}
            assert tuple(answer["peer"]) == peer

        answer = await request(str(tmp_path / "clients.sock"), family=socket.AF_UNIX)
        assert (answer["listener"], answer["metadata"], answer["peer"]) == ("unix", {}, "")

        # A client bound to a path shows up with that path.
        client = socket.socket(socket.AF_UNIX)
        client.bind(str(tmp_path / "client-name"))
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(client, str(tmp_path / "clients.sock"))
        reader, writer = await asyncio.open_unix_connection(sock=client)
        writer.write(b"named")
        answer = json.loads(await within(reader.readline()))
        writer.close()
        await writer.wait_closed()
        assert answer["peer"] == str(tmp_path / "client-name")
        await wait_until(lambda: acceptor.stats().completed == 3 + _ipv6_loopback())
    path, calls = hand_off_path
    if path == "C":  # every client went through the C functions
        clients = 3 + _ipv6_loopback()
        assert calls["accept_into"] >= clients
        assert calls["client_batch"] >= clients
        assert calls["close_item_fds"] >= clients


async def test_round_robin_alternates() -> None:
    async with acceptor_with_workers(2, dispatch="round-robin") as (_acceptor, _workers, addr):
        names = [(await request(addr))["worker"] for _ in range(6)]
    assert names == ["w0", "w1"] * 3


async def test_least_busy_avoids_the_busy_worker() -> None:
    async with acceptor_with_workers(2) as (acceptor, workers, addr):
        workers[0].hold = workers[1].hold = True
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"held")
        await wait_until(lambda: len(workers[0].held) + len(workers[1].held) == 1)
        busy, idle = workers if workers[0].held else workers[::-1]
        busy.hold = idle.hold = False
        names = {(await request(addr))["worker"] for _ in range(5)}
        assert names == {idle.name}
        assert sorted(w.in_flight for w in acceptor.workers) == [0, 1]
        await busy.release()
        assert (await within(reader.readline())).startswith(b"{")
        writer.close()
        await writer.wait_closed()


async def test_a_pickers_choice_is_followed() -> None:
    seen: list[tuple[Any, str, int]] = []

    def second(peer: Any, listener: str, workers: Sequence[WorkerInfo]) -> WorkerInfo:
        seen.append((peer, listener, len(workers)))
        return workers[1]

    async with acceptor_with_workers(2, dispatch=second) as (_acceptor, _workers, addr):
        names = [(await request(addr))["worker"] for _ in range(4)]
    assert names == ["w1"] * 4
    assert all(peer[0] == "127.0.0.1" and name == "tcp" and n == 2 for peer, name, n in seen)


async def test_sticky_picker_by_client_address() -> None:
    def sticky(peer: Any, listener: str, workers: Sequence[WorkerInfo]) -> WorkerInfo:
        port: int = peer[1]
        return workers[port % len(workers)]  # by client port: any stable key works

    async with acceptor_with_workers(2, dispatch=sticky) as (_acceptor, _workers, addr):
        for _ in range(4):
            answer = await request(addr)
            assert answer["worker"] == f"w{answer['peer'][1] % 2}"


async def test_a_failing_picker_falls_back_to_least_busy() -> None:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))

    def broken(peer: Any, listener: str, workers: Sequence[WorkerInfo]) -> WorkerInfo:
        raise RuntimeError("picker bug")

    def stranger(peer: Any, listener: str, workers: Sequence[WorkerInfo]) -> Any:
        return "not a worker"

    for picker in (broken, stranger):
        async with acceptor_with_workers(1, dispatch=picker) as (_acceptor, _workers, addr):
            assert (await request(addr))["worker"] == "w0"
    assert isinstance(errors[0]["exception"], RuntimeError)
    assert "not one of the workers" in errors[1]["message"]


async def test_accepting_stops_at_the_limit_and_resumes_when_a_worker_frees_up() -> None:
    async with acceptor_with_workers(1, worker_limit=2) as (acceptor, workers, addr):
        worker = workers[0]
        worker.hold = True
        clients = [await asyncio.open_connection(*addr) for _ in range(5)]
        for n, (_reader, writer) in enumerate(clients):
            writer.write(f"client {n}".encode())
        await wait_until(lambda: len(worker.held) == 2)
        assert not acceptor.stats().accepting
        assert acceptor.stats().accepted == 2  # the other 3 wait in the kernel's backlog
        for step in range(3):
            await worker.release(1)
            await wait_until(lambda s=step: acceptor.stats().accepted == 3 + s)  # type: ignore[misc]
            await wait_until(lambda: len(worker.held) == 2)
            assert not acceptor.stats().accepting
        worker.hold = False
        await worker.release()
        answers = [await within(reader.readline()) for reader, _writer in clients]
        assert [json.loads(a)["request"] for a in answers] == [f"client {n}" for n in range(5)]
        await wait_until(lambda: acceptor.stats().accepting)
        for _reader, writer in clients:
            writer.close()
            await writer.wait_closed()
        assert await acceptor.drain(timeout=5)


async def test_no_worker_no_accepting_until_one_registers() -> None:
    acceptor = Acceptor()
    listener = socket.create_server(("127.0.0.1", 0))
    acceptor.add_listener(listener)
    addr = listener.getsockname()
    pending = asyncio.ensure_future(request(addr, "early"))
    await asyncio.sleep(0.05)  # a client connects while no worker exists: it must wait
    assert not pending.done()
    assert acceptor.stats().accepted == 0
    worker = await linked_worker(acceptor, "late")
    assert (await within(pending))["request"] == "early"
    acceptor.close()
    await worker.close()
    await within(acceptor.wait_closed())


async def test_registration_with_authorize(tmp_path: Path) -> None:
    path = tmp_path / "workers.sock"
    checked: list[Credentials | None] = []

    def same_user(creds: Credentials | None) -> bool:
        checked.append(creds)
        return creds is not None and creds.uid == os.getuid()

    acceptor = Acceptor()
    await acceptor.listen_for_workers(path, authorize=same_user)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    async with await Worker.connect(path) as worker:
        await wait_until(lambda: len(acceptor.workers) == 1)
        assert acceptor.workers[0].pid == os.getpid()
        assert checked[0] is not None
        assert checked[0].pid == os.getpid()
        acceptor.close()
        assert [c async for c in worker] == []  # the acceptor closed: iteration ends
    await within(acceptor.wait_closed())


async def test_authorize_refuses_a_worker(tmp_path: Path) -> None:
    acceptor = Acceptor()
    await acceptor.listen_for_workers(tmp_path / "w.sock", authorize=lambda creds: False)
    async with await Worker.connect(tmp_path / "w.sock") as worker:
        with pytest.raises(ConnectionClosedError, match="before welcoming"):
            await within(worker.__anext__())
    assert acceptor.workers == ()
    acceptor.close()
    await within(acceptor.wait_closed())


@pytest.mark.parametrize(
    "garbage",
    [b"Zzzzz", b"D\0\0\0\0", b"D\0\0\0\x05", b"D\0\0\0\x01extra", b"", "fds"],
    ids=["unknown-kind", "zero-count", "more-than-in-flight", "trailing-bytes", "empty", "fds"],
)
async def test_garbage_from_a_worker_drops_it_and_service_goes_on(
    garbage: bytes | str, caplog: pytest.LogCaptureFixture
) -> None:
    acceptor = Acceptor()
    listener = socket.create_server(("127.0.0.1", 0))
    acceptor.add_listener(listener)
    addr = listener.getsockname()
    fake = await fake_worker(acceptor)
    reader, writer = await asyncio.open_connection(*addr)
    messages: list[AncillaryMessage] = []
    while len(messages) < 2:  # the listener announcement, then the client
        messages.append(await within(fake.recv()))
    assert messages[1].data.startswith(b"C")
    assert acceptor.stats().in_flight == 1
    with caplog.at_level(logging.ERROR, logger="aioancillary"):
        if garbage == "fds":
            r, w = os.pipe()
            await fake.send_fds(b"D\0\0\0\x01", [r, w])
            os.close(r)
            os.close(w)
        else:
            assert isinstance(garbage, bytes)
            await fake.send(garbage)
        await wait_until(lambda: acceptor.workers == ())
    assert "dropping worker #0" in caplog.text
    stats = acceptor.stats()
    assert (stats.lost, stats.in_flight, stats.completed) == (1, 0, 0)
    for msg in messages:
        msg.close()  # the fake worker "dies": its client's connection is closed
    assert await within(reader.read()) == b""
    writer.close()
    await writer.wait_closed()
    fake.close()
    await within(fake.wait_closed())
    # The acceptor goes on with a well-behaved worker.
    good = await linked_worker(acceptor, "good")
    assert (await request(addr))["worker"] == "good"
    acceptor.close()
    await good.close()
    await within(acceptor.wait_closed())


async def test_stop_accepting_drain_and_close() -> None:
    async with acceptor_with_workers(1) as (acceptor, workers, addr):
        workers[0].hold = True
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"in flight")
        await wait_until(lambda: len(workers[0].held) == 1)
        acceptor.stop_accepting()
        assert acceptor.listeners == ()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*addr)
        assert not await acceptor.drain(timeout=0.01)
        drained = asyncio.ensure_future(acceptor.drain())
        await workers[0].release()
        assert await within(drained)
        assert b"in flight" in await within(reader.readline())
        writer.close()
        await writer.wait_closed()
        with (
            socket.create_server(("127.0.0.1", 0)) as late,
            pytest.raises(ValueError, match="stop"),
        ):
            acceptor.add_listener(late)


async def test_listener_must_be_listening() -> None:
    acceptor = Acceptor()
    with socket.socket() as sock, pytest.raises(ValueError, match="listen"):
        acceptor.add_listener(sock)
    with pytest.raises(ValueError, match="at least 1"):
        Acceptor(worker_limit=0)
    acceptor.close()


async def test_many_clients_in_one_wake_are_batched_per_worker() -> None:
    async with acceptor_with_workers(2) as (acceptor, _workers, addr):
        await request(addr, "0")  # uvloop opens an fd of its own on first use: count after
        base = open_fd_count()
        # 200 clients at once: a generous deadline (a loaded machine, asyncio's debug mode).
        answers = await within(asyncio.gather(*(request(addr, str(n)) for n in range(1, 201))), 60)
        assert sorted(int(a["request"]) for a in answers) == list(range(1, 201))
        assert {a["worker"] for a in answers} == {"w0", "w1"}
        assert await acceptor.drain(timeout=30)  # reports lag answers by a loop iteration
        stats = acceptor.stats()
        assert (stats.accepted, stats.handed, stats.completed, stats.lost) == (201, 201, 201, 0)
        await wait_until(lambda: open_fd_count() == base, timeout=30)


@pytest.mark.parametrize("how", ["exits", "garbage"])
async def test_clients_queued_for_a_leaving_worker_go_to_another(how: str) -> None:
    acceptor = Acceptor()
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    acceptor.add_listener(listener)
    addr = listener.getsockname()
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum: fills fast
    link = acceptor.add_worker(ours)
    transport = link_transport(link)
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    while transport.get_write_buffer_fds() == 0:  # until clients queue on this side
        assert len(clients) < 500
        clients.append(await asyncio.open_connection(*addr))
        clients[-1][1].write(f"client {len(clients) - 1}".encode())
        await wait_until(lambda: acceptor.stats().handed == len(clients))
    for _ in range(3):  # and a few more behind it, queued on this side
        clients.append(await asyncio.open_connection(*addr))
        clients[-1][1].write(f"client {len(clients) - 1}".encode())
    await wait_until(lambda: acceptor.stats().handed == len(clients))
    queued = transport.get_write_buffer_fds()
    assert queued >= 4
    good = await linked_worker(acceptor, "good")
    if how == "exits":
        theirs.close()  # the worker dies: what its socket held dies with it
    else:
        fake = AncillaryConnection(theirs)
        await fake.send(b"nonsense")
    await wait_until(lambda: acceptor.stats().requeued == queued)
    if how == "garbage":  # the dropped worker goes away with what it had read
        fake.abort()
        await within(fake.wait_closed())
    answered = lost = 0
    for reader, writer in clients:
        try:
            line = await within(reader.readline())
        except ConnectionResetError:  # closed with unread bytes: a reset
            line = b""
        if line:
            assert json.loads(line)["worker"] == "good"
            answered += 1
        else:
            lost += 1
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()
    assert await acceptor.drain(timeout=5)
    stats = acceptor.stats()
    assert (answered, lost) == (queued, len(clients) - queued)
    assert (stats.requeued, stats.lost, stats.completed) == (answered, lost, answered)
    acceptor.close()
    await good.close()
    await within(acceptor.wait_closed())


async def test_wait_workers() -> None:
    acceptor = Acceptor()
    waiting = asyncio.ensure_future(acceptor.wait_workers(2))
    first = await linked_worker(acceptor, "a")
    await asyncio.sleep(0)
    assert not waiting.done()
    second = await linked_worker(acceptor, "b")
    await within(waiting)
    await within(acceptor.wait_workers(1))  # already there: returns at once
    acceptor.close()
    for worker in (first, second):
        await worker.close()
    await within(acceptor.wait_closed())
