"""FrameDecoder and frame_header: sans-I/O framing of (bytes, fds) chunks from a stream."""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import re
from collections.abc import Iterator

import pytest
from helpers import alive, unique_fd
from helpers.speedups import both_decoders  # noqa: F401 - the fixture below
from hypothesis import given, settings
from hypothesis import strategies as st

from aioancillary import (
    FRAME_HEADER_SIZE,
    AncillaryMessage,
    FrameDecoder,
    ProtocolError,
    frame_header,
)
from aioancillary._core._framing import ReadDecoder

# Every test here runs on the pure-Python decoders and on the C extension's.
pytestmark = pytest.mark.usefixtures("both_decoders")


# The decoder takes raw fd numbers (it owns them from the feed on). Each test fd has an inode
# of its own, so that "still open" means "still the same file", never a reused number.
def owned(n: int) -> list[int]:
    return [unique_fd() for _ in range(n)]


def nums(msg: AncillaryMessage) -> list[int]:
    return [fd.fileno() for fd in msg.fds]


def frame(data: bytes, nfds: int = 0) -> bytes:
    return frame_header(nfds, len(data)) + data


def close_messages(msgs: list[AncillaryMessage]) -> None:
    for msg in msgs:
        msg.close()


@contextlib.contextmanager
def tracked(n: int) -> Iterator[list[int]]:
    """``n`` fds; any the test (or decoder) did not close are closed afterwards."""
    fds = owned(n)
    try:
        yield fds
    finally:
        for fd in fds:
            if alive(fd):
                os.close(fd)


def assert_all_closed(fds: list[int]) -> None:
    assert not any(alive(fd) for fd in fds)


# -- frame_header -------------------------------------------------------------------------


def test_frame_header_layout() -> None:
    assert FRAME_HEADER_SIZE == 8
    assert frame_header(0, 0) == b"\x01\x00\x00\x00\x00\x00\x00\x00"
    assert frame_header(3, 0x01020304) == b"\x01\x00\x00\x03\x01\x02\x03\x04"
    assert frame_header(0xFFFF, 0xFFFFFFFF) == b"\x01\x00\xff\xff\xff\xff\xff\xff"


@pytest.mark.parametrize(("nfds", "length"), [(-1, 0), (0x10000, 0), (0, -1), (0, 1 << 32)])
def test_frame_header_out_of_range(nfds: int, length: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        frame_header(nfds, length)


# -- decoding: examples -------------------------------------------------------------------


def test_decode_one_frame_with_fds() -> None:
    with tracked(2) as fds:
        dec = FrameDecoder()
        (msg,) = dec.feed(frame(b"hello", 2), list(fds))
        assert msg.data == b"hello"
        assert nums(msg) == fds
        assert dec.pending_fds == 0
        assert dec.buffered_bytes == 0
        dec.eof()
        assert dec.failure is None
        msg.close()


def test_decode_empty_and_many_frames_in_one_chunk() -> None:
    with tracked(3) as fds:
        dec = FrameDecoder()
        msgs = dec.feed(frame(b"", 1) + frame(b"a") + frame(b"bc", 2) + frame(b""), list(fds))
        assert [m.data for m in msgs] == [b"", b"a", b"bc", b""]
        assert [nums(m) for m in msgs] == [[fds[0]], [], [fds[1], fds[2]], []]
        close_messages(msgs)


def test_partial_frames_are_kept_and_data_is_copied() -> None:
    dec = FrameDecoder()
    stream = frame(b"0123456789", 1)
    with tracked(1) as fds:
        buf = bytearray(stream[:5])
        assert dec.feed(memoryview(buf), list(fds)) == []
        buf[:] = b"\xff" * 5  # the caller reuses its buffer
        assert dec.buffered_bytes == 5
        assert dec.pending_fds == 1
        buf2 = bytearray(stream[5:12])
        assert dec.feed(memoryview(buf2), []) == []
        buf2[:] = b"\xff" * 7
        assert dec.pending_fds == 1  # claimed by the header, not yet delivered
        (msg,) = dec.feed(stream[12:], [])
        assert msg.data == b"0123456789"
        assert nums(msg) == [fds[0]]
        msg.close()


def test_fds_may_arrive_before_their_frame() -> None:
    with tracked(2) as fds:
        dec = FrameDecoder()
        assert dec.feed(frame(b"first")[:3], list(fds)) == []
        (m1,) = dec.feed(frame(b"first")[3:], [])
        assert m1.fds == ()
        (m2,) = dec.feed(frame(b"second", 2), [])
        assert nums(m2) == fds
        m2.close()


def _expect_failure(dec: FrameDecoder, match: str) -> ProtocolError:
    assert dec.failure is not None
    assert isinstance(dec.failure, ProtocolError)
    assert re.search(match, str(dec.failure)), str(dec.failure)
    assert dec.pending_fds == 0
    assert dec.buffered_bytes == 0
    return dec.failure


def _refuses_later_input(dec: FrameDecoder) -> None:
    with tracked(2) as late:
        assert dec.feed(frame(b"ok", 2), list(late)) == []
        assert_all_closed(late)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (b"\x02\x00\x00\x00\x00\x00\x00\x00", "version 2"),
        (b"\x00\x00\x00\x00\x00\x00\x00\x00", "version 0"),
        (b"\x01\x05\x00\x00\x00\x00\x00\x00", "reserved flags 0x05"),
        (frame_header(0, 11), "11 bytes, over the 10-byte limit"),
        (frame_header(3, 0), "declaring 3 fds, over the per-frame limit of 2"),
        (frame_header(2, 0), "declares 2 fd.* but only 1 arrived"),
    ],
)
def test_bad_frame_fails_and_closes_every_fd(bad: bytes, match: str) -> None:
    with tracked(4) as fds:
        dec = FrameDecoder(max_frame_size=10, max_fds_per_frame=2)
        good = frame(b"good", 1)
        # fds[0] belongs to the good frame; fds[1] is for the bad one (claimed or not);
        # fds[2] rides with a frame that comes after the fault.
        msgs = dec.feed(good + bad + b"\x00" * 4, [fds[0], fds[1]])
        assert [m.data for m in msgs] == [b"good"]
        assert nums(msgs[0]) == [fds[0]]
        assert alive(fds[0])  # the good message still owns it
        _expect_failure(dec, match)
        assert not alive(fds[1])
        assert dec.feed(frame(b"after", 1), [fds[2]]) == []
        assert not alive(fds[2])
        _refuses_later_input(dec)
        dec.eof()  # does not replace the first failure
        _expect_failure(dec, match)
        close_messages(msgs)


