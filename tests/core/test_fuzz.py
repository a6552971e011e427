"""Hypothesis-driven fuzzing of the two parsers that see a peer's bytes: the frame decoder and
the control-message parser. No sockets: fds are real (``/dev/null`` duplicates), because both
parsers own and close what they are given, so every fd is checked open or closed by number.

The same properties run under atheris in ``fuzz/`` (coverage-guided, no time limit); set
``AIOANCILLARY_FUZZ_EXAMPLES`` for a longer hypothesis run.
"""

from __future__ import annotations

import array
import fcntl
import itertools
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from helpers import alive, is_open, unique_fd
from helpers.speedups import both_decoders  # noqa: F401 - the fixture below
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioancillary import (
    FRAME_HEADER_SIZE,
    SCM_MAX_FD,
    Credentials,
    FrameDecoder,
    OwnedFd,
    Platform,
    SocketAncillary,
    frame_header,
)

# Every test here runs on the pure-Python decoders and on the C extension's.
pytestmark = pytest.mark.usefixtures("both_decoders")

# More examples for a longer run: AIOANCILLARY_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py
EXAMPLES = int(os.environ.get("AIOANCILLARY_FUZZ_EXAMPLES", "300"))
CLOEXEC = socket.MSG_CMSG_CLOEXEC
PLATFORMS = {
    "linux": Platform("linux", SCM_MAX_FD, CLOEXEC),
    "darwin": Platform("darwin", None, 0),
    "freebsd": Platform("freebsd", SCM_MAX_FD, CLOEXEC),
}
SOL = socket.SOL_SOCKET
RIGHTS = socket.SCM_RIGHTS
CREDS = 0x02  # SCM_CREDENTIALS (Linux)
PIDFD = 0x04  # SCM_PIDFD (Linux 6.5+)


def new_fd() -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


@pytest.fixture
def sentinel() -> Iterator[int]:
    """An fd no parser is given: it must stay open whatever they do."""
    fd = new_fd()
    yield fd
    assert is_open(fd)
    os.close(fd)


# -- FrameDecoder: a well-behaved peer, any chunking ----------------------------------------


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[tuple[bytes, int]], list[int], list[int]]:
    """Messages, how they are grouped into sendmsg batches, and where the reads cut the stream."""
    messages = draw(
        st.lists(st.tuples(st.binary(max_size=48), st.integers(0, 3)), min_size=1, max_size=16)
    )
    batch_ends = sorted(set(draw(st.lists(st.integers(1, len(messages)), max_size=6))))
    if not batch_ends or batch_ends[-1] != len(messages):
        batch_ends.append(len(messages))
    total = sum(FRAME_HEADER_SIZE + len(data) for data, _ in messages)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, total - 1)), max_size=20))))
    return messages, batch_ends, cuts


