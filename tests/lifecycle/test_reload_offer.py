"""The running generation's side of a reload handoff under peers that misbehave.

A running generation serves every peer of its handoff socket at once; only a valid ``hello``
makes a peer its successor. Silent peers, garbage, a second successor, a successor that is
never ready: each is met here by a real generation on a real socket, and the generation must
go on serving and hand over to the next real successor.

Step timeouts: a test that needs one to fire drives that step with a peer that never answers
and shortens that step only; every other deadline is generous (``NEVER``, ``TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
from pathlib import Path

import pytest
from helpers import TIMEOUT, wait_until, within
from helpers.reload import (
    NEVER,
    closing,
    first_generation,
    handoff_peers,
    raw_successor,
    retry_busy,
    wait_for_peers,
)

from aioancillary import open_unix_connection
from aioancillary._lifecycle._reload import (
    Generation,
    HandoffBusyError,
    HandoffError,
    start_generation,
)
from aioancillary._lifecycle._reload_state import GenerationState


def silent_peer(path: Path, says: bytes) -> socket.socket:
    """A same-user peer that connects and sends ``says`` (nothing, or half a frame)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.connect(str(path))  # completes at once: the kernel queues it for accept()
    if says:
        sock.send(says)
    return sock


async def hang_up_seen(sock: socket.socket) -> bool:
    """Wait until the generation closes ``sock``'s connection (True), reading what it sends."""
    loop = asyncio.get_running_loop()
    while data := await within(loop.sock_recv(sock, 4096)):
        assert b'"fds"' not in data  # never a successor: never fds
    return True


# -- silent peers ---------------------------------------------------------------------------


@pytest.mark.parametrize("says", [b"", b"\x00\x00"], ids=["nothing", "half-a-frame"])
async def test_silent_peers_do_not_delay_a_real_successor(tmp_path: Path, says: bytes) -> None:
    path = tmp_path / "handoff.sock"
    # The hello deadline is never reached here: a silent peer that held the generation would
    # hold the successor below until `within` fails.
    g1 = await first_generation(path, timeout=NEVER)
    silent = [silent_peer(path, says) for _ in range(3)]
    try:
        async with closing(g1):
            await wait_for_peers(g1, 3)  # each is being served (waiting for its hello)
            assert g1._states.state is GenerationState.SERVING
            g2 = await within(start_generation(path, timeout=TIMEOUT))
            async with closing(g2):
                assert g2.inherited.names() == ["web", "state"]
                g2.take_socket("web").close()
                g2.take_fd("state").close()
                await within(g2.ready())
                await within(g1.handed_over())
                assert handoff_peers(g1) == 4  # the silent three, and g2 holding on
        for sock in silent:  # g1's close() hung up on them, having sent them nothing
            assert await hang_up_seen(sock)
    finally:
        for sock in silent:
            sock.close()


async def test_a_silent_peer_is_dropped_at_the_hello_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "handoff.sock"
    # The one step that must time out (the hello) waits on a peer that never speaks.
    g1 = await first_generation(path, timeout=0.2)
    async with closing(g1):
        with silent_peer(path, b"") as sock, caplog.at_level(logging.WARNING, "aioancillary"):
            assert await hang_up_seen(sock)
            await wait_until(lambda: "dropped" in caplog.text)
        assert g1._states.state is GenerationState.SERVING
        assert not g1.is_handed_over()
    (line,) = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert "no answer within 0.2 s while waiting for the successor's hello" in line


# -- successors that fail -------------------------------------------------------------------


