"""A hostile peer: a plain blocking socket that breaks every rule of the framing protocol.

The peer is the far end of a ``socketpair`` driven with ``sock.sendmsg`` directly; the victim is
an :class:`AncillaryConnection` on the near end. Every test ends with exactly the fds it
started with (the autouse fixture in ``conftest.py``), on asyncio and on uvloop.

Also here: the server's security defaults (socket file mode, peer-credential authorization).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers import LOOP_FACTORIES, LOOP_NAMES, open_fd_count, rights, wait_until, within
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioancillary import (
    SCM_MAX_FD,
    AncillaryConnection,
    AncillaryError,
    Credentials,
    PeerRejectedError,
    ProtocolError,
    connection_pair,
    open_unix_connection,
    recv_fds,
    start_unix_server,
)

_HEADER = struct.Struct(">BBHI")  # version, flags, fd count, payload length
_SO_PASSPIDFD = 76  # asm-generic/socket.h, Linux 6.5+ (not in Python 3.11's socket module)
TIMEOUT = 5.0


def frame(
    nfds: int, payload: bytes, *, version: int = 1, flags: int = 0, length: int | None = None
) -> bytes:
    """A frame as the wire format lays it out, with every field under the test's control."""
    size = len(payload) if length is None else length
    return _HEADER.pack(version, flags, nfds, size) + payload