def test_bad_header_split_over_chunks() -> None:
    with tracked(2) as fds:
        dec = FrameDecoder()
        bad = b"\x01\x00\x00\x05\x00\x00\x00\x00"  # 5 fds declared, 2 arrive
        assert dec.feed(bad[:7], list(fds)) == []
        assert dec.failure is None
        assert dec.feed(bad[7:], []) == []
        _expect_failure(dec, "declares 5 fd")
        assert_all_closed(fds)


def test_frame_claiming_fds_not_yet_arrived_fails_even_if_fds_come_later() -> None:
    with tracked(1) as fds:
        dec = FrameDecoder()
        assert dec.feed(frame(b"x", 1), []) == []
        _expect_failure(dec, "only 0 arrived")
        assert dec.feed(b"", list(fds)) == []
        assert_all_closed(fds)


def test_fds_must_be_there_when_the_header_is_complete() -> None:
    # Not when the payload is: fds arriving with a later chunk of the payload break the rule.
    with tracked(1) as fds:
        dec = FrameDecoder()
        stream = frame(b"payload", 1)
        assert dec.feed(stream[:FRAME_HEADER_SIZE], []) == []
        _expect_failure(dec, "declares 1 fd.* but only 0 arrived")
        assert dec.feed(stream[FRAME_HEADER_SIZE:], list(fds)) == []
        assert_all_closed(fds)


def test_too_many_unclaimed_fds() -> None:
    with tracked(5) as fds:
        dec = FrameDecoder(max_pending_fds=4)
        (m1,) = dec.feed(frame(b"a", 1) + frame(b"b", 3)[:4], fds[:4])
        assert dec.failure is None
        assert dec.pending_fds == 3
        (m2,) = dec.feed(frame(b"b", 3)[4:], [])
        assert dec.pending_fds == 0
        assert dec.feed(frame(b"c")[:2], fds[4:]) == []
        assert dec.failure is None  # 1 unclaimed: fine
        m1.close()
        m2.close()
    with tracked(5) as fds:
        dec = FrameDecoder(max_pending_fds=4)
        assert dec.feed(frame(b"c")[:2], fds) == []
        _expect_failure(dec, "5 fds that no frame has claimed .limit 4")
        assert_all_closed(fds)


