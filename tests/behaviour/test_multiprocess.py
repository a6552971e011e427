"""Two processes: a real child (``python -c``) passes sockets and pipes to the async API.

The child gets its end of a socketpair through ``pass_fds`` (or connects to a server path);
its stderr goes to a file, so that no pipe is left open in the parent.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from helpers import (
    BIG,
    close_all,
    nofile_at_least,
    open_fd_count,
    read_all,
    read_tags,
    tagged_pipe,
    wait_until,
    within,
)

from aioancillary import (
    SCM_MAX_FD,
    AncillaryConnection,
    AncillaryMessage,
    ConnectionClosedError,
    Credentials,
    ProtocolError,
    open_unix_connection,
    start_unix_server,
)

CHILD_TIMEOUT = 10.0


@asynccontextmanager
async def child(
    script: str, *args: str, tmp_path: Path, pass_fds: Sequence[int] = ()
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """Run ``script`` in a child Python; on exit wait for it and require exit status 0."""
    errfile = tmp_path / f"child-{len(list(tmp_path.iterdir()))}.err"
    with errfile.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), *args],
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        yield proc
        try:
            status = await asyncio.to_thread(proc.wait, CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail("the child process did not finish")
        assert status == 0, f"child failed ({status}):\n{errfile.read_text()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait)


@asynccontextmanager
async def socketpair_with_child(
    script: str, tmp_path: Path, *, framed: bool | None = None
) -> AsyncIterator[tuple[AncillaryConnection, subprocess.Popen[bytes]]]:
    """Our end as a connection; the child's end passed as ``sys.argv[1]`` (an fd number)."""
    ours, theirs = socket.socketpair()
    try:
        conn = await open_unix_connection(sock=ours, framed=framed)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    try:
        async with child(
            script, str(theirs.fileno()), tmp_path=tmp_path, pass_fds=[theirs.fileno()]
        ) as proc:
            theirs.close()  # the child has its own copy
            async with asyncio.timeout(CHILD_TIMEOUT):
                yield conn, proc
    finally:
        theirs.close()
        await close_all(conn)


async def test_child_hands_over_an_accepted_tcp_connection(tmp_path: Path) -> None:
    """The child accepts a TCP client on 127.0.0.1 and sends us the accepted socket."""
    script = """
        import socket, sys
        from aioancillary import frame_header, send_fds
        unix = socket.socket(fileno=int(sys.argv[1]))
        listener = socket.create_server(("127.0.0.1", 0))
        port = str(listener.getsockname()[1]).encode()
        unix.sendall(frame_header(0, len(port)) + port)
        accepted, _addr = listener.accept()
        send_fds(unix, frame_header(1, 8) + b"accepted", [accepted])
        accepted.close()   # the parent has its own reference now
        listener.close()
        unix.recv(1)       # wait until the parent is done
    """
    loop = asyncio.get_running_loop()
    async with socketpair_with_child(script, tmp_path) as (conn, _proc):
        with await conn.recv() as msg:
            port = int(msg.data)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            with await conn.recv() as msg:
                assert msg.data == b"accepted"
                accepted = msg.take_fd().into_socket()
            with accepted:
                assert accepted.family == socket.AF_INET
                assert accepted.type == socket.SOCK_STREAM
                assert accepted.getpeername() == writer.get_extra_info("sockname")
                accepted.setblocking(False)
                await loop.sock_sendall(accepted, b"hello from the parent")
                assert await reader.readexactly(21) == b"hello from the parent"
                writer.write(b"hello from the client")
                await writer.drain()
                got = b""
                while len(got) < 21:
                    got += await loop.sock_recv(accepted, 100)
                assert got == b"hello from the client"
        finally:
            writer.close()
            await writer.wait_closed()
        await conn.send(b"done")


