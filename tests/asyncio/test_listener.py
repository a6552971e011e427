"""The server's accept loop when ``accept()`` fails (issue 15, item 1): a listener that fails
for good is dropped once (reader removed, logged once, in the stats, ``serve_forever`` raises);
running out of fds or memory pauses and retries, logged once per episode, never spinning."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until, within

from aioancillary import AncillaryConnection, open_unix_connection, start_unix_server


async def _echo(conn: AncillaryConnection) -> None:
    async for msg in conn:
        with msg:
            await conn.send(msg.data)


def _records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "aioancillary" and r.levelno == level]


async def _loop_turns(count: int) -> None:
    """Let the loop run ``count`` iterations (a spinning reader would run as often)."""
    for _ in range(count):
        await asyncio.sleep(0)


@pytest.mark.parametrize("how", [socket.SHUT_RDWR, socket.SHUT_RD], ids=["SHUT_RDWR", "SHUT_RD"])
async def test_a_listener_that_no_longer_listens_is_dropped_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: int
) -> None:
    """``shutdown()`` on the listening socket: the poller reports it readable for good, and
    ``accept()`` finds nothing (``EAGAIN``; ``EINVAL`` on older kernels). The server stops
    listening, says so once, and serves its open connections on. ``SHUT_RD`` alone polls
    ``EPOLLRDHUP`` but not ``EPOLLHUP``: it is recognised too."""
    caplog.set_level(logging.DEBUG, logger="aioancillary")
    reports: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reports.append(ctx))
    path = tmp_path / "s.sock"
    server = await start_unix_server(_echo, path)
    forever = asyncio.ensure_future(server.serve_forever())
    async with await open_unix_connection(path) as conn:
        await wait_until(lambda: server.stats.active == 1)
        server.sockets[0].shutdown(how)
        await wait_until(lambda: not server.is_serving())
        await _loop_turns(200)
        failure = server.stats.listener_error
        assert isinstance(failure, OSError)
        assert failure.errno in (errno.ESHUTDOWN, errno.EINVAL)  # EINVAL: older kernels
        assert len(_records(caplog, logging.ERROR)) == 1
        assert reports == []  # a listener's failure is logged, not an exception handler's job
        with pytest.raises(OSError, match="stopped listening") as raised:
            await within(forever)
        assert raised.value.errno == failure.errno
        assert not path.exists()  # closed as close() does: its file removed
        await conn.send(b"still served")  # the open connection goes on
        with await within(conn.recv()) as msg:
            assert msg.data == b"still served"
    await within(server.wait_closed())


class _Failing(socket.socket):
    """A listening socket whose ``accept()`` fails with ``errors`` first, then works (or
    fails with ``forever`` from then on)."""

    errors: list[int]
    forever: int | None
    calls: int

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        if self.errors:
            raise OSError(self.errors.pop(0), "simulated")
        if self.forever is not None:
            raise OSError(self.forever, "simulated, for good")
        return super().accept()


def _failing_listener(path: Path, errors: list[int], forever: int | None = None) -> _Failing:
    sock = _Failing(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.errors = errors
    sock.forever = forever
    sock.calls = 0
    sock.bind(str(path))
    sock.listen()
    return sock


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EBADF, errno.ENOTSOCK, errno.EFAULT])
async def test_an_accept_error_for_good_stops_the_server_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="aioancillary")
    path = tmp_path / "s.sock"
    listener = _failing_listener(path, [], forever=code)
    server = await start_unix_server(_echo, sock=listener, authorize=None)
    client = socket.socket(socket.AF_UNIX)
    with client:
        client.connect(str(path))  # makes the listener readable
        await wait_until(lambda: not server.is_serving())
        await _loop_turns(200)
        assert listener.calls == 1  # its reader is gone: never called again
        failure = server.stats.listener_error
        assert failure is not None
        assert failure.errno == code
        assert len(_records(caplog, logging.ERROR)) == 1
        with pytest.raises(OSError, match="stopped listening"):
            await within(server.serve_forever())
    await within(server.wait_closed())


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])
async def test_running_out_of_resources_pauses_and_logs_once_per_episode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="aioancillary")
    path = tmp_path / "s.sock"
    listener = _failing_listener(path, [code] * 4)
    async with await start_unix_server(_echo, sock=listener, authorize=None) as server:
        async with await open_unix_connection(path) as conn:  # waits in the backlog
            await conn.send(b"served after the pause")
            with await within(conn.recv()) as msg:
                assert msg.data == b"served after the pause"
        assert listener.calls >= 5  # four failures, paced, then the accept that worked
        assert server.is_serving()
        assert server.stats.listener_error is None
    errors = _records(caplog, logging.ERROR)
    assert len(errors) == 1, [r.getMessage() for r in errors]  # once for the episode
    assert len(_records(caplog, logging.WARNING)) == 1  # and once when it works again


async def test_a_client_gone_before_it_was_accepted_is_skipped_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aioancillary")
    path = tmp_path / "s.sock"
    listener = _failing_listener(path, [errno.ECONNABORTED])
    async with await start_unix_server(_echo, sock=listener, authorize=None) as server:
        async with await open_unix_connection(path) as conn:
            await conn.send(b"next one served")
            with await within(conn.recv()) as msg:
                assert msg.data == b"next one served"
        assert server.is_serving()
    assert _records(caplog, logging.ERROR) == []


async def test_every_task_waiting_for_the_server_wakes(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = await start_unix_server(_echo, path)
    async with await open_unix_connection(path) as conn:
        await wait_until(lambda: server.stats.active == 1)
        server.close()
        waiters = [asyncio.ensure_future(server.wait_closed()) for _ in range(3)]
        await _loop_turns(5)
        assert not any(w.done() for w in waiters)  # a connection is still served
        await conn.send(b"bye")
        with await within(conn.recv()) as msg:
            assert msg.data == b"bye"
    await within(asyncio.gather(*waiters))
    assert server.stats.active == 0


async def test_a_connection_counts_until_its_handler_returned(tmp_path: Path) -> None:
    """The server sees a handler's connection end once both its transport closed and its
    handler returned, in either order; a handler that fails is reported once."""
    release = asyncio.Event()
    reports: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reports.append(ctx))

    async def lingering(conn: AncillaryConnection) -> None:
        conn.close()  # the transport closes first
        await release.wait()
        raise LookupError("the handler's own bug")

    path = tmp_path / "s.sock"
    async with await start_unix_server(lingering, path) as server:
        async with await open_unix_connection(path) as conn:
            with pytest.raises(Exception, match="closed"):
                await within(conn.recv())
        await _loop_turns(20)
        assert server.stats.active == 1  # its handler still runs
        release.set()
        await wait_until(lambda: server.stats.active == 0)
    assert server.stats.handler_errors == 1
    assert [type(ctx.get("exception")) for ctx in reports] == [LookupError]
