"""Both fd holder clients against a scripted fake holder: what they do when the peer is not a
holder, closes unanswered, breaks the framing, moves, or goes away for good.

The fake holder is a thread with a blocking listening socket; each accepted connection plays
one script (read a request, answer something, close...). The clients run on each loop (the
asyncio one) or blocking; every fd either side sees is closed by the end (the suite's fd
check).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.fdholder import RawPeer

from aioancillary import (
    AncillaryMessage,
    FdHolderBlockingClient,
    FdHolderClient,
    FdHolderError,
    FdHolderRefusedError,
    ProtocolError,
    send_fds,
)
from aioancillary._core._framing import FrameDecoder, frame_header
from aioancillary._fdholder._takeover import request_takeover
from aioancillary._fdholder._wire import encode

HELLO = encode("hello", version=1, pid=4242, max_entries=10, max_fds=20)

#: One connection's script: called with the accepted socket, as a raw peer of the client.
Script = Callable[["ServerSide"], None]


class ServerSide(RawPeer):
    """The fake holder's end of one connection (framed, blocking)."""

    def __init__(self, sock: socket.socket) -> None:  # the socket is already connected
        self.sock = sock
        self.sock.settimeout(30)
        self.decoder = FrameDecoder(max_frame_size=16 << 20)
        self.pending: list[AncillaryMessage] = []

    def expect(self, op: str) -> dict[str, Any]:
        body = self.answer()  # what the client sent
        assert body["op"] == op, body
        return body

    def reply(self, data: bytes) -> None:
        send_fds(self.sock, frame_header(0, len(data)) + data, [])


def hello(side: ServerSide) -> None:
    side.expect("hello")
    side.reply(HELLO)


class FakeHolder:
    def __init__(self, path: Path, scripts: list[Script]) -> None:
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.listener.settimeout(30)
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(scripts,))
        self._thread.start()

    def _run(self, scripts: list[Script]) -> None:
        for script in scripts:
            try:
                sock, _ = self.listener.accept()
            except OSError as exc:
                self.errors.append(exc)
                return
            side = ServerSide(sock)
            try:
                script(side)
            except BaseException as exc:  # reported by join()
                self.errors.append(exc)
            finally:
                side.close()

    def stop_listening(self) -> None:
        """Close the listener and remove its file: later connects find nobody."""
        self.listener.close()
        Path(self.path).unlink()

    def join(self) -> None:
        self._thread.join(30)
        self.listener.close()
        assert not self.errors, self.errors


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[[list[Script]], FakeHolder]]:
    made: list[FakeHolder] = []

    def make(scripts: list[Script]) -> FakeHolder:
        holder = FakeHolder(tmp_path / "fake.sock", scripts)
        made.append(holder)
        return holder

    yield make
    for holder in made:
        holder._thread.join(30)
        holder.listener.close()


async def in_thread(call: Callable[[], Any]) -> Any:
    """Run a blocking client call off the loop (the fake holder answers from a thread too)."""
    return await asyncio.get_running_loop().run_in_executor(None, call)


def blocking_list(path: str) -> Any:
    with FdHolderBlockingClient.connect(path) as client:
        return client.list(), client.holder_pid


async def test_a_peer_that_is_not_a_holder(fake: Callable[[list[Script]], FakeHolder]) -> None:
    def not_a_holder(side: ServerSide) -> None:
        side.expect("hello")
        side.reply(b"220 smtp.example.com ESMTP")

    holder = fake([not_a_holder, not_a_holder])
    with pytest.raises(FdHolderError, match="is this the socket of an aioancillary fd holder"):
        await FdHolderClient.connect(holder.path)
    with pytest.raises(FdHolderError, match="is this the socket of an aioancillary fd holder"):
        await in_thread(lambda: FdHolderBlockingClient.connect(holder.path))
    holder.join()


async def test_a_holder_that_closes_unanswered_refused_us(
    fake: Callable[[list[Script]], FakeHolder],
) -> None:
    holder = fake([lambda side: None, lambda side: None])
    with pytest.raises(FdHolderRefusedError, match="closed the connection before answering"):
        await FdHolderClient.connect(holder.path)
    with pytest.raises(FdHolderRefusedError, match="No fd was sent"):
        await in_thread(lambda: FdHolderBlockingClient.connect(holder.path))
    holder.join()


async def test_a_framing_violation_fails_the_request_and_closes(
    fake: Callable[[list[Script]], FakeHolder],
) -> None:
    def garbage(side: ServerSide) -> None:
        hello(side)
        side.expect("list")
        side.sock.sendall(b"\x09" * 16)

    holder = fake([garbage, garbage])
    async with await FdHolderClient.connect(holder.path) as client:
        with pytest.raises(ProtocolError, match="wire-format version 9"):
            await client.list()
    blocking = await in_thread(lambda: FdHolderBlockingClient.connect(holder.path))
    with blocking, pytest.raises(ProtocolError, match="wire-format version 9"):
        await in_thread(blocking.list)
    with pytest.raises(FdHolderError, match="client is closed"):
        await in_thread(blocking.list)
    holder.join()