@contextlib.asynccontextmanager
async def hostile(
    sock_type: int = socket.SOCK_STREAM, **kwargs: object
) -> AsyncIterator[tuple[AncillaryConnection, socket.socket]]:
    """An aioancillary connection and the raw socket of the hostile peer at its other end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, sock_type)
    conn = await open_unix_connection(sock=ours, **kwargs)  # type: ignore[arg-type]
    try:
        yield conn, theirs
    finally:
        theirs.close()
        conn.abort()
        await conn.wait_closed()


async def collect(
    conn: AncillaryConnection,
) -> tuple[list[tuple[bytes, int]], BaseException | None]:
    """Every message until the connection ends, as ``(data, nfds)``; fds closed on arrival."""
    got: list[tuple[bytes, int]] = []
    try:
        async with asyncio.timeout(TIMEOUT):
            async for msg in conn:
                with msg:
                    got.append((msg.data, len(msg.fds)))
    except (AncillaryError, OSError) as exc:
        return got, exc
    return got, None


# -- more fds than asked for ------------------------------------------------------------------


async def test_frame_carrying_more_fds_than_it_declares(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    async with hostile() as (conn, peer):
        base = open_fd_count()
        peer.sendmsg([frame(1, b"one")], rights([r] * SCM_MAX_FD))
        peer.sendmsg([frame(0, b"two")])
        msg = await asyncio.wait_for(conn.recv(), TIMEOUT)
        with msg:
            assert msg.data == b"one"
            assert len(msg.fds) == 1
            assert os.fstat(msg.fds[0].fileno()).st_ino == os.fstat(r).st_ino
        # The 252 surplus fds wait in the decoder (bounded, see the flood tests below).
        assert open_fd_count() - base <= SCM_MAX_FD
        peer.shutdown(socket.SHUT_WR)
        got, exc = await collect(conn)
        assert got == [(b"two", 0)]
        assert isinstance(exc, ProtocolError)
        assert "never delivered" in str(exc)
        assert open_fd_count() <= base


async def test_raw_mode_message_with_253_fds_is_owned(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    async with hostile(framed=False) as (conn, peer):
        base = open_fd_count()
        peer.sendmsg([b"x"], rights([r] * SCM_MAX_FD))
        msg = await asyncio.wait_for(conn.recv(), TIMEOUT)
        assert len(msg.fds) == SCM_MAX_FD
        assert open_fd_count() == base + SCM_MAX_FD
        msg.close()
        assert open_fd_count() == base


def test_blocking_receiver_asking_for_one_fd_gets_253(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    ours, peer = socket.socketpair()
    with ours, peer:
        base = open_fd_count()
        peer.sendmsg([b"x"], rights([r] * SCM_MAX_FD))
        with recv_fds(ours, 16, 1) as msg:
            assert msg.data == b"x"
            assert len(msg.fds) == 1
            assert msg.discarded_fds == SCM_MAX_FD - 1  # closed on arrival, none dropped
            assert open_fd_count() == base + 1
        assert open_fd_count() == base


# -- floods -------------------------------------------------------------------------------------


async def test_flood_of_253_fd_messages_stays_within_the_fd_budget(
    pipe_fds: tuple[int, int],
) -> None:
    r, _ = pipe_fds
    budget = 2 * SCM_MAX_FD
    count = 50
    loop = asyncio.get_running_loop()
    async with hostile(max_queued_fds=budget) as (conn, peer):
        base = open_fd_count()

        def flood() -> None:
            for i in range(count):
                peer.sendmsg([frame(SCM_MAX_FD, i.to_bytes(4, "big"))], rights([r] * SCM_MAX_FD))
            peer.shutdown(socket.SHUT_WR)

        sender = loop.run_in_executor(None, flood)
        await asyncio.sleep(0.2)  # a consumer that does not read: the flood piles up
        held = open_fd_count() - base
        assert not conn.transport.is_reading()
        # Reading pauses once the queue holds more than the budget; one read adds at most
        # one message's fds on top of it.
        assert held <= budget + SCM_MAX_FD, held
        peak = held
        seen = []
        async with asyncio.timeout(TIMEOUT):
            async for msg in conn:
                with msg:
                    assert len(msg.fds) == SCM_MAX_FD
                    seen.append(int.from_bytes(msg.data, "big"))
                    peak = max(peak, open_fd_count() - base)
        await sender
        assert seen == list(range(count))
        assert peak <= budget + 2 * SCM_MAX_FD, peak
        assert open_fd_count() == base


async def test_fds_no_frame_claims_are_bounded(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    async with hostile() as (conn, peer):
        base = open_fd_count()
        peak = 0
        sent = 0
        # Frames that declare no fds, each carrying 253 the receiver never asked for.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(8):
                peer.sendmsg([frame(0, b"x")], rights([r] * SCM_MAX_FD))
                sent += 1
                await asyncio.sleep(0.01)
                peak = max(peak, open_fd_count() - base)
        got, exc = await collect(conn)
        assert isinstance(exc, ProtocolError), (got, exc)
        assert "no frame has claimed" in str(exc)
        assert peak <= 3 * SCM_MAX_FD  # the decoder's limit (2 * 253) plus one read
        assert len(got) <= sent


async def test_most_fds_one_hostile_connection_can_pin(pipe_fds: tuple[int, int]) -> None:
    # The worst a peer can do to a receiver that does not read: fill the decoder's unclaimed
    # FIFO to its limit, then the receive queue past its budget.
    # docs/explanation/security.md quotes this.
    r, _ = pipe_fds
    budget = 4 * SCM_MAX_FD
    loop = asyncio.get_running_loop()
    async with hostile(max_queued_fds=budget) as (conn, peer):
        base = open_fd_count()

        def pin() -> None:
            with contextlib.suppress(OSError):
                # 253 fds no frame claims: exactly the decoder's limit
                peer.sendmsg([frame(0, b"u")], rights([r] * SCM_MAX_FD))
                peer.setblocking(False)
                for _ in range(200):  # then whole frames until the kernel buffer is full
                    peer.sendmsg([frame(SCM_MAX_FD, b"f")], rights([r] * SCM_MAX_FD))

        await loop.run_in_executor(None, pin)
        await asyncio.sleep(0.2)
        pinned = open_fd_count() - base
        assert not conn.transport.is_reading()
        assert conn.transport.is_closing() is False
        # budget (which counts the decoder's unclaimed fds), plus one read past it
        assert pinned <= budget + SCM_MAX_FD, pinned


async def test_a_peer_stalled_in_a_maximum_frame_holds_one_frame(
    pipe_fds: tuple[int, int],
) -> None:
    # docs/security.md quotes this: a peer that stops one byte short of a maximum-size frame
    # makes the receiver hold that frame (and its fds), nothing more.
    r, _ = pipe_fds
    size = 1 << 20
    loop = asyncio.get_running_loop()
    async with hostile(max_message_size=size) as (conn, peer):
        base = open_fd_count()
        blob = frame(3, b"\xab" * (size - 1), length=size)
        await loop.run_in_executor(None, peer.sendmsg, [blob[:65536]], rights([r] * 3))
        await loop.run_in_executor(None, peer.sendall, blob[65536:])
        await wait_until(lambda: conn.transport.get_read_buffer_size() == len(blob))
        assert conn.transport.get_read_buffer_size() == 8 + size - 1
        assert conn.transport.get_read_pending_fds() == 3
        assert open_fd_count() - base == 3
        peer.sendall(b"\xab")  # the last byte: the frame completes and the buffer empties
        with await within(conn.recv()) as msg:
            assert len(msg.data) == size
            assert msg.fd_count == 3
        assert conn.transport.get_read_buffer_size() == 0


# -- fds with no data, data without its fds ------------------------------------------------------


async def test_stream_fds_with_no_data_are_dropped_by_the_kernel(
    pipe_fds: tuple[int, int],
) -> None:
    r, _ = pipe_fds
    async with hostile() as (conn, peer):
        # A zero-length stream sendmsg sends nothing, its fds included (unix_stream_sendmsg).
        assert peer.sendmsg([b""], rights([r] * 10)) == 0
        peer.sendmsg([frame(0, b"after")])
        msg = await asyncio.wait_for(conn.recv(), TIMEOUT)
        with msg:
            assert (msg.data, msg.fds) == (b"after", ())


@pytest.mark.parametrize("kind", [socket.SOCK_SEQPACKET, socket.SOCK_DGRAM], ids=["seq", "dgram"])
async def test_message_socket_fds_with_no_data_are_delivered(
    kind: int, pipe_fds: tuple[int, int]
) -> None:
    r, _ = pipe_fds
    async with hostile(kind) as (conn, peer):
        base = open_fd_count()
        peer.sendmsg([b""], rights([r] * 3))
        peer.sendmsg([b"after"])
        first = await asyncio.wait_for(conn.recv(), TIMEOUT)
        with first:
            assert first.data == b""
            assert len(first.fds) == 3
        second = await asyncio.wait_for(conn.recv(), TIMEOUT)
        with second:
            assert (second.data, second.fds) == (b"after", ())
        assert open_fd_count() == base


async def test_empty_seqpacket_message_is_not_end_of_stream() -> None:
    # recvmsg returns 0 bytes both for an empty SOCK_SEQPACKET message and at EOF; an empty
    # message from a live peer is a message (aioancillary itself sends one for send(b"")).
    a, b = await connection_pair(socket.SOCK_SEQPACKET)
    try:
        await a.send(b"")
        await a.send(b"after")
        first = await asyncio.wait_for(b.recv(), TIMEOUT)
        first.close()
        second = await asyncio.wait_for(b.recv(), TIMEOUT)
        second.close()
        assert (first.data, second.data) == (b"", b"after")
    finally:
        a.abort()
        b.abort()
        await a.wait_closed()
        await b.wait_closed()


async def test_hostile_empty_seqpacket_messages_then_close(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    async with hostile(socket.SOCK_SEQPACKET) as (conn, peer):
        peer.sendmsg([b""])
        peer.sendmsg([b""], rights([r, r]))
        peer.sendmsg([b"last"])
        peer.sendmsg([b""])  # right before the close: indistinguishable from EOF, may be lost
        peer.close()
        got, exc = await collect(conn)
        assert exc is None
        assert got[:3] == [(b"", 0), (b"", 2), (b"last", 0)]
        assert got[3:] in ([], [(b"", 0)])


@pytest.mark.parametrize("arrive", [0, 2], ids=["none", "some"])
async def test_frame_claiming_fds_that_never_come(arrive: int, pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    async with hostile() as (conn, peer):
        base = open_fd_count()
        peer.sendmsg([frame(0, b"fine")])
        peer.sendmsg([frame(3, b"liar")], rights([r] * arrive))
        # The peer keeps the connection open: the error must not wait for EOF.
        got, exc = await collect(conn)
        assert got == [(b"fine", 0)]
        assert isinstance(exc, ProtocolError)
        assert "declares 3 fd(s)" in str(exc)
        assert open_fd_count() <= base


@pytest.mark.parametrize("nfds", [SCM_MAX_FD + 1, 0xFFFF])
async def test_frame_declaring_more_fds_than_the_cap(nfds: int) -> None:
    async with hostile() as (conn, peer):
        peer.sendmsg([frame(nfds, b"x")])
        got, exc = await collect(conn)
        assert got == []
        assert isinstance(exc, ProtocolError)
        assert "per-frame limit" in str(exc)


# -- oversized and malformed headers --------------------------------------------------------------


@pytest.mark.parametrize("length", [1025, 0xFFFFFFFF])
async def test_oversized_length_field_fails_at_once(length: int, pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    async with hostile(max_message_size=1024) as (conn, peer):
        base = open_fd_count()
        # Only the header and a few bytes: the receiver must not wait for (or allocate) the
        # rest. The fds sent with it are closed with the failure.
        peer.sendmsg([frame(2, b"abc", length=length)], rights([r, r]))
        got, exc = await collect(conn)
        assert got == []
        assert isinstance(exc, ProtocolError)
        assert f"{length} bytes" in str(exc)
        assert open_fd_count() <= base


async def test_length_at_the_limit_is_accepted() -> None:
    async with hostile(max_message_size=1024) as (conn, peer):
        peer.sendall(frame(0, b"z" * 1024))
        msg = await asyncio.wait_for(conn.recv(), TIMEOUT)
        with msg:
            assert msg.data == b"z" * 1024


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (frame(0, b"x", version=0), "version 0"),
        (frame(0, b"x", version=2), "version 2"),
        (frame(0, b"x", flags=0x80), "reserved flags"),
        (b"GET / HTTP/1.1\r\n\r\n", "version 71"),
    ],
    ids=["v0", "v2", "flags", "http"],
)
async def test_malformed_header(header: bytes, match: str, pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    async with hostile() as (conn, peer):
        peer.sendmsg([header], rights([r]))
        got, exc = await collect(conn)
        assert got == []
        assert isinstance(exc, ProtocolError)
        assert match in str(exc)


# -- other control messages -------------------------------------------------------------------


def _enable(sock: socket.socket, option: int) -> bool:
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, 1)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            return False
        raise
    return True


async def test_credentials_and_pidfd_records_next_to_253_fds(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    ours, peer = socket.socketpair()
    # The receiver asks the kernel for SCM_CREDENTIALS and (Linux 6.5+) an SCM_PIDFD with
    # every read: both share the control buffer with SCM_RIGHTS, and a pidfd is an fd too.
    _enable(ours, socket.SO_PASSCRED)
    pidfd = _enable(ours, _SO_PASSPIDFD)
    conn = await open_unix_connection(sock=ours)
    try:
        base = open_fd_count()
        ucred = struct.pack("iII", os.getpid(), os.getuid(), os.getgid())
        creds = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, ucred)]
        for _ in range(3):
            peer.sendmsg([frame(SCM_MAX_FD, b"full")], creds + rights([r] * SCM_MAX_FD))
            msg = await asyncio.wait_for(conn.recv(), TIMEOUT)
            with msg:
                assert len(msg.fds) == SCM_MAX_FD  # not truncated by the extra records
        assert open_fd_count() == base, f"pidfd records leaked (SO_PASSPIDFD on: {pidfd})"
    finally:
        peer.close()
        conn.abort()
        await conn.wait_closed()


async def test_peer_sends_sockets_holding_fds_in_flight(pipe_fds: tuple[int, int]) -> None:
    r, _ = pipe_fds
    async with hostile() as (conn, peer):
        base = open_fd_count()
        # A socket whose receive queue holds fds, and the peer's own end of this connection:
        # closing what arrives must free both (unix GC handles the cycle).
        x, y = socket.socketpair()
        x.sendmsg([b"x"], rights([r] * 50))
        x.sendmsg([b"x"], rights([y.fileno(), x.fileno()]))
        peer.sendmsg([frame(3, b"nest")], rights([y.fileno(), x.fileno(), peer.fileno()]))
        x.close()
        y.close()
        msg = await asyncio.wait_for(conn.recv(), TIMEOUT)
        assert len(msg.fds) == 3
        msg.close()
        assert open_fd_count() == base


# -- random garbage through a real socket -------------------------------------------------------


_valid = st.tuples(st.just("frame"), st.binary(max_size=40), st.integers(0, 4))
_garbage = st.tuples(st.just("raw"), st.binary(min_size=1, max_size=40), st.integers(0, 4))


async def _garbage_session(chunks: list[tuple[str, bytes, int]], framed: bool, fd: int) -> None:
    async with hostile(framed=framed) as (conn, peer):
        for kind, payload, nfds in chunks:
            data = frame(nfds, payload) if kind == "frame" else payload
            try:
                peer.sendmsg([data], rights([fd] * nfds))
            except (BrokenPipeError, ConnectionResetError):
                break  # the victim already gave up on the stream
        peer.shutdown(socket.SHUT_WR)
        got, exc = await collect(conn)
        assert exc is None or isinstance(exc, ProtocolError), exc
        if not framed:
            assert sum(n for _, n in got) == sum(n for _, _, n in chunks)


@pytest.mark.parametrize("loop_name", LOOP_NAMES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.one_of(_valid, _garbage), max_size=10), framed=st.booleans())
def test_random_garbage_from_the_peer(
    loop_name: str, chunks: list[tuple[str, bytes, int]], framed: bool
) -> None:
    r, w = os.pipe()
    try:
        before = open_fd_count()
        with asyncio.Runner(loop_factory=LOOP_FACTORIES[loop_name]) as runner:
            runner.run(_garbage_session(chunks, framed, r))
        assert open_fd_count() == before
    finally:
        os.close(r)
        os.close(w)


# -- security defaults of the server --------------------------------------------------------------


async def _idle(conn: AncillaryConnection) -> None:
    with contextlib.suppress(AncillaryError, OSError):
        async for msg in conn:
            msg.close()


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(("mode", "expected"), [(None, 0o600), (0o660, 0o660)])
async def test_server_socket_file_permissions(
    tmp_path: Path, mode: int | None, expected: int
) -> None:
    path = tmp_path / "srv.sock"
    kwargs = {} if mode is None else {"mode": mode}
    with umask(0):  # the most permissive umask a caller could run with
        server = await start_unix_server(_idle, path, **kwargs)  # type: ignore[arg-type]
        assert os.umask(0) == 0, "start_unix_server did not restore the process umask"
    async with server:
        st_ = os.lstat(path)
        assert stat.S_ISSOCK(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == expected
        assert st_.st_uid == os.geteuid()
    assert not path.exists()


async def test_authorize_rejects_before_any_fd_moves(tmp_path: Path) -> None:
    path = tmp_path / "srv.sock"
    seen: list[Credentials | None] = []
    handled: list[AncillaryConnection] = []

    def authorize(creds: Credentials | None) -> bool:
        seen.append(creds)
        return False

    async def handler(conn: AncillaryConnection) -> None:
        handled.append(conn)

    loop = asyncio.get_running_loop()
    async with await start_unix_server(handler, path, authorize=authorize):
        base = open_fd_count()
        r, w = os.pipe()
        os.set_blocking(r, False)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(str(path))  # completes before the server accepts (backlog)
            # The hostile client pushes an fd before it is even accepted.
            client.sendmsg([frame(1, b"take this")], rights([w]))
            os.close(w)  # the only other reference is now in flight to the server
            client.setblocking(False)
            try:
                reply = await asyncio.wait_for(loop.sock_recv(client, 16), TIMEOUT)
            except ConnectionResetError:
                reply = b""
            assert reply == b""  # disconnected
            # No copy of the write end survives anywhere: the server closed the socket with the
            # fd still in its queue, and the kernel freed it (the pipe sees EOF).
            assert os.read(r, 1) == b""
        finally:
            client.close()
            os.close(r)
        assert handled == []
        assert seen == [Credentials(os.getpid(), os.geteuid(), os.getegid())]
        assert open_fd_count() == base


async def test_client_authorize_rejects_the_server(tmp_path: Path) -> None:
    path = tmp_path / "srv.sock"
    outcome: list[BaseException | None] = []
    done = asyncio.Event()

    async def handler(conn: AncillaryConnection) -> None:
        r, w = os.pipe()
        try:
            await conn.send_fds(b"unwanted", [r, w])  # the server pushes fds at once
            msg = await conn.recv()
            msg.close()
            outcome.append(None)
        except (AncillaryError, OSError) as exc:
            outcome.append(exc)
        finally:
            os.close(r)
            os.close(w)
            done.set()

    async with await start_unix_server(handler, path):
        base = open_fd_count()
        with pytest.raises(PeerRejectedError):
            await open_unix_connection(path, authorize=lambda creds: False)
        await asyncio.wait_for(done.wait(), TIMEOUT)
        assert isinstance(outcome[0], ConnectionError)  # the server saw the client go away
        # The server closes its side when the handler returns, a loop iteration or two later.
        await wait_until(lambda: open_fd_count() <= base)


async def test_authorize_that_raises_does_not_stop_the_server(tmp_path: Path) -> None:
    path = tmp_path / "srv.sock"
    calls = 0
    errors: list[dict[str, object]] = []
    served = asyncio.Event()

    def authorize(creds: Credentials | None) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("authorize blew up")
        return True

    async def handler(conn: AncillaryConnection) -> None:
        served.set()

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        async with await start_unix_server(handler, path, authorize=authorize):
            first = socket.socket(socket.AF_UNIX)
            with first:
                first.connect(str(path))
                first.setblocking(False)
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(loop.sock_recv(first, 1), TIMEOUT) == b""
            async with await open_unix_connection(path):
                await asyncio.wait_for(served.wait(), TIMEOUT)
    finally:
        loop.set_exception_handler(None)
    assert calls == 2
    assert any(isinstance(ctx.get("exception"), RuntimeError) for ctx in errors)