def test_unclaimed_limit_counts_after_claims() -> None:
    with tracked(6) as fds:
        dec = FrameDecoder(max_pending_fds=2)
        msgs = dec.feed(frame(b"a", 4) + frame(b"b", 0), fds[:6])
        assert dec.failure is None  # 6 arrived, 4 claimed, 2 pending
        assert dec.pending_fds == 2
        close_messages(msgs)
        dec.close()
        assert_all_closed(fds)


def test_eof_mid_frame_closes_claimed_fds() -> None:
    with tracked(2) as fds:
        dec = FrameDecoder()
        msgs = dec.feed(frame(b"done") + frame(b"cut short", 2)[:-3], list(fds))
        assert [m.data for m in msgs] == [b"done"]
        assert dec.buffered_bytes == FRAME_HEADER_SIZE + len(b"cut short") - 3
        assert dec.pending_fds == 2
        dec.eof()
        _expect_failure(dec, "ended inside a frame: 14 byte.* and 2 fd")
        assert_all_closed(fds)


def test_eof_mid_header() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"\x01\x00\x00", []) == []
    dec.eof()
    _expect_failure(dec, "3 byte")


def test_eof_with_unclaimed_fds() -> None:
    with tracked(2) as fds:
        dec = FrameDecoder()
        (msg,) = dec.feed(frame(b"one", 1), list(fds))
        assert dec.pending_fds == 1
        dec.eof()
        _expect_failure(dec, "1 fd")
        assert alive(fds[0])
        assert not alive(fds[1])
        msg.close()


def test_clean_eof() -> None:
    dec = FrameDecoder()
    msgs = dec.feed(frame(b"x"), [])
    dec.eof()
    assert dec.failure is None
    assert [m.data for m in msgs] == [b"x"]


def test_close_closes_held_fds() -> None:
    with tracked(3) as fds:
        dec = FrameDecoder()
        assert dec.feed(frame(b"abc", 2)[:9], list(fds)) == []
        assert dec.pending_fds == 3
        dec.close()
        assert_all_closed(fds)
        assert dec.pending_fds == 0
        assert dec.buffered_bytes == 0


def test_frame_at_the_size_limits() -> None:
    with tracked(3) as fds:
        dec = FrameDecoder(max_frame_size=5, max_fds_per_frame=3)
        (msg,) = dec.feed(frame(b"12345", 3), list(fds))
        assert msg.data == b"12345"
        assert len(msg.fds) == 3
        msg.close()


# -- decoding: properties -----------------------------------------------------------------


@settings(max_examples=150, deadline=None, derandomize=True)
@given(data=st.data())
def test_decode_property(data: st.DataObject) -> None:
    """Any split of a valid stream, fds attached no later than their header's last byte."""
    messages = data.draw(
        st.lists(st.tuples(st.binary(max_size=24), st.integers(0, 3)), max_size=8),
        label="messages",
    )
    stream = b"".join(frame(d, n) for d, n in messages)
    cuts = data.draw(
        st.lists(st.integers(1, max(len(stream) - 1, 1)), unique=True, max_size=12)
        if len(stream) > 1
        else st.just([]),
        label="cuts",
    )
    starts = [0, *sorted(cuts)]
    ends = [*starts[1:], len(stream)]

    def chunk_of(pos: int) -> int:
        return bisect.bisect_right(starts, pos) - 1

    # Where each message's fds are attached, and which chunk completes each message.
    attach: list[int] = []
    completes: list[int] = []
    pos = prev = 0
    for d, _n in messages:
        latest = chunk_of(pos + FRAME_HEADER_SIZE - 1)
        prev = data.draw(st.integers(prev, latest), label="attach")
        attach.append(prev)
        pos += FRAME_HEADER_SIZE + len(d)
        completes.append(chunk_of(pos - 1))
    as_view = data.draw(st.lists(st.booleans(), min_size=len(starts), max_size=len(starts)))

    sent: list[list[int]] = []
    per_chunk: list[list[int]] = [[] for _ in starts]
    received: list[AncillaryMessage] = []
    try:
        for (_d, n), chunk in zip(messages, attach, strict=True):
            fds = owned(n)
            sent.append(fds)
            per_chunk[chunk].extend(fds)
        dec = FrameDecoder()
        for i, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
            piece: bytes | memoryview
            if as_view[i]:
                scratch = bytearray(stream[lo:hi])
                piece = memoryview(scratch)
            else:
                piece = stream[lo:hi]
            out = dec.feed(piece, per_chunk[i])
            if as_view[i]:
                scratch[:] = b"\xee" * len(scratch)  # the decoder must not keep the view
            # Each message comes out of the feed of the chunk holding its last byte.
            assert len(out) == completes.count(i)
            received.extend(out)
            assert dec.failure is None
        dec.eof()
        assert dec.failure is None
        assert dec.pending_fds == 0
        assert dec.buffered_bytes == 0
        assert [m.data for m in received] == [d for d, _n in messages]
        assert [nums(m) for m in received] == sent
        assert all(alive(fd) for fds in sent for fd in fds)
    finally:
        close_messages(received)
        for fds in sent:
            for fd in fds:
                if alive(fd):
                    os.close(fd)


