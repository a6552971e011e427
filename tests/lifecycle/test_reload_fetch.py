"""The successor's side of a reload handoff under predecessors that misbehave.

The running generation is a peer like any other: it may never answer, never release, send
garbage, drip messages without end, send more fds than anyone needs, or hand a connected
socket over as a listener. Each time the successor must end with a clear error and every
received fd closed (the open-fd check around each test sees a leak).

Step timeouts: a test that needs one to fire drives that step with a predecessor that never
answers; every other deadline is generous.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest
from helpers import TIMEOUT, is_open, nofile_at_least, within
from helpers.reload import closing, listener

from aioancillary import AncillaryConnection, start_unix_server
from aioancillary._core._errors import FdTypeError
from aioancillary._lifecycle._reload import HandoffError, HandoffTimeoutError, start_generation

# -- a predecessor that stops answering --------------------------------------------------------


async def test_predecessor_that_hands_fds_over_but_never_releases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "handoff.sock"
    sent = asyncio.Event()

    async def half_old(conn: AncillaryConnection) -> None:
        with await conn.recv():
            pass
        with listener() as sock:
            await conn.send_fds(b'{"op":"fds","names":["web"],"last":true}', [sock])
        sent.set()
        async for msg in conn:  # never answers "ready"; ends when the successor closes
            msg.close()

    async with await start_unix_server(half_old, path):
        gen = await within(start_generation(path, timeout=TIMEOUT))
        # Only the step that must time out (the release) is short; it waits on a
        # predecessor that never answers.
        monkeypatch.setattr(gen, "_timeout", 0.1)
        async with closing(gen):
            gen.take_socket("web").close()
            with pytest.raises(HandoffTimeoutError, match="waiting for the predecessor to release"):
                await within(gen.ready())
        assert sent.is_set()


@pytest.mark.parametrize(
    "reply",
    [
        (b'{"op":"fds","names":["a","b"],"last":true}', 1),
        (b'{"op":"fds","names":"web","last":true}', 1),
        (b'{"op":"fds","names":["a:b"],"last":true}', 1),
        (b'{"op":"released"}', 1),
        (b"\xff", 0),
    ],
)
async def test_garbage_from_the_old_one_closes_every_fd(
    tmp_path: Path, reply: tuple[bytes, int]
) -> None:
    path = tmp_path / "handoff.sock"
    data, nfds = reply

    async def bad_old(conn: AncillaryConnection) -> None:
        with await conn.recv():
            pass
        pipes = [os.pipe() for _ in range(nfds)]
        await conn.send_fds(data, [r for r, _ in pipes])
        for r, w in pipes:
            os.close(r)
            os.close(w)
        async for msg in conn:
            msg.close()

    async with await start_unix_server(bad_old, path):
        with pytest.raises(HandoffError, match="protocol error"):
            await within(start_generation(path))


# -- a predecessor that sends without end ------------------------------------------------------


async def test_a_dripping_predecessor_meets_one_deadline_for_the_whole_fetch(
    tmp_path: Path,
) -> None:
    """Each message comes well within the step timeout; the fetch as a whole never ends."""
    path = tmp_path / "handoff.sock"

    async def drip(conn: AncillaryConnection) -> None:
        with await conn.recv():
            pass
        r, w = os.pipe()
        try:
            for i in range(1_000_000):
                await conn.send_fds(f'{{"op":"fds","names":["p{i}"],"last":false}}'.encode(), [r])
                await asyncio.sleep(0.01)
        finally:
            os.close(r)
            os.close(w)

    async with await start_unix_server(drip, path):
        # However slow this machine, the fetch can only end at its deadline (or, with the
        # old per-message timeout, never: then `within` fails).
        with pytest.raises(HandoffTimeoutError, match=r"did not hand its fds over within 0.5 s"):
            await within(start_generation(path, timeout=0.5))


async def test_the_fetch_takes_at_most_max_fds(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"

    async def flood(conn: AncillaryConnection) -> None:
        with await conn.recv():
            pass
        r, w = os.pipe()
        try:
            for i in range(20):  # 20 x 253 fds: 5,060, if anyone took them all
                names = [f"p{i}-{j}" for j in range(253)]
                body = json.dumps({"op": "fds", "names": names, "last": False})
                await conn.send_fds(body.encode(), [r] * 253)
        finally:
            os.close(r)
            os.close(w)
        async for msg in conn:
            msg.close()

    with nofile_at_least(8192):
        async with await start_unix_server(flood, path):
            with pytest.raises(HandoffError, match=r"more than max_fds=1024 fds; nothing"):
                await within(start_generation(path, timeout=TIMEOUT))
            with pytest.raises(HandoffError, match=r"more than max_fds=300 fds; nothing"):
                await within(start_generation(path, timeout=TIMEOUT, max_fds=300))


# -- a connected socket handed over as a listener ----------------------------------------------


async def test_a_connected_socket_offered_as_a_listener_is_refused_and_closed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "handoff.sock"
    with listener() as server, socket.create_connection(server.getsockname()) as client:
        accepted, _ = server.accept()
        with accepted:
            g1 = await within(start_generation(path, systemd=False))
            async with closing(g1):
                g1.offer("web", client)  # a connected TCP socket, named like a listener
                g1.offer("peer", accepted)
                await within(g1.ready())
                g2 = await within(start_generation(path))
                async with closing(g2):
                    (web_fd,) = [fd.fileno() for name, fd in g2.inherited._items if name == "web"]
                    with pytest.raises(FdTypeError) as info:
                        g2.take_socket("web")
                    assert not is_open(web_fd)  # refused, and closed at once
                    assert "web" not in g2.inherited
                    message = str(info.value)
                    assert "SOCK_STREAM socket that is not listening (SO_ACCEPTCONN" in message
                    assert (
                        f"came from the predecessor (pid {os.getpid()}) and was closed" in message
                    )
                    # A connected socket asked for as one is taken.
                    with g2.take_socket("peer", listening=False) as peer:
                        assert peer.getpeername() == client.getsockname()
                    assert g2.offered == ["peer"]