@settings(
    max_examples=EXAMPLES // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(stream=streams())
def test_decoder_gives_every_message_exactly_its_fds(
    stream: tuple[list[tuple[bytes, int]], list[int], list[int]], sentinel: int
) -> None:
    messages, batch_ends, cuts = stream
    fds = [[new_fd() for _ in range(n)] for _, n in messages]
    # Lay the batches out: each batch's fds ride with its first byte (one sendmsg).
    wire = bytearray()
    batch_fds: dict[int, list[int]] = {}  # stream offset of a batch -> its fds
    start = 0
    for end in batch_ends:
        offset = len(wire)
        carried: list[int] = []
        for (data, nfds), own in zip(messages[start:end], fds[start:end], strict=True):
            wire += frame_header(nfds, len(data)) + data
            carried += own
        if carried:
            batch_fds[offset] = carried
        start = end
    # Linux ends a stream read right after an fd-carrying chunk: no read spans the starts of
    # two fd-carrying batches (unix_stream_read_generic). Cut where the random cuts do not.
    starts = sorted(batch_fds)
    bounds = set(cuts) | {0, len(wire)}
    for before, after in itertools.pairwise(starts):
        if not any(before < c <= after for c in bounds):
            bounds.add(after)
    edges = sorted(b for b in bounds if 0 <= b <= len(wire))

    decoder = FrameDecoder()
    out = []
    for lo, hi in itertools.pairwise(edges):
        chunk_fds = [f for s in starts if lo <= s < hi for f in batch_fds[s]]
        out += decoder.feed(bytes(wire[lo:hi]), chunk_fds)
        assert decoder.failure is None
    decoder.eof()
    assert decoder.failure is None
    assert decoder.pending_fds == 0
    assert [m.data for m in out] == [data for data, _ in messages]
    for msg, own in zip(out, fds, strict=True):
        assert [f.fileno() for f in msg.fds] == own  # each message got its own fds
        msg.close()
    assert not any(is_open(f) for own in fds for f in own)


# -- FrameDecoder: a hostile peer ------------------------------------------------------------

_chunk = st.one_of(
    st.binary(max_size=24),
    st.builds(
        lambda nfds, size, data: frame_header(nfds, size) + data,
        st.integers(0, 6),
        st.integers(0, 40),
        st.binary(max_size=40),
    ),
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    feeds=st.lists(st.tuples(_chunk, st.integers(0, 5)), max_size=12),
    max_frame_size=st.integers(0, 48),
    max_fds=st.integers(0, 5),
    max_pending=st.integers(0, 8),
    end=st.sampled_from(["eof", "close"]),
)
def test_decoder_never_raises_leaks_or_overholds(
    *,
    feeds: list[tuple[bytes, int]],
    max_frame_size: int,
    max_fds: int,
    max_pending: int,
    end: str,
    sentinel: int,
) -> None:
    decoder = FrameDecoder(
        max_frame_size=max_frame_size, max_fds_per_frame=max_fds, max_pending_fds=max_pending
    )
    given_fds: list[int] = []
    delivered: list[OwnedFd] = []
    failed = False
    for data, nfds in feeds:
        fds = [unique_fd() for _ in range(nfds)]
        given_fds += fds
        messages = decoder.feed(data, fds)
        if failed:
            assert messages == []  # a broken stream stays broken
        for msg in messages:
            assert len(msg.data) <= max_frame_size
            assert len(msg.fds) <= max_fds
            delivered += msg.take_fds()
        if decoder.failure is not None:
            failed = True
            assert decoder.pending_fds == 0
            assert decoder.buffered_bytes == 0
        else:
            # Bounded holdings: unclaimed fds up to the limit, plus one claimed frame's fds.
            assert decoder.pending_fds <= max_pending + max_fds
            assert decoder.buffered_bytes < FRAME_HEADER_SIZE + max_frame_size
    if end == "eof":
        decoder.eof()
    decoder.close()
    assert decoder.pending_fds == 0
    held = {f.fileno() for f in delivered}
    assert len(held) == len(delivered)  # no fd handed out twice
    for num in given_fds:
        assert alive(num) == (num in held)  # delivered ones open, every other one closed
    for f in delivered:
        f.close()


def test_decoder_oversized_length_fails_before_buffering() -> None:
    decoder = FrameDecoder(max_frame_size=16)
    fd = unique_fd()
    assert decoder.feed(struct.pack(">BBHI", 1, 0, 1, 0xFFFFFFFF) + b"x" * 4, [fd]) == []
    assert decoder.failure is not None
    assert not alive(fd)
    assert decoder.buffered_bytes == 0


# -- SocketAncillary.parse -------------------------------------------------------------------


def _record() -> st.SearchStrategy[tuple[str, int, int, bytes]]:
    rights = st.tuples(st.just("rights"), st.integers(0, 6), st.just(0), st.binary(max_size=3))
    pidfd = st.tuples(st.just("pidfd"), st.just(1), st.just(0), st.just(b""))
    creds = st.tuples(st.just("creds"), st.just(0), st.just(0), st.binary(max_size=20))
    other = st.tuples(
        st.just("other"),
        st.sampled_from([SOL, 0, 41, 0xFFFF, -1]),
        st.integers(0, 40).filter(lambda t: t not in (RIGHTS, CREDS, PIDFD)),
        st.binary(max_size=24),
    )
    return st.one_of(rights, pidfd, creds, other)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    records=st.lists(_record(), max_size=6),
    platform_name=st.sampled_from(sorted(PLATFORMS)),
    msg_flags=st.sampled_from([0, socket.MSG_CTRUNC, socket.MSG_TRUNC, 0x7FFF_FFFF, 0x10_0000]),
    recv_flags=st.sampled_from([0, CLOEXEC]),
    maxfds=st.one_of(st.none(), st.integers(-2, 8)),
)
def test_parse_owns_every_fd_and_nothing_else(
    *,
    records: list[tuple[str, int, int, bytes]],
    platform_name: str,
    msg_flags: int,
    recv_flags: int,
    maxfds: int | None,
    sentinel: int,
) -> None:
    platform = PLATFORMS[platform_name]
    linux = platform_name == "linux"
    ancdata: list[tuple[int, int, bytes]] = []
    rights_fds: list[int] = []
    pidfds: list[int] = []
    creds: Credentials | None = None
    for kind, a, b, payload in records:
        if kind == "rights":
            fds = [new_fd() for _ in range(a)]
            rights_fds += fds
            # A record cut short may end in a partial int: junk the parser must not read.
            ancdata.append((SOL, RIGHTS, array.array("i", fds).tobytes() + payload))
        elif kind == "pidfd" and linux:
            fd = new_fd()
            pidfds.append(fd)
            ancdata.append((SOL, PIDFD, array.array("i", [fd]).tobytes()))
        elif kind == "creds":
            ancdata.append((SOL, CREDS, payload))
            if linux and len(payload) >= 12:
                creds = Credentials(*struct.unpack_from("iII", payload))
        elif kind == "other":
            ancdata.append((a, b, payload))
    everything = rights_fds + pidfds

    if maxfds is not None and maxfds < 0:
        with pytest.raises(ValueError, match="maxfds"):
            SocketAncillary.parse(
                ancdata, msg_flags, recv_flags=recv_flags, maxfds=maxfds, platform=platform
            )
        assert not any(map(is_open, everything))
        return

    anc = SocketAncillary.parse(
        ancdata, msg_flags, recv_flags=recv_flags, maxfds=maxfds, platform=platform
    )
    if msg_flags & socket.MSG_CTRUNC:
        assert anc.is_truncated
        assert anc.fds == ()
        assert anc.pidfd is None
        assert anc.truncated_fds == len(everything)
        assert not any(map(is_open, everything))
        return
    keep = len(rights_fds) if maxfds is None else min(maxfds, len(rights_fds))
    assert [f.fileno() for f in anc.fds] == rights_fds[:keep]
    assert anc.discarded_fds == len(rights_fds) - keep
    assert not any(map(is_open, rights_fds[keep:]))
    for fd in rights_fds[:keep] + pidfds[:1]:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    if linux:
        assert anc.credentials == creds
        assert (anc.pidfd.fileno() if anc.pidfd else None) == (pidfds[0] if pidfds else None)
    else:
        assert anc.credentials is None
    anc.close()
    # One pidfd is kept (the kernel never sends two); any other is closed at parse time.
    assert not any(map(is_open, everything))
