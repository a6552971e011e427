"""The send side's sans-I/O queue (Outbox) and its checks, with no socket: property tests.

A simulated kernel takes any number of bytes of what :meth:`Outbox.pending` offers (all of it
for a datagram), and a model of the wire records where every fd arrived. For any sequence of
queued messages and partial writes, the tests check the outbox's invariants:

* every fd leaves with or before the first byte of its frame (or, unframed, of its message);
* a ``sendmsg`` never carries more fds than the cap;
* counters always match what is queued;
* nothing is dropped or duplicated: every fd queued is sent, taken back, or dropped, once;
* messages taken back after a failure are exactly those none of whose bytes left.
"""

from __future__ import annotations

import array
import itertools
import socket
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioancillary import InvalidFdError, MessageTooLargeError, OwnedFd, TooManyFdsError
from aioancillary._core._framing import FRAME_HEADER_SIZE, Mode
from aioancillary._core._outbox import (
    _NO_BATCHES,
    Outbox,
    borrowed_fds,
    check_message,
    payload_of,
    take_over,
)

_HEADER = struct.Struct(">HHI")

# Fake fd numbers: the outbox never touches them (it only hands them back).
_next_fd = iter(range(10_000, 10**9))


@dataclass
class Wire:
    """What the peer would have received: the byte stream, and where each fd arrived."""

    data: bytearray = field(default_factory=bytearray)
    fd_arrivals: list[tuple[int, int]] = field(default_factory=list)  # (fd, stream offset)
    datagrams: list[tuple[bytes, list[int]]] = field(default_factory=list)
    sendmsg_fds: list[int] = field(default_factory=list)  # fds per sendmsg


messages_st = st.lists(
    st.tuples(st.binary(max_size=40), st.integers(0, 5)), min_size=0, max_size=25
)


def send_some(outbox: Outbox, wire: Wire, take: int, mode: Mode) -> bool:
    """One simulated sendmsg of what the outbox offers; ``take`` limits a stream write."""
    view, fds = outbox.pending()
    offered = bytes(view)
    view.release()
    sent = len(offered) if mode is Mode.DATAGRAM else max(1, min(take, len(offered)))
    if not offered:
        sent = 0  # an empty datagram
    wire.sendmsg_fds.append(len(fds))
    offset = len(wire.data)
    if mode is Mode.DATAGRAM:
        wire.datagrams.append((offered, list(fds)))
    wire.data += offered[:sent]
    wire.fd_arrivals += [(fd, offset) for fd in fds]
    gone = outbox.advance(sent)
    assert gone == fds  # the fds handed back are exactly those that went out
    return sent < len(offered)


def check_counters(outbox: Outbox, queued_bytes: int, queued_fds: int) -> None:
    assert outbox.nbytes == queued_bytes
    assert outbox.nfds == queued_fds


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    messages=messages_st,
    takes=st.lists(st.integers(1, 200), min_size=1, max_size=60),
    cap=st.integers(1, 8),
    mode=st.sampled_from([Mode.FRAMED, Mode.RAW, Mode.DATAGRAM]),
    interleave=st.integers(0, 25),
)
def test_every_fd_rides_with_or_before_its_message(
    messages: list[tuple[bytes, int]], takes: list[int], cap: int, mode: Mode, interleave: int
) -> None:
    messages = [(data, min(n, cap)) for data, n in messages]
    if mode is Mode.RAW:
        messages = [(data or b"x", n) for data, n in messages]  # a raw stream needs a byte
    outbox = Outbox(mode, cap)
    wire = Wire()
    queued: list[tuple[bytes, list[int]]] = []
    take_iter = itertools.cycle(takes)
    pending_bytes = pending_fds = 0
    for index, (data, nfds) in enumerate(messages):
        fds = [next(_next_fd) for _ in range(nfds)]
        queued.append((data, fds))
        full = outbox.queue(data, list(fds))
        header = FRAME_HEADER_SIZE if mode is Mode.FRAMED else 0
        pending_bytes += header + len(data)
        pending_fds += nfds
        check_counters(outbox, pending_bytes, pending_fds)
        assert not outbox.sendable_now()
        if mode is Mode.FRAMED:
            assert full == (_last_batch_fds(outbox) >= cap)
        if index == interleave:
            # Some writes while more is still to come (the writer callback ran between sends).
            for _ in range(3):
                if outbox:
                    send_some(outbox, wire, next(take_iter), mode)
            pending_bytes, pending_fds = outbox.nbytes, outbox.nfds
    while outbox:
        send_some(outbox, wire, next(take_iter), mode)
    check_counters(outbox, 0, 0)
    check_released(outbox)
    outbox.end_burst()
    assert outbox.sendable_now()
    assert max(wire.sendmsg_fds, default=0) <= cap
    sent_fds = [fd for fd, _offset in wire.fd_arrivals]
    assert sent_fds == [fd for _data, fds in queued for fd in fds]  # none lost, none twice
    if mode is Mode.DATAGRAM:
        assert wire.datagrams == queued  # one message per sendmsg, with exactly its fds
        return
    arrival = dict(wire.fd_arrivals)
    pos = 0
    for data, fds in queued:
        if mode is Mode.FRAMED:
            assert _HEADER.unpack_from(wire.data, pos) == (0x0100, len(fds), len(data))
            start = pos
            pos += FRAME_HEADER_SIZE
        else:
            start = pos
        assert wire.data[pos : pos + len(data)] == data
        pos += len(data)
        for fd in fds:
            assert arrival[fd] <= start  # with or before the first byte of its message
        if mode is Mode.RAW and fds:
            assert all(arrival[fd] == start for fd in fds)  # exactly with it
    assert pos == len(wire.data)