async def test_child_connects_to_a_server_path_and_passes_pipes(tmp_path: Path) -> None:
    script = """
        import asyncio, os, sys
        import aioancillary

        async def main():
            conn = await aioancillary.open_unix_connection(sys.argv[1])
            for i in range(20):
                r, w = os.pipe()
                os.write(w, b"child %d" % i)
                os.close(w)
                await conn.send_fds(b"%d" % i, [r])
                os.close(r)
            with await conn.recv() as msg:
                os.write(msg.fds[0].fileno(), b"the child wrote this")
            conn.close()
            await conn.wait_closed()

        asyncio.run(main())
    """
    path = tmp_path / "parent.sock"
    Result = tuple[Credentials | None, list[bytes], list[AncillaryMessage]]
    results: asyncio.Queue[Result | BaseException]
    results = asyncio.Queue()
    r, w = os.pipe()

    async def handler(conn: AncillaryConnection) -> None:
        try:
            tags = []
            for i in range(20):
                with await conn.recv() as msg:
                    assert msg.data == b"%d" % i
                    tags += read_tags(msg.fds)
            await conn.send_fds(b"write here", [w])
            rest = [m async for m in conn]
            await results.put((conn.peercred, tags, rest))
        except BaseException as exc:
            await results.put(exc)
            raise

    server = await start_unix_server(handler, path)
    try:
        async with child(script, str(path), tmp_path=tmp_path) as proc:
            result = await within(results.get(), CHILD_TIMEOUT)
            assert not isinstance(result, BaseException), result
            creds, tags, rest = result
            assert creds is not None
            assert creds.pid == proc.pid
            assert (creds.uid, creds.gid) == (os.getuid(), os.getgid())
            assert tags == [b"child %d" % i for i in range(20)]
            assert rest == []
        os.close(w)
        w = -1
        assert read_all(r) == b"the child wrote this"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        server.close()
        await within(server.wait_closed())


async def test_child_sends_253_fds_per_message(tmp_path: Path) -> None:
    script = """
        import os, socket, sys
        from aioancillary import frame_header, send_fds
        unix = socket.socket(fileno=int(sys.argv[1]))
        for m in range(4):
            pipes = []
            for k in range(253):
                r, w = os.pipe()
                os.write(w, b"%d.%d" % (m, k))
                os.close(w)
                pipes.append(r)
            data = b"message %d" % m
            send_fds(unix, frame_header(253, len(data)) + data, pipes)
            for r in pipes:
                os.close(r)
        unix.close()
    """
    with nofile_at_least(4096):
        async with socketpair_with_child(script, tmp_path) as (conn, _proc):
            for m in range(4):
                with await conn.recv() as msg:
                    assert msg.data == b"message %d" % m
                    assert len(msg.fds) == SCM_MAX_FD
                    assert read_tags(msg.fds) == [b"%d.%d" % (m, k) for k in range(SCM_MAX_FD)]
            with pytest.raises(ConnectionClosedError):
                await conn.recv()


async def test_parent_sends_raw_to_a_stdlib_child(tmp_path: Path) -> None:
    """Raw mode to a child that reads one message and one fd at a time with the stdlib."""
    script = """
        import os, socket, sys
        unix = socket.socket(fileno=int(sys.argv[1]))
        unix.settimeout(5)
        for i in range(30):
            data, fds, flags, _ = socket.recv_fds(unix, 4, 1)
            assert not flags & socket.MSG_CTRUNC, i
            assert data == b"%04d" % i and len(fds) == 1, (i, data, fds)
            os.write(fds[0], b"%04d" % i)
            os.close(fds[0])
        unix.close()
    """
    r, w = os.pipe()
    try:
        async with socketpair_with_child(script, tmp_path, framed=False) as (conn, _proc):
            for i in range(30):
                conn.transport.write_fds(b"%04d" % i, [w])
            await conn.drain()
        os.close(w)
        w = -1
        assert read_all(r) == b"".join(b"%04d" % i for i in range(30))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


async def test_child_crashing_mid_frame_raises_protocol_error(tmp_path: Path) -> None:
    script = """
        import os, socket, sys
        from aioancillary import frame_header, send_fds
        unix = socket.socket(fileno=int(sys.argv[1]))
        r, w = os.pipe()
        send_fds(unix, frame_header(0, 2) + b"ok", [])
        send_fds(unix, frame_header(1, 1000) + b"only the start", [r])
        os._exit(0)  # a crash: no close, no flush
    """
    async with socketpair_with_child(script, tmp_path) as (conn, _proc):
        with await conn.recv() as msg:
            assert msg.data == b"ok"
        with pytest.raises(ProtocolError):
            await conn.recv()
        assert conn.is_closing()