def _mutated_stream() -> st.SearchStrategy[bytes]:
    valid = st.lists(st.tuples(st.binary(max_size=12), st.integers(0, 3)), max_size=5).map(
        lambda ms: b"".join(frame(d, n) for d, n in ms)
    )

    def mutate(stream: bytes, edits: list[tuple[int, int]]) -> bytes:
        out = bytearray(stream)
        for where, value in edits:
            if out:
                out[where % len(out)] = value
        return bytes(out)

    return st.builds(
        mutate, valid, st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 255)), max_size=3)
    )


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    stream=st.binary(max_size=64) | _mutated_stream(),
    cuts=st.lists(st.integers(1, 63), unique=True, max_size=8),
    fd_counts=st.lists(st.integers(0, 3), max_size=9),
    end_with_eof=st.booleans(),
)
def test_garbage_never_crashes_or_leaks(
    stream: bytes, cuts: list[int], fd_counts: list[int], end_with_eof: bool
) -> None:
    bounds = [0, *sorted(c for c in cuts if c < len(stream)), len(stream)]
    chunks = [stream[lo:hi] for lo, hi in itertools.pairwise(bounds)]
    every: list[int] = []
    received: list[AncillaryMessage] = []
    dec = FrameDecoder(max_frame_size=32, max_fds_per_frame=3, max_pending_fds=4)
    try:
        for i, chunk in enumerate(chunks):
            fds = owned(fd_counts[i] if i < len(fd_counts) else 0)
            every.extend(fds)
            received.extend(dec.feed(chunk, fds))
        if end_with_eof:
            dec.eof()
        if dec.failure is not None:
            assert isinstance(dec.failure, ProtocolError)
            assert dec.pending_fds == 0
        # Every fd is in exactly one message, held by the decoder, or closed.
        in_messages = [fd for m in received for fd in nums(m)]
        assert len(set(in_messages)) == len(in_messages)
        assert all(alive(fd) for fd in in_messages)
        held = sum(1 for fd in every if alive(fd)) - len(in_messages)
        assert held == dec.pending_fds
        if end_with_eof:
            assert held == 0
        dec.close()
        close_messages(received)
        assert_all_closed(every)
    finally:
        dec.close()
        close_messages(received)
        for fd in every:
            if alive(fd):
                os.close(fd)


# -- the decoder interface: ReadDecoder, feed_reads -------------------------------------------


def test_read_decoder_makes_one_message_per_read() -> None:
    fds = owned(3)
    dec = ReadDecoder()
    msgs = dec.feed_reads([(b"a", [fds[0]]), (b"", None), (b"bc", fds[1:])])
    assert [(m.data, nums(m)) for m in msgs] == [(b"a", [fds[0]]), (b"", []), (b"bc", fds[1:])]
    assert dec.pending_fds == dec.buffered_bytes == 0
    dec.eof()
    assert dec.failure is None
    close_messages(msgs)
    assert_all_closed(fds)
    (single,) = dec.feed(b"x", None)
    assert single.fd_count == 0


def test_feed_reads_stops_at_a_failure_and_closes_what_follows() -> None:
    fds = owned(3)
    dec = FrameDecoder()
    msgs = dec.feed_reads(
        [(frame(b"ok", 1), [fds[0]]), (b"\x09garbage", [fds[1]]), (frame(b"late", 1), [fds[2]])]
    )
    assert [m.data for m in msgs] == [b"ok"]
    assert dec.failure is not None
    assert alive(fds[0])  # owned by the good message
    assert not alive(fds[1])
    assert not alive(fds[2])  # a read after the failure: closed, never decoded
    close_messages(msgs)