def check_released(outbox: Outbox) -> None:
    """An empty outbox holds no queue of its own (an empty deque costs ~760 bytes), only the
    shared empty one, which nothing ever appends to."""
    assert outbox._batches is _NO_BATCHES
    assert not _NO_BATCHES


def _last_batch_fds(outbox: Outbox) -> int:
    # The fds of the batch the last queued message joined; only tests look inside.
    return len(outbox._batches[-1].fds)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    messages=messages_st,
    sends=st.integers(0, 10),
    takes=st.lists(st.integers(1, 100), min_size=1, max_size=10),
    cap=st.integers(1, 8),
    mode=st.sampled_from([Mode.FRAMED, Mode.RAW, Mode.DATAGRAM]),
)
def test_after_a_failure_unsent_messages_come_back_and_nothing_is_lost(
    messages: list[tuple[bytes, int]], sends: int, takes: list[int], cap: int, mode: Mode
) -> None:
    messages = [(data or b"x", min(n, cap)) for data, n in messages]
    outbox = Outbox(mode, cap)
    wire = Wire()
    queued: list[tuple[bytes, list[int]]] = []
    for data, nfds in messages:
        fds = [next(_next_fd) for _ in range(nfds)]
        queued.append((data, fds))
        outbox.queue(data, list(fds))
    take_iter = itertools.cycle(takes)
    for _ in range(sends):
        if outbox:
            send_some(outbox, wire, next(take_iter), mode)
    unsent = outbox.take_unsent()
    dropped = outbox.drop()
    check_counters(outbox, 0, 0)
    check_released(outbox)
    sent_fds = [fd for fd, _offset in wire.fd_arrivals]
    back_fds = [fd for _data, fds in unsent for fd in fds]
    every = [fd for _data, fds in queued for fd in fds]
    assert sorted(sent_fds + back_fds + dropped) == sorted(every)  # each exactly once
    # What comes back is a tail of the queue, none of it on the wire.
    if mode is Mode.RAW:
        # A raw stream's batch comes back as one chunk (its messages' bytes in order).
        back = b"".join(data for data, _fds in unsent)
        assert b"".join(data for data, _fds in queued).endswith(back)
        assert sent_fds + back_fds == every[: len(sent_fds) + len(back_fds)]
    else:
        tail = queued[len(queued) - len(unsent) :]
        assert unsent == tail
        assert not set(back_fds) & set(sent_fds)
        wire_messages = len(queued) - len(unsent)
        if mode is Mode.DATAGRAM:
            assert wire.datagrams == queued[:wire_messages]
    assert not dropped or mode is not Mode.DATAGRAM