async def test_a_moved_holder_is_asked_again_on_a_new_connection(
    fake: Callable[[list[Script]], FakeHolder],
) -> None:
    def moved(side: ServerSide) -> None:
        hello(side)
        side.expect("list")
        side.reply(encode("error", code="moved", message="handed over: connect again"))

    def closes(side: ServerSide) -> None:
        hello(side)
        side.expect("list")  # read, then closed unanswered

    def answers(side: ServerSide) -> None:
        side.expect("hello")
        side.reply(encode("hello", version=1, pid=5151, max_entries=10, max_fds=20))
        side.expect("list")
        side.reply(encode("entries", entries=[{"name": "web", "fds": 1, "expires_in": None}]))

    holder = fake([moved, answers, closes, answers])
    async with await FdHolderClient.connect(holder.path) as client:
        assert client.holder_pid == 4242
        assert [e.name for e in await client.list()] == ["web"]
        assert client.holder_pid == 5151  # the successor answered
    entries, pid = await in_thread(lambda: blocking_list(holder.path))
    assert ([e.name for e in entries], pid) == (["web"], 5151)
    holder.join()


async def test_a_holder_gone_for_good(fake: Callable[[list[Script]], FakeHolder]) -> None:
    def closes(side: ServerSide) -> None:
        hello(side)
        side.expect("list")

    def closes_then_nobody(side: ServerSide) -> None:
        closes(side)
        holder.stop_listening()

    holder = fake([closes, closes, closes_then_nobody])
    async with await FdHolderClient.connect(holder.path) as client:
        with pytest.raises(FdHolderError, match="closed the connection twice") as caught:
            await client.list()
        assert caught.value.code == "closed"
    blocking = await in_thread(lambda: FdHolderBlockingClient.connect(holder.path))
    with blocking, pytest.raises(FdHolderError, match="no holder answers there now") as caught:
        await in_thread(blocking.list)
    assert caught.value.code == "closed"
    holder.join()


async def test_a_holder_that_never_answers(fake: Callable[[list[Script]], FakeHolder]) -> None:
    releases = [threading.Event(), threading.Event()]

    def silent(release: threading.Event) -> Script:
        def script(side: ServerSide) -> None:
            hello(side)
            side.expect("list")
            release.wait(30)

        return script

    holder = fake([silent(releases[0]), silent(releases[1])])
    async with await FdHolderClient.connect(holder.path, timeout=0.2) as client:
        with pytest.raises(TimeoutError):
            await client.list()
    releases[0].set()
    blocking = await in_thread(lambda: FdHolderBlockingClient.connect(holder.path, timeout=0.2))
    with blocking, pytest.raises(TimeoutError):
        await in_thread(blocking.list)
    releases[1].set()
    holder.join()


# -- a new holder asking a running one for its store -----------------------------------------


def answering_takeover(answer: bytes) -> Script:
    def script(side: ServerSide) -> None:
        hello(side)
        side.expect("takeover")
        side.reply(answer)

    return script


async def test_a_busy_running_holder_is_asked_again(
    fake: Callable[[list[Script]], FakeHolder],
) -> None:
    busy = encode("error", code="busy", message="its predecessor has not exited yet")
    offered = encode(
        "offered", pid=4242, entries=[{"name": "web", "key": "e0", "fds": 1, "expires_in": None}]
    )
    holder = fake([answering_takeover(busy), answering_takeover(busy), answering_takeover(offered)])
    offer = await request_takeover(holder.path, step=10.0, deadline=30.0)
    assert offer is not None
    assert [entry.name for entry in offer.entries] == ["web"]
    await offer.abort()
    holder.join()


async def test_a_running_holder_that_refuses_or_stays_busy(
    fake: Callable[[list[Script]], FakeHolder],
) -> None:
    denied = encode("error", code="denied", message="not your store")
    busy = encode("error", code="busy", message="busy")
    holder = fake([answering_takeover(denied), answering_takeover(busy)])
    with pytest.raises(FdHolderRefusedError, match="not your store"):
        await request_takeover(holder.path, step=10.0, deadline=30.0)
    with pytest.raises(FdHolderError, match="busy") as caught:
        await request_takeover(holder.path, step=10.0, deadline=0.0)
    assert caught.value.code == "busy"
    holder.join()


async def test_a_silent_running_holder_counts_as_busy(
    fake: Callable[[list[Script]], FakeHolder],
) -> None:
    release = threading.Event()

    def silent(side: ServerSide) -> None:
        side.expect("hello")
        release.wait(30)

    holder = fake([silent])
    with pytest.raises(FdHolderError, match=r"did not answer within 0\.2 s") as caught:
        await request_takeover(holder.path, step=0.2, deadline=0.0)
    assert caught.value.code == "busy"
    release.set()
    holder.join()


async def test_nobody_to_take_over_from(tmp_path: Path) -> None:
    assert await request_takeover(str(tmp_path / "nobody.sock"), step=1.0, deadline=1.0) is None
