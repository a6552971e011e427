"""ConnectionServer: a single-process accept loop that tracks its connections and drains.

Real listening sockets (TCP v4, v6, Unix) and real clients on every loop; a child process
shows that a listener the server stopped accepting on still works for someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import TIMEOUT, wait_until, within

from aioancillary import ConnectionServer, ConnectionServerStats


def tcp_listener(family: int = socket.AF_INET) -> socket.socket:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    return socket.create_server((host, 0), family=family, backlog=128)


def unix_listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(128)
    return sock


async def open_client(
    listener: socket.socket,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    addr = listener.getsockname()
    if listener.family == socket.AF_UNIX:
        return await asyncio.open_unix_connection(addr)
    return await asyncio.open_connection(addr[0], addr[1])


async def ask(listener: socket.socket, line: bytes = b"hi\n") -> bytes:
    """Connect, send ``line``, read to the end of the connection (a reset reads as b"")."""
    reader, writer = await open_client(listener)
    try:
        writer.write(line)
        return await within(reader.read())
    except ConnectionResetError:  # closed with our line unread: the kernel resets
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The documented handler shape: write, drain, return (the server closes the writer)."""
    writer.write(b"echo: " + await reader.readline())
    await writer.drain()


async def sees_the_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The client's side of a cut connection: it ends (an abort may reset it); then close."""
    with contextlib.suppress(ConnectionResetError):
        assert await within(reader.read()) == b""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A handler that waits for the client's end, which never comes unless it is cut."""
    await reader.read()


@contextlib.asynccontextmanager
async def served(*listeners: socket.socket, **kwargs: Any) -> AsyncIterator[ConnectionServer]:
    """A server on ``listeners`` (echo unless told otherwise); cut and listeners closed after."""
    kwargs.setdefault("handler", echo if "protocol_factory" not in kwargs else None)
    server = ConnectionServer(**kwargs)
    try:
        async with asyncio.timeout(3 * TIMEOUT):
            for listener in listeners:
                server.add_listener(listener)
            yield server
    finally:
        server.close()
        await within(server.wait_closed())
        for listener in listeners:
            listener.close()


# -- serving ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp4", "tcp6", "unix"])
async def test_serves_each_kind_of_listener_and_leaves_it_open(kind: str, tmp_path: Path) -> None:
    if kind == "unix":
        listener = unix_listener(tmp_path / "s.sock")
    else:
        listener = tcp_listener(socket.AF_INET6 if kind == "tcp6" else socket.AF_INET)
    async with served(listener) as server:
        answers = await within(asyncio.gather(*(ask(listener, b"%d\n" % n) for n in range(5))))
        assert sorted(answers) == [b"echo: %d\n" % n for n in range(5)]
        await wait_until(lambda: server.stats().finished == 5)
        assert server.stats() == ConnectionServerStats(
            accepted=5,
            active=0,
            finished=5,
            cut=0,
            handler_errors=0,
            listeners=1,
            failed_listeners=(),
            resource_pauses=0,
        )
        assert await server.drain(timeout=TIMEOUT) == 0
        assert server.listeners == []
        assert listener.fileno() >= 0  # never closed by the server
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