def test_unsent_after_a_partial_write_leaves_the_partial_batch_out() -> None:
    outbox = Outbox(Mode.FRAMED, 4)
    outbox.queue(b"first", [1, 2])
    outbox.queue(b"second", [3])
    view, fds = outbox.pending()
    assert fds == [1, 2, 3]  # one batch, its fds ride with its first byte
    view.release()
    assert outbox.advance(5) == [1, 2, 3]
    outbox.queue(b"third", [4])  # the first batch is sealed: a new one
    unsent = outbox.take_unsent()
    assert unsent == [(b"third", [4])]
    assert outbox.drop() == []  # the sealed batch's fds already left
    assert outbox.nbytes == 0


def test_fd_less_messages_join_even_a_sealed_batch() -> None:
    outbox = Outbox(Mode.FRAMED, 253)
    outbox.queue(b"a", [7])
    view, _fds = outbox.pending()
    view.release()
    outbox.advance(3)
    outbox.queue(b"b", [])  # bytes only: may follow in the same sendmsg
    view, fds = outbox.pending()
    assert fds == []
    assert (
        bytes(view)
        == bytes(_HEADER.pack(0x100, 1, 1) + b"a")[3:] + _HEADER.pack(0x100, 0, 1) + b"b"
    )
    view.release()


def test_bursts_and_the_direct_path() -> None:
    framed = Outbox(Mode.FRAMED, 253)
    assert framed.sendable_now()
    framed.sent_directly()
    assert not framed.sendable_now()  # a burst: later messages are merged
    framed.end_burst()
    assert framed.sendable_now()
    raw = Outbox(Mode.RAW, 253)
    raw.sent_directly()
    assert raw.sendable_now()  # no bursts off framed streams: every message goes at once


# -- checking what a caller hands over ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"bytes", b"bytes"),
        (bytearray(b"ba"), b"ba"),
        (memoryview(b"mv"), b"mv"),
        (array.array("H", [1, 2]), array.array("H", [1, 2]).tobytes()),
        (memoryview(bytes(range(12))).cast("B", (3, 4)), bytes(range(12))),
        (memoryview(bytes(range(10)))[::2], bytes(range(0, 10, 2))),
    ],
    ids=["bytes", "bytearray", "memoryview", "array", "2-D", "strided"],
)
def test_payload_of_gives_the_bytes(data: object, expected: bytes) -> None:
    payload = payload_of(data)
    assert len(payload) == len(expected)
    assert bytes(payload) == expected


@pytest.mark.parametrize("bad", ["text", [1], 3, None, 2.5])
def test_payload_of_refuses_non_bytes(bad: object) -> None:
    with pytest.raises(TypeError, match="bytes-like"):
        payload_of(bad)


def test_borrowed_fds() -> None:
    with socket.socket() as sock:
        assert borrowed_fds([3, sock]) == [3, sock.fileno()]
    with pytest.raises(TypeError, match="bool"):
        borrowed_fds([True])
    with pytest.raises(InvalidFdError):
        borrowed_fds([2**31])
    with pytest.raises(TypeError, match="iterable"):
        borrowed_fds(5)  # type: ignore[arg-type]


def test_take_over_detaches_or_closes_everything() -> None:
    sock = socket.socket()
    owned = OwnedFd(socket.socket().detach())
    nums = take_over([sock, owned])
    assert sock.fileno() == -1
    assert owned.closed
    for num in nums:
        socket.socket(fileno=num).close()


def test_check_message_limits() -> None:
    check_message(Mode.FRAMED, 10, 0, fd_cap=1, max_message_size=10, datagram_limit=0)
    with pytest.raises(MessageTooLargeError):
        check_message(Mode.FRAMED, 11, 0, fd_cap=1, max_message_size=10, datagram_limit=0)
    with pytest.raises(MessageTooLargeError):
        check_message(Mode.DATAGRAM, 11, 0, fd_cap=1, max_message_size=99, datagram_limit=10)
    with pytest.raises(TooManyFdsError, match="at most 1"):
        check_message(Mode.RAW, 1, 2, fd_cap=1, max_message_size=1, datagram_limit=1)
    with pytest.raises(ValueError, match="at least one byte"):
        check_message(Mode.RAW, 0, 1, fd_cap=1, max_message_size=1, datagram_limit=1)
    check_message(Mode.FRAMED, 0, 1, fd_cap=1, max_message_size=1, datagram_limit=1)
