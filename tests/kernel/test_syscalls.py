"""The one syscall layer (``_kernel/_syscalls.py``): ``Receiver.read`` (many reads per call,
how each kind of socket ends), the translation of send errors, and a partial stream write
that sends its fds once."""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Iterator

import pytest

import aioancillary._kernel._blocking
import aioancillary._kernel._syscalls
from aioancillary import (
    DataTruncatedError,
    FdsInFlightError,
    InvalidFdError,
    OwnedFd,
    recv_fds,
    send_fds,
)
from aioancillary._core._fd import close_raw
from aioancillary._core._platform import current_platform
from aioancillary._kernel._syscalls import (
    AGAIN,
    END,
    EOF_NEVER,
    EOF_ON_EMPTY,
    EOF_PEEK,
    FAILED,
    LIMIT,
    Receiver,
    send_message,
    translate_send_error,
)


def test_translate_send_error() -> None:
    ebadf = OSError(errno.EBADF, "Bad file descriptor")
    assert isinstance(translate_send_error(ebadf, 1), InvalidFdError)
    assert translate_send_error(ebadf, 0) is ebadf  # the socket itself is bad
    refs = translate_send_error(OSError(errno.ETOOMANYREFS, "Too many references"), 3)
    assert isinstance(refs, FdsInFlightError)
    assert isinstance(refs, OSError)
    assert refs.errno == errno.ETOOMANYREFS
    other = OSError(errno.EPIPE, "Broken pipe")
    assert translate_send_error(other, 1) is other


def test_partial_stream_write_sends_fds_once(
    stream_pair: tuple[socket.socket, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A socket with a timeout sends what fits and returns: send_fds completes the write
    # without the fds, which went with the first chunk.
    a, b = stream_pair
    a.settimeout(10)
    calls: list[int] = []  # how many fds each sendmsg carried

    def spy(
        sock: socket.socket, buffers: list[bytes | bytearray | memoryview], fds: list[int]
    ) -> int:
        calls.append(len(fds))
        return send_message(sock, buffers, fds)

    monkeypatch.setattr(aioancillary._kernel._syscalls, "send_message", spy)
    payload = bytes(range(256)) * 8192  # 2 MiB: far more than the socket buffer
    received = bytearray()
    fds: list[OwnedFd] = []
    failure: list[BaseException] = []

    def reader() -> None:
        try:
            while len(received) < len(payload):
                msg = recv_fds(b, 65536, 10)
                if not msg.data:
                    break
                received.extend(msg.data)
                fds.extend(msg.take_fds())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with OwnedFd(os.open(os.devnull, os.O_RDONLY)) as fd:
            assert send_fds(a, payload, [fd, fd]) == len(payload)
    finally:
        thread.join(10)
        for got in fds:
            got.close()
    assert not failure
    assert bytes(received) == payload
    assert len(fds) == 2
    assert len(calls) > 1  # the write really was partial
    assert calls[0] == 2
    assert set(calls[1:]) == {0}


@pytest.fixture
def stream_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


def _receiver(sock: socket.socket, eof: int) -> Receiver:
    sock.setblocking(False)
    return Receiver(sock, memoryview(bytearray(4096)), current_platform(), eof)


def test_receiver_reads_until_the_socket_would_block(
    stream_pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = stream_pair
    r, w = os.pipe()
    os.close(w)
    try:
        send_fds(a, b"with an fd", [r])
        a.sendall(b"then bytes")
    finally:
        os.close(r)
    reads, how, error = _receiver(b, EOF_ON_EMPTY).read(32, 253)
    assert (how, error) == (AGAIN, None)
    assert reads[0][0] == b"with an fd"  # the kernel stops after a chunk that carried fds
    fds = reads[0][1]
    assert fds is not None
    assert len(fds) == 1
    assert b"".join(data for data, _ in reads) == b"with an fdthen bytes"
    close_raw(fds)


def test_receiver_stops_at_its_fd_bound(stream_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = stream_pair
    r, w = os.pipe()
    os.close(w)
    try:
        for _ in range(3):
            send_fds(a, b"x", [r, r])
    finally:
        os.close(r)
    reads, how, _error = _receiver(b, EOF_ON_EMPTY).read(32, 3)
    assert how == LIMIT  # 4 fds read: at or past the bound of 3, the caller checks its budget
    assert sum(len(fds or ()) for _, fds in reads) == 4
    for _, fds in reads:
        close_raw(fds or [])
    rest, how, _error = _receiver(b, EOF_ON_EMPTY).read(32, 253)
    assert how == AGAIN
    for _, fds in rest:
        close_raw(fds or [])


@pytest.mark.parametrize(
    ("sock_type", "eof", "ends"),
    [
        (socket.SOCK_STREAM, EOF_ON_EMPTY, True),
        (socket.SOCK_SEQPACKET, EOF_PEEK, True),
        (socket.SOCK_DGRAM, EOF_NEVER, False),
    ],
)
def test_how_each_kind_of_socket_ends(sock_type: int, eof: int, ends: bool) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, sock_type)
    with a, b:
        if sock_type == socket.SOCK_DGRAM:
            a.send(b"")  # an empty datagram is a message: dgram sockets never end
        else:
            a.close()
        reads, how, error = _receiver(b, eof).read(4, 253)
    assert error is None
    if ends:
        assert (reads, how) == ([], END)
    else:
        assert reads == [(b"", None)]


def test_a_failed_read_keeps_the_reads_before_it() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.send(b"fits")
        a.send(b"x" * 8000)  # more than the 4096-byte buffer: MSG_TRUNC
        reads, how, error = _receiver(b, EOF_PEEK).read(4, 253)
    assert reads == [(b"fits", None)]
    assert how == FAILED
    assert isinstance(error, DataTruncatedError)
