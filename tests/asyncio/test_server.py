"""Entry points over real paths: start_unix_server, open_unix_connection, AncillaryServer."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import TIMEOUT, close_all, read_tags, tagged_pipe, tagged_pipes, wait_until, within
from helpers.servers import echo_fds, roundtrip, serving

from aioancillary import (
    AncillaryConnection,
    ConnectionClosedError,
    Credentials,
    open_unix_connection,
    start_unix_server,
)

ME = Credentials(os.getpid(), os.getuid(), os.getgid())
IN_USE = r"(?i)already|in use"  # EADDRINUSE, from the library's probe or from bind()


# -- the socket file --------------------------------------------------------------------------


async def test_socket_file_mode_defaults_to_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    async with serving(echo_fds, path):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o660, 0o666, 0o700, 0o400])
async def test_socket_file_mode_is_honoured_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "m.sock"
    old = os.umask(0o077)
    try:
        async with serving(echo_fds, path, mode=mode):
            assert stat.S_IMODE(os.stat(path).st_mode) == mode
    finally:
        assert os.umask(old) == 0o077  # restored by the server


async def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    os.link(path, tmp_path / "old")  # pins the old inode: its number cannot be reused
    old_ino = os.stat(path).st_ino
    async with serving(echo_fds, path):
        assert os.stat(path).st_ino != old_ino
        conn = await within(open_unix_connection(path))
        try:
            await roundtrip(conn, b"fresh")
        finally:
            await close_all(conn)


@pytest.mark.parametrize("sock_type", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET])
async def test_live_server_path_is_refused(tmp_path: Path, sock_type: int) -> None:
    path = tmp_path / "live.sock"
    async with serving(echo_fds, path, sock_type=sock_type) as first:
        ino = os.stat(path).st_ino
        with pytest.raises(OSError, match=IN_USE) as info:
            await start_unix_server(echo_fds, path)
        assert info.value.errno == errno.EADDRINUSE
        assert first.is_serving()
        assert os.stat(path).st_ino == ino
        conn = await within(open_unix_connection(path, sock_type=sock_type))
        try:
            await roundtrip(conn, b"first still serves")
        finally:
            await close_all(conn)


def test_live_server_with_a_full_backlog_is_refused_without_blocking(tmp_path: Path) -> None:
    """The stale-file probe must not block the event loop on a busy live server.

    The probe connects with a blocking socket: when the live server's backlog is full, the
    connect sleeps until the server accepts, and start_unix_server freezes the loop. Run in a
    child process so a hang is a failed test, not a stuck run.
    """
    script = textwrap.dedent(
        """
        import asyncio, errno, socket, sys
        import aioancillary
        path = sys.argv[1]
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(0)
        clients = []
        while True:
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            try:
                c.connect(path)
            except BlockingIOError:
                c.close()
                break
            clients.append(c)

        async def main():
            async def handler(conn):
                pass
            try:
                await aioancillary.start_unix_server(handler, path)
            except OSError as exc:
                sys.exit(0 if exc.errno == errno.EADDRINUSE else 3)
            sys.exit(4)

        asyncio.run(main())
        """
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "busy.sock")],
            timeout=4,
            capture_output=True,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("start_unix_server blocked on a live server whose backlog is full")
    assert proc.returncode == 0, proc.stderr.decode()


async def test_non_socket_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_bytes(b"do not delete")
    with pytest.raises(FileExistsError):
        await start_unix_server(echo_fds, path)
    assert path.read_bytes() == b"do not delete"


async def test_abstract_namespace(tmp_path: Path) -> None:
    name = f"\0aioancillary-test-{uuid.uuid4().hex}"
    before = set(os.listdir(tmp_path))
    async with serving(echo_fds, name) as server:
        assert server.sockets[0].getsockname() == name.encode()
        conn = await within(open_unix_connection(name))
        try:
            await roundtrip(conn, b"abstract")
            assert conn.get_extra_info("peername") == name.encode()
        finally:
            await close_all(conn)
        with pytest.raises(OSError, match=IN_USE) as info:
            await start_unix_server(echo_fds, name)
        assert info.value.errno == errno.EADDRINUSE
    assert set(os.listdir(tmp_path)) == before
    with pytest.raises(ConnectionRefusedError):
        await within(open_unix_connection(name))


# -- closing ----------------------------------------------------------------------------------


async def test_close_unlinks_the_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = await start_unix_server(echo_fds, path)
    assert path.exists()
    server.close()
    assert not server.is_serving()
    assert server.sockets == ()
    assert not path.exists()
    server.close()  # idempotent
    await within(server.wait_closed())


async def test_close_keeps_a_file_that_is_not_its_own(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    first = await start_unix_server(echo_fds, path)
    os.unlink(path)  # someone removed it; a successor took the path
    async with serving(echo_fds, path):
        ino = os.stat(path).st_ino
        first.close()
        await within(first.wait_closed())
        assert os.stat(path).st_ino == ino


async def test_close_without_unlink(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = await start_unix_server(echo_fds, path)
    server.close(unlink=False)
    await within(server.wait_closed())
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    async with serving(echo_fds, path):  # the leftover is stale: replaced
        pass


async def test_serve_forever_cancelled_closes_the_server(tmp_path: Path) -> None:
    path = tmp_path / "f.sock"
    server = await start_unix_server(echo_fds, path)
    task = asyncio.create_task(server.serve_forever())
    await asyncio.sleep(0)
    conn = await within(open_unix_connection(path))
    try:
        await roundtrip(conn, b"served")
    finally:
        await close_all(conn)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    assert not server.is_serving()
    assert not path.exists()
    await within(server.wait_closed())


async def test_serve_forever_returns_when_closed(tmp_path: Path) -> None:
    server = await start_unix_server(echo_fds, tmp_path / "f.sock")
    task = asyncio.create_task(server.serve_forever())
    await asyncio.sleep(0)
    server.close()
    await within(task)
    await within(server.wait_closed())


async def test_async_with_server_closes_clients_and_waits_for_handlers(tmp_path: Path) -> None:
    path = tmp_path / "w.sock"
    started = asyncio.Event()
    finished = asyncio.Event()

    async def handler(conn: AncillaryConnection) -> None:
        started.set()
        async for msg in conn:
            msg.close()
        finished.set()

    async with await start_unix_server(handler, path) as server:
        conn = await within(open_unix_connection(path))
        await within(started.wait())
    assert finished.is_set()  # __aexit__ waited for the handler
    assert not server.is_serving()
    assert not path.exists()
    with pytest.raises(ConnectionClosedError):
        await within(conn.recv())  # the server closed its end
    await close_all(conn)


async def test_wait_closed_waits_for_running_handlers(tmp_path: Path) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(conn: AncillaryConnection) -> None:
        started.set()
        await release.wait()

    server = await start_unix_server(handler, tmp_path / "h.sock")
    conn = await within(open_unix_connection(tmp_path / "h.sock"))
    await within(started.wait())
    server.close()  # stops listening; the handler goes on
    waiting = asyncio.create_task(server.wait_closed())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    release.set()
    await within(waiting)
    await close_all(conn)


async def test_handler_connection_is_closed_when_the_handler_returns(tmp_path: Path) -> None:
    path = tmp_path / "h.sock"
    handled: list[AncillaryConnection] = []

    async def handler(conn: AncillaryConnection) -> None:
        handled.append(conn)
        with await conn.recv() as msg:
            await conn.send(b"bye after " + msg.data)

    async with serving(handler, path):
        conn = await within(open_unix_connection(path))
        try:
            await conn.send(b"hello")
            got = [msg.data async for msg in conn]  # ends at the server's close
            assert got == [b"bye after hello"]
            await within(handled[0].wait_closed())
            assert handled[0].is_closing()
        finally:
            await close_all(conn)


async def test_a_failing_handler_does_not_stop_the_server(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    path = tmp_path / "f.sock"

    async def handler(conn: AncillaryConnection) -> None:
        with await conn.recv() as msg:
            if msg.data == b"boom":
                raise RuntimeError("handler failed")
            await conn.send(b"fine")

    try:
        async with serving(handler, path) as server:
            bad = await within(open_unix_connection(path))
            r = tagged_pipe(b"")
            await bad.send_fds(b"boom", [r])
            os.close(r)
            with pytest.raises(ConnectionClosedError):
                await within(bad.recv())
            await close_all(bad)
            await wait_until(lambda: bool(errors))
            assert isinstance(errors[0]["exception"], RuntimeError)
            assert server.is_serving()
            good = await within(open_unix_connection(path))
            try:
                await good.send(b"ok?")
                with await within(good.recv()) as msg:
                    assert msg.data == b"fine"
            finally:
                await close_all(good)
    finally:
        loop.set_exception_handler(None)


async def test_many_clients_each_with_their_own_fds(tmp_path: Path) -> None:
    path = tmp_path / "many.sock"
    async with serving(echo_fds, path):

        async def client(n: int) -> None:
            conn = await open_unix_connection(path)
            try:
                for i in range(5):
                    tags = [b"%d.%d.%d" % (n, i, k) for k in range(i)]
                    pipes = tagged_pipes(tags)
                    try:
                        await conn.send_fds(b"%d.%d" % (n, i), pipes)
                    finally:
                        for r in pipes:
                            os.close(r)
                    with await conn.recv() as msg:
                        assert msg.data == b"echo:%d.%d" % (n, i)
                        assert read_tags(msg.fds) == tags
            finally:
                await close_all(conn)

        async with asyncio.timeout(TIMEOUT), asyncio.TaskGroup() as tg:
            for n in range(20):
                tg.create_task(client(n))


# -- authorization ----------------------------------------------------------------------------


async def test_authorize_sees_the_peer_credentials_and_accepts(tmp_path: Path) -> None:
    seen: list[Credentials | None] = []

    def authorize(creds: Credentials | None) -> bool:
        seen.append(creds)
        return True

    path = tmp_path / "a.sock"
    async with serving(echo_fds, path, authorize=authorize):
        conn = await within(open_unix_connection(path, authorize=authorize))
        try:
            await roundtrip(conn, b"authorized")
        finally:
            await close_all(conn)
    assert seen == [ME, ME]  # the client checked the server, the server the client


async def test_server_authorize_rejecting_closes_the_connection(tmp_path: Path) -> None:
    called = asyncio.Event()

    async def handler(conn: AncillaryConnection) -> None:
        called.set()

    path = tmp_path / "r.sock"
    async with serving(handler, path, authorize=lambda creds: False) as server:
        conn = await within(open_unix_connection(path))
        try:
            with pytest.raises(ConnectionClosedError):
                await within(conn.recv())
        finally:
            await close_all(conn)
        assert not called.is_set()
        assert server.is_serving()


# -- other socket types, inherited listeners --------------------------------------------------


async def test_seqpacket_server(tmp_path: Path) -> None:
    path = tmp_path / "q.sock"
    async with serving(echo_fds, path, sock_type=socket.SOCK_SEQPACKET):
        conn = await within(open_unix_connection(path, sock_type=socket.SOCK_SEQPACKET))
        try:
            assert conn.get_extra_info("socket_type") == socket.SOCK_SEQPACKET
            await roundtrip(conn, b"seqpacket")
        finally:
            await close_all(conn)


async def test_raw_server_and_client(tmp_path: Path) -> None:
    path = tmp_path / "raw.sock"
    async with serving(echo_fds, path, framed=False):
        conn = await within(open_unix_connection(path, framed=False))
        try:
            await roundtrip(conn, b"raw")
        finally:
            await close_all(conn)


async def test_server_on_an_inherited_listening_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "i.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    server = await start_unix_server(echo_fds, sock=listener)
    try:
        assert server.sockets == (listener,)
        conn = await within(open_unix_connection(path))
        try:
            await roundtrip(conn, b"inherited")
        finally:
            await close_all(conn)
    finally:
        server.close()
        await within(server.wait_closed())
    assert listener.fileno() == -1
    assert os.path.exists(path)  # not created by the server: not removed by it
    os.unlink(path)


async def test_start_unix_server_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        await start_unix_server(echo_fds)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with tcp, pytest.raises(ValueError, match="AF_UNIX"):
        await start_unix_server(echo_fds, sock=tcp)
    with pytest.raises(FileNotFoundError):
        await start_unix_server(echo_fds, tmp_path / "no-such-dir" / "s.sock")


async def test_start_unix_server_refuses_sockets_that_cannot_accept(tmp_path: Path) -> None:
    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connected, peer = socket.socketpair()
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with unbound, connected, peer, dgram:
        for sock, match in [
            (unbound, "not listening"),
            (connected, "not listening"),
            (dgram, "SOCK_STREAM or SOCK_SEQPACKET"),
        ]:
            with pytest.raises(ValueError, match=match):
                await start_unix_server(echo_fds, sock=sock)
            assert sock.fileno() >= 0  # refused, not taken: still the caller's


async def test_errors_at_connect_and_bind_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "s.sock"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        await open_unix_connection(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        await start_unix_server(echo_fds, missing)
    refused = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(refused))  # a socket file nobody listens on
    with pytest.raises(ConnectionRefusedError, match=str(refused)):
        await open_unix_connection(refused)


async def test_hostile_clients_are_logged_once_each_not_reported_as_server_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    path = tmp_path / "h.sock"
    clients = 12

    async def reader(conn: AncillaryConnection) -> None:
        async for msg in conn:
            msg.close()

    try:
        with caplog.at_level(logging.DEBUG, logger="aioancillary"):
            server = await start_unix_server(reader, path, peer_error_level=logging.WARNING)
            async with server:
                for i in range(clients):
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(path))
                        s.sendall(b"garbage that is not a frame %d" % i)
                await wait_until(lambda: server.stats.peer_errors == clients)
                await wait_until(lambda: server.stats.active == 0)
                stats = server.stats
        assert reported == []  # a peer's fault is not the server's error
        assert stats.accepted == clients
        assert stats.handler_errors == 0
        # The library's own warnings: asyncio's debug mode adds one of its own for a slow
        # callback when the machine is loaded.
        warnings = [
            r for r in caplog.records if r.levelno == logging.WARNING and r.name == "aioancillary"
        ]
        assert len(warnings) == clients  # once per connection
        assert all("wire-format version" in r.getMessage() for r in warnings)
    finally:
        loop.set_exception_handler(None)


async def test_refused_peers_are_logged_at_the_chosen_level_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "r.sock"
    with caplog.at_level(logging.DEBUG, logger="aioancillary"):
        server = await start_unix_server(
            echo_fds, path, authorize=lambda _creds: False, peer_error_level=logging.DEBUG
        )
        async with server:
            for _ in range(3):
                conn = await within(open_unix_connection(path))
                with pytest.raises(ConnectionClosedError):
                    await within(conn.recv())
                await close_all(conn)
            assert server.stats.rejected == 3
    refused = [r for r in caplog.records if "refused by the authorize" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.DEBUG] * 3


async def test_handler_failures_are_counted(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    path = tmp_path / "f.sock"

    async def failing(conn: AncillaryConnection) -> None:
        raise RuntimeError("handler bug")

    try:
        async with await start_unix_server(failing, path) as server:
            conn = await within(open_unix_connection(path))
            with pytest.raises(ConnectionClosedError):
                await within(conn.recv())
            await close_all(conn)
            await wait_until(lambda: server.stats.handler_errors == 1)
        assert [type(ctx["exception"]) for ctx in reported] == [RuntimeError]
    finally:
        loop.set_exception_handler(None)