async def test_child_exiting_while_we_have_fds_queued(tmp_path: Path) -> None:
    """Our queued duplicates are closed when the peer vanishes (fd-count fixture)."""
    script = """
        import socket, sys
        unix = socket.socket(fileno=int(sys.argv[1]))
        unix.recv(1)  # read one byte, then go away with the rest unread
    """
    r, w = os.pipe()
    try:
        async with socketpair_with_child(script, tmp_path) as (conn, proc):
            conn.transport.set_write_buffer_limits(high=8 << 20)
            conn.transport.write(b"\0" * BIG)
            for _ in range(10):
                conn.transport.write_fds(b"fds", [w] * 50)
            assert conn.transport.get_write_buffer_fds() > 0
            await asyncio.to_thread(proc.wait, CHILD_TIMEOUT)
            await wait_until(conn.is_closing)
            assert conn.transport.get_write_buffer_fds() == 0
            with pytest.raises(ConnectionClosedError):
                await conn.send(b"after the child is gone")
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""  # no copy of the write end is left anywhere
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


async def test_flood_from_a_child_keeps_our_fd_count_bounded(tmp_path: Path) -> None:
    """A child floods 253-fd messages; we read slowly. Only receive-side fds are ours here.

    Bound: the receive queue's fd budget (at most 4 * 253) plus the one read that crossed it
    (253), fds waiting in the frame decoder for their header (at most 2 * 253), and the message
    we hold (253), plus slack.
    """
    count = 40
    script = f"""
        import os, socket, sys
        from aioancillary import frame_header, send_fds
        unix = socket.socket(fileno=int(sys.argv[1]))
        r, w = os.pipe()
        for i in range({count}):
            data = b"%d" % i
            send_fds(unix, frame_header(253, len(data)) + data, [r] * 253)
        unix.recv(1)
    """
    bound = 4 * SCM_MAX_FD + SCM_MAX_FD + 2 * SCM_MAX_FD + SCM_MAX_FD + 32
    with nofile_at_least(16384):
        async with socketpair_with_child(script, tmp_path) as (conn, _proc):
            baseline = open_fd_count()
            peak = 0
            paused_seen = False
            for i in range(count):
                await asyncio.sleep(0.002)  # a slow consumer
                peak = max(peak, open_fd_count() - baseline)
                paused_seen = paused_seen or not conn.transport.is_reading()
                with await conn.recv() as msg:
                    assert msg.data == b"%d" % i
                    assert len(msg.fds) == SCM_MAX_FD
            await conn.send(b"done")
            assert paused_seen
            assert peak <= bound, f"held {peak} fds at once (bound {bound})"
            assert peak < count * SCM_MAX_FD // 2


async def test_receiver_out_of_fds_fails_the_connection_without_leaking(tmp_path: Path) -> None:
    """The child lowers RLIMIT_NOFILE, then receives more fds than fit (EMFILE on receive).

    The kernel installs what fits and truncates (MSG_CTRUNC); the connection must fail with
    FdTruncatedError and close every fd that did arrive. The child runs the same loop as this
    test and reports its fd counts.
    """
    use_uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    script = f"""
        import asyncio, os, resource, socket, sys
        import aioancillary

        def count():
            return len(os.listdir("/proc/self/fd")) - 1

        async def main():
            sock = socket.socket(fileno=int(sys.argv[1]))
            conn = await aioancillary.open_unix_connection(sock=sock)
            with await conn.recv() as first:  # a first message, before the limit
                assert first.data == b"ready"
            before = count()
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (before + 20, hard))
            await conn.send(b"limited")
            try:
                msg = await conn.recv()
            except aioancillary.FdTruncatedError:
                pass
            else:
                sys.exit(f"no error: {{msg!r}}")
            await conn.wait_closed()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            after = count()
            # the connection's own socket is closed now: one fd fewer than before
            if after != before - 1:
                sys.exit(f"fd count {{before}} -> {{after}}")

        if {use_uvloop!r}:
            import uvloop
            uvloop.run(main())
        else:
            asyncio.run(main())
    """
    async with socketpair_with_child(script, tmp_path) as (conn, _proc):
        await conn.send(b"ready")
        with await conn.recv() as msg:
            assert msg.data == b"limited"
        r = tagged_pipe(b"")
        try:
            await conn.send_fds(b"too many", [r] * 100)
        finally:
            os.close(r)
        with pytest.raises(ConnectionClosedError):
            await conn.recv()  # the child closed the connection