class Upper(asyncio.Protocol):
    lost: list[Exception | None]

    def __init__(self) -> None:
        self.lost = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class BufferedUpper(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buffer = bytearray(1024)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.transport.write(bytes(self.buffer[:nbytes]).upper())
        self.transport.close()


@pytest.mark.parametrize("protocol", [Upper, BufferedUpper])
async def test_protocol_form_is_finished_when_the_connection_is_lost(protocol: type) -> None:
    made: list[Any] = []

    def factory() -> asyncio.BaseProtocol:
        made.append(protocol())
        return made[-1]  # type: ignore[no-any-return]

    listener = tcp_listener()
    async with served(listener, protocol_factory=factory) as server:
        assert await ask(listener, b"shout") == b"SHOUT"
        await wait_until(lambda: server.stats().finished == 1)
        assert server.active == 0
    assert len(made) == 1
    if isinstance(made[0], Upper):
        assert made[0].lost == [None]  # the application's protocol got connection_lost


async def test_each_listener_may_have_its_own_form(tmp_path: Path) -> None:
    streams, protocols = tcp_listener(), unix_listener(tmp_path / "p.sock")
    async with served() as server:
        server.add_listener(streams, handler=echo)
        server.add_listener(protocols, protocol_factory=Upper, name="upper")
        assert await ask(streams) == b"echo: hi\n"
        assert await ask(protocols, b"x") == b"X"
        await wait_until(lambda: server.stats().finished == 2)
        assert server.stats().listeners == 2
        server.stop_accepting()
    for sock in (streams, protocols):
        sock.close()


async def test_a_failing_handler_is_logged_and_counted_and_its_client_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.readline() == b"boom\n":
            raise RuntimeError("handler bug")
        writer.write(b"ok")

    listener = tcp_listener()
    with caplog.at_level(logging.ERROR, logger="aioancillary"):
        async with served(listener, handler=handler) as server:
            assert await ask(listener, b"boom\n") == b""
            assert await ask(listener, b"fine\n") == b"ok"
            await wait_until(lambda: server.stats().finished == 2)
            assert server.stats().handler_errors == 1
    assert "connection handler failed" in caplog.text


async def test_a_protocol_whose_connection_made_raises_is_closed_not_left_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            raise RuntimeError("protocol bug")

    listener = tcp_listener()
    with caplog.at_level(logging.ERROR, logger="aioancillary"):
        async with served(listener, protocol_factory=Broken) as server:
            assert await ask(listener) == b""
            await wait_until(lambda: server.stats().finished == 1)
            assert server.stats().handler_errors == 1
    assert "connection_made failed" in caplog.text


# -- tracking and draining ----------------------------------------------------------------------


async def test_a_connection_is_tracked_from_accept_before_its_handler_runs() -> None:
    """A drain that starts right after accept() sees the connection (asyncio.start_server's
    handler task would start loop iterations later, after such a drain had returned)."""
    started = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started.set()
        writer.write(b"late but served: " + await reader.readline())

    listener = tcp_listener()
    async with served(listener, handler=handler) as server:
        reader, writer = await open_client(listener)
        await wait_until(lambda: server.stats().accepted == 1)
        assert server.active == 1  # counted at accept(), whether or not its task ran yet
        draining = asyncio.ensure_future(server.drain(timeout=None))
        await asyncio.sleep(0)
        assert not draining.done()  # waits for the connection
        writer.write(b"x\n")
        assert await within(reader.read()) == b"late but served: x\n"
        assert await within(draining) == 0
        assert started.is_set()
        writer.close()
        await writer.wait_closed()


async def test_the_drain_deadline_cuts_a_slow_connection_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcomes: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if line == b"slow\n":
            try:
                await reader.read()  # until the client hangs up: it never does
            except asyncio.CancelledError:
                outcomes.append("cancelled")
                raise
        writer.write(b"done\n")
        outcomes.append("finished")

    listener = tcp_listener()
    async with served(listener, handler=handler) as server:
        assert await ask(listener, b"fast\n") == b"done\n"
        await wait_until(lambda: server.stats().finished == 1)
        reader, writer = await open_client(listener)
        writer.write(b"slow\n")
        await wait_until(lambda: server.stats().accepted == 2)
        with caplog.at_level(logging.WARNING, logger="aioancillary"):
            assert await within(server.drain(timeout=0.05)) == 1
        assert "cut 1 connection(s)" in caplog.text
        assert outcomes == ["finished", "cancelled"]
        await sees_the_end(reader, writer)
        stats = server.stats()
        assert (stats.accepted, stats.finished, stats.cut, stats.active) == (2, 1, 1, 0)


async def test_the_drain_deadline_aborts_a_protocol_that_never_closes() -> None:
    class Silent(Upper):
        def data_received(self, data: bytes) -> None:
            pass  # never answers, never closes

    protocols: list[Silent] = []

    def factory() -> Silent:
        protocols.append(Silent())
        return protocols[-1]

    listener = tcp_listener()
    async with served(listener, protocol_factory=factory) as server:
        reader, writer = await open_client(listener)
        writer.write(b"anyone?")
        await wait_until(lambda: len(protocols) == 1 and hasattr(protocols[0], "transport"))
        assert await within(server.drain(timeout=0.05)) == 1
        await wait_until(lambda: protocols[0].lost != [])  # connection_lost reached it
        await sees_the_end(reader, writer)
        assert server.stats().cut == 1


async def test_close_cuts_everything_at_once_and_refuses_new_listeners() -> None:
    listener = tcp_listener()
    server = ConnectionServer(hang)
    server.add_listener(listener)
    clients = [await open_client(listener) for _ in range(3)]
    await wait_until(lambda: server.active == 3)
    server.close()
    await within(server.wait_closed())
    assert server.stats().cut == 3
    with pytest.raises(ValueError, match="closed"):
        server.add_listener(listener)
    for reader, writer in clients:
        await sees_the_end(reader, writer)
    listener.close()


async def test_leaving_the_block_cuts_what_is_left() -> None:
    listener = tcp_listener()
    async with ConnectionServer(hang) as server:
        server.add_listener(listener)
        reader, writer = await open_client(listener)
        await wait_until(lambda: server.active == 1)
    assert server.stats().cut == 1
    await sees_the_end(reader, writer)
    listener.close()


# -- stop accepting: the listener is someone else's to accept on ----------------------------------

CHILD = textwrap.dedent(
    """
    import socket, sys
    listener = socket.socket(fileno=int(sys.argv[1]))
    listener.settimeout(30)  # polls: the shared file stays non-blocking for the parent
    print("ready", flush=True)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(30)
        conn.sendall(b"child " + conn.recv(100))
    """
)


async def test_after_stop_accepting_another_process_accepts_on_the_same_listener() -> None:
    listener = tcp_listener()
    async with served(listener) as server:
        assert await ask(listener) == b"echo: hi\n"
        server.stop_accepting()
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            str(listener.fileno()),
            pass_fds=[listener.fileno()],
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            assert await within(child.stdout.readline(), 15) == b"ready\n"
            assert await ask(listener, b"hello") == b"child hello"
            assert await within(child.wait(), 15) == 0
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        assert server.stats().accepted == 1  # the second client was the child's
        server.add_listener(listener)  # and this process can take it up again
        assert await ask(listener) == b"echo: hi\n"


# -- accept() errors ----------------------------------------------------------------------------


async def test_a_listener_that_fails_for_good_is_dropped_and_the_others_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken, healthy = tcp_listener(), tcp_listener()
    async with served() as server:
        server.add_listener(broken, handler=echo, name="broken")
        server.add_listener(healthy, handler=echo, name="healthy")
        with caplog.at_level(logging.ERROR, logger="aioancillary"):
            broken.shutdown(socket.SHUT_RDWR)  # accept() now fails with EINVAL, forever
            await wait_until(lambda: server.stats().failed_listeners == ("broken",))
            for _ in range(20):
                await asyncio.sleep(0)  # a spinning reader would log again meanwhile
        assert caplog.text.count("stopped accepting on listener broken") == 1
        assert server.stats().listeners == 1
        assert await ask(healthy) == b"echo: hi\n"
        assert broken.fileno() >= 0  # the caller's to close
        server.stop_accepting()
    broken.close()
    healthy.close()


class CountingListener(socket.socket):
    """A listener that counts its accept() calls (a spinning reader calls it without end)."""

    calls = 0

    def accept(self) -> tuple[socket.socket, Any]:
        CountingListener.calls += 1
        return super().accept()


def counting_listener(family: str, path: Path) -> CountingListener:
    if family == "unix":
        sock = CountingListener(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
    else:
        sock = CountingListener(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@pytest.mark.parametrize("how", [socket.SHUT_RDWR, socket.SHUT_RD], ids=["SHUT_RDWR", "SHUT_RD"])
@pytest.mark.parametrize("family", ["tcp", "unix"])
async def test_a_listener_shut_down_underneath_is_dropped_once_without_spinning(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, family: str, how: int
) -> None:
    """A TCP listener shut down fails accept() with EINVAL; a Unix one says EAGAIN while it
    polls readable for good (``EPOLLRDHUP``): both are dropped, once, and not called again."""
    CountingListener.calls = 0
    broken, healthy = counting_listener(family, tmp_path / "broken.sock"), tcp_listener()
    try:
        async with served() as server:
            server.add_listener(broken, handler=echo, name="broken")
            server.add_listener(healthy, handler=echo, name="healthy")
            with caplog.at_level(logging.ERROR, logger="aioancillary"):
                broken.shutdown(how)
                # Dropped, or spinning (a reader left registered calls accept() every turn).
                await wait_until(
                    lambda: bool(server.stats().failed_listeners) or CountingListener.calls > 500
                )
                calls = CountingListener.calls
                for _ in range(200):
                    await asyncio.sleep(0)
            assert server.stats().failed_listeners == ("broken",)
            assert CountingListener.calls == calls  # not called since it was dropped
            assert caplog.text.count("stopped accepting on listener broken") == 1
            assert server.stats().listeners == 1
            assert await ask(healthy) == b"echo: hi\n"
            assert broken.fileno() >= 0  # the caller's to close
            server.stop_accepting()
    finally:
        broken.close()
        healthy.close()


class FlakyListener(socket.socket):
    """A listener whose accept() fails with ECONNABORTED ``failures`` times first."""

    failures = 0

    def accept(self) -> tuple[socket.socket, Any]:
        if FlakyListener.failures:
            FlakyListener.failures -= 1
            raise ConnectionAbortedError(errno.ECONNABORTED, "Software caused connection abort")
        return super().accept()


async def test_an_aborted_client_is_skipped_and_the_next_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plain = tcp_listener()
    flaky = FlakyListener(plain.family, plain.type, plain.proto, plain.detach())
    FlakyListener.failures = 2
    with caplog.at_level(logging.ERROR, logger="aioancillary"):
        async with served(flaky) as server:
            assert await ask(flaky) == b"echo: hi\n"
            assert server.stats().failed_listeners == ()
            assert server.stats().resource_pauses == 0
    assert FlakyListener.failures == 0
    assert caplog.text == ""


@contextlib.contextmanager
def fd_limit_reached() -> Iterator[None]:
    """No fd can be opened inside: the soft RLIMIT_NOFILE is just above the highest fd in use,
    and the free numbers below it are taken by placeholders (closed on exit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    placeholders: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    try:
        while True:
            try:
                placeholders.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
                break
        yield
    finally:
        for fd in placeholders:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_out_of_fds_the_listener_pauses_logs_once_and_serves_when_fds_are_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    listener = unix_listener(tmp_path / "s.sock")
    # Made now: connecting a Unix stream socket needs no new fd in this process later.
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(TIMEOUT)
    with client:
        async with served(listener) as server:
            with caplog.at_level(logging.WARNING, logger="aioancillary"):
                with fd_limit_reached():
                    client.connect(str(tmp_path / "s.sock"))  # waits in the backlog
                    await wait_until(lambda: server.stats().resource_pauses == 1)
                    for _ in range(3):  # it retries every 0.1 s and fails: no new log line
                        await asyncio.sleep(0.12)
                    assert server.stats().accepted == 0
                assert caplog.text.count("cannot accept") == 1
                await wait_until(lambda: server.stats().accepted == 1)  # fds are back
            client.sendall(b"back\n")
            assert await asyncio.to_thread(client.recv, 100) == b"echo: back\n"
            assert "accepts again" in caplog.text
            assert server.stats().resource_pauses == 1


# -- checks -------------------------------------------------------------------------------------


async def test_bad_listeners_and_handlers_are_refused_and_left_open(tmp_path: Path) -> None:
    server = ConnectionServer(echo)
    unbound = socket.socket()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener = tcp_listener()
    with unbound, udp, listener:
        with pytest.raises(ValueError, match="does not listen"):
            server.add_listener(unbound)
        with pytest.raises(ValueError, match="SOCK_STREAM"):
            server.add_listener(udp)
        with pytest.raises(ValueError, match="not both"):
            server.add_listener(listener, handler=echo, protocol_factory=Upper)
        with pytest.raises(ValueError, match="no handler"):
            ConnectionServer().add_listener(listener)
        server.add_listener(listener)
        with pytest.raises(ValueError, match="already served"):
            server.add_listener(listener)
        server.stop_accepting()
        assert unbound.fileno() >= 0
        assert udp.fileno() >= 0
    closed = socket.socket()
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        server.add_listener(closed)
    with pytest.raises(ValueError, match="not both"):
        ConnectionServer(echo, protocol_factory=Upper)
    with pytest.raises(ValueError, match="accept_burst"):
        ConnectionServer(echo, accept_burst=0)
    server.close()