async def test_second_upgrade_is_refused_while_one_is_in_progress(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    async with closing(g1):
        conn, body, msg = await raw_successor(path)  # holds the fds, no "ready" yet
        with msg:
            assert body["names"] == ["web", "state"]
            assert len(msg.fds) == 2
        assert g1._states.state is GenerationState.HANDING_OVER
        with pytest.raises(HandoffBusyError, match="another successor is taking over right now"):
            await within(start_generation(path))
        conn.close()  # the first successor gives up: g1 serves on, and accepts the next
        await within(conn.wait_closed())
        g2 = await retry_busy(path)
        async with closing(g2):
            g2.take_socket("web").close()
            g2.take_fd("state").close()
            await within(g2.ready())
            await within(g1.handed_over())


async def test_ready_timeout_aborts_and_the_successor_is_told(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    # The one step that must time out (the successor's "ready") waits on a successor that
    # does not send it until it has seen the abort; every other step has all the time.
    g1 = await first_generation(path, timeout=NEVER, ready_timeout=0.2)
    async with closing(g1):
        g2 = await within(start_generation(path, timeout=TIMEOUT))
        async with closing(g2):
            g2.take_socket("web").close()
            await within(_wait_closed_by_peer(g2))  # g1 aborted and hung up
            with pytest.raises(HandoffError, match=r"gave up this handoff .* keeps serving"):
                await within(g2.ready())
        assert not g1.is_handed_over()
        assert g1._states.state is GenerationState.SERVING
        g3 = await within(start_generation(path))  # g1 still offers everything
        async with closing(g3):
            assert g3.inherited.names() == ["web", "state"]
            g3.inherited.close()


async def _wait_closed_by_peer(gen: Generation) -> None:
    conn = gen._predecessor
    assert conn is not None
    await wait_until(lambda: not conn.transport.is_reading())  # its EOF was read


@pytest.mark.parametrize(
    "garbage",
    [b"not json", b"[1, 2]", b'{"op": "ready"}', b'{"op": "hello", "version": 99}'],
)
async def test_garbage_from_a_peer_leaves_the_generation_serving(
    tmp_path: Path, garbage: bytes
) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    async with closing(g1):
        conn = await within(open_unix_connection(path))
        async with conn:
            await conn.send(garbage)
            async for msg in conn:  # an "abort" at most, never fds
                with msg:
                    assert json.loads(msg.data)["op"] == "abort"
                    assert msg.fds == ()
        assert g1._states.state is GenerationState.SERVING  # garbage never made a successor
        g2 = await within(start_generation(path))
        async with closing(g2):
            assert g2.inherited.names() == ["web", "state"]
            g2.inherited.close()


# -- the handoff socket's accept loop -------------------------------------------------------


class FlakyListener:
    """The handoff listener as the server sees it, with ``accept()`` failing as told."""

    def __init__(self, sock: socket.socket, error: int, times: int) -> None:
        self.sock = sock
        self.error = error
        self.times = times  # how many accept() calls fail; then the real one answers
        self.calls = 0

    def accept(self) -> tuple[socket.socket, object]:
        self.calls += 1
        if self.calls <= self.times:
            raise OSError(self.error, os.strerror(self.error))
        return self.sock.accept()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def flaky(gen: Generation, error: int, times: int) -> FlakyListener:
    server = gen._offering._server
    assert server is not None
    stand_in = FlakyListener(server._sock, error, times)  # type: ignore[arg-type]
    server._sock = stand_in  # type: ignore[assignment]
    return stand_in


def accept_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "accept" in r.getMessage()]


async def _iterations(count: int) -> None:
    for _ in range(count):  # a spinning reader would run (and log) on each of these
        await asyncio.sleep(0)


async def test_a_handoff_socket_shut_down_underneath_is_dropped_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    async with closing(g1):
        server = g1._offering._server
        assert server is not None
        with caplog.at_level(logging.WARNING, "aioancillary"):
            # Polls readable (EPOLLIN|EPOLLHUP) while accept() says EAGAIN, for ever.
            server.sockets[0].shutdown(socket.SHUT_RDWR)
            await wait_until(lambda: not server.is_serving())
            await _iterations(50)
        (line,) = accept_lines(caplog)
        assert "stopped listening: accept() failed for good" in line
        assert "shut down" in line
        assert g1._states.state is GenerationState.SERVING  # it serves its own clients on
    assert not path.exists()


async def test_a_handoff_socket_failing_for_good_is_dropped_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    async with closing(g1):
        server = g1._offering._server
        assert server is not None
        stand_in = flaky(g1, errno.EINVAL, times=1_000_000)
        with caplog.at_level(logging.WARNING, "aioancillary"), silent_peer(path, b""):
            await wait_until(lambda: not server.is_serving())
            await _iterations(50)
        assert stand_in.calls == 1  # dropped at the first failure, never tried again
        (line,) = accept_lines(caplog)
        assert "accept() failed for good" in line
        assert "Invalid argument" in line


async def test_a_handoff_socket_out_of_fds_retries_at_a_pace_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    async with closing(g1):
        stand_in = flaky(g1, errno.EMFILE, times=3)
        with caplog.at_level(logging.WARNING, "aioancillary"):
            # The successor waits in the backlog through three failed tries, then is served.
            g2 = await within(start_generation(path, timeout=TIMEOUT))
            async with closing(g2):
                assert g2.inherited.names() == ["web", "state"]
                g2.inherited.close()
        assert stand_in.calls >= 4
        started, ended = accept_lines(caplog)  # one line per episode, not one per try
        assert "cannot accept ([Errno 24]" in started
        assert "accepts again after 3 failed tries" in ended
