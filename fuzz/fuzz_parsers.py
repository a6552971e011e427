"""Fuzz target for the two parsers that see a peer's bytes: FrameDecoder and the cmsg parser.

With atheris installed this is a coverage-guided libFuzzer target::

    .venv/bin/python fuzz/fuzz_parsers.py -max_total_time=300 fuzz/corpus

Without atheris (or with ``--replay``) it replays every file of ``fuzz/corpus`` (or the paths
given) through the same checks and exits non-zero on the first failure::

    .venv/bin/python fuzz/fuzz_parsers.py --replay

One input drives both parsers. Its bytes are read by :class:`Input` (so a replay needs no
atheris): decoder limits, then chunks with fd counts; then ancillary records. Every fd is a real
``/dev/null`` duplicate, because the parsers own and close what they are given; after each
input the process must hold exactly the fds it held before, and every property below must hold.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

try:
    import atheris
except ImportError:  # replay-only mode
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        from aioancillary import (
            FRAME_HEADER_SIZE,
            SCM_MAX_FD,
            FrameDecoder,
            OwnedFd,
            Platform,
            SocketAncillary,
        )
else:
    from aioancillary import (
        FRAME_HEADER_SIZE,
        SCM_MAX_FD,
        FrameDecoder,
        OwnedFd,
        Platform,
        SocketAncillary,
    )

from aioancillary import AncillaryError
from aioancillary._kernel._syscalls import _fds_of

speedups: ModuleType | None
try:
    from aioancillary._kernel import _speedups as speedups
except ImportError:  # no C extension built: the Python parsers only
    speedups = None

CORPUS = Path(__file__).with_name("corpus")
BUFFER = memoryview(bytearray(b"abcdefgh"))
PLATFORMS = [
    Platform("linux", SCM_MAX_FD, socket.MSG_CMSG_CLOEXEC),
    Platform("darwin", None, 0),
    Platform("freebsd", SCM_MAX_FD, socket.MSG_CMSG_CLOEXEC),
]
FLAGS = [0, socket.MSG_CTRUNC, socket.MSG_TRUNC, 0x7FFFFFFF]
SOL, RIGHTS, CREDS, PIDFD = socket.SOL_SOCKET, socket.SCM_RIGHTS, 0x02, 0x04


class Input:
    """Reads an input's bytes as small integers and byte strings; zeros once exhausted."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def left(self) -> bool:
        return self.pos < len(self.data)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _devnull() -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def fuzz_decoder(inp: Input, decoder_class: Any = FrameDecoder) -> list[object]:
    """Drive one decoder; return what it did (messages and failure), to compare the two."""
    max_size, max_fds, max_pending = inp.byte(), inp.byte() % 8, inp.byte() % 16
    decoder = decoder_class(
        max_frame_size=max_size, max_fds_per_frame=max_fds, max_pending_fds=max_pending
    )
    given: list[OwnedFd] = []
    delivered: list[OwnedFd] = []
    transcript: list[object] = []
    for _ in range(inp.byte() % 16):
        chunk = inp.bytes(inp.byte() % 64)
        fds = [OwnedFd(_devnull()) for _ in range(inp.byte() % 6)]
        given += fds
        for msg in decoder.feed(chunk, fds):
            assert len(msg.data) <= max_size, msg
            assert len(msg.fds) <= max_fds, msg
            transcript.append((msg.data, len(msg.fds)))
            delivered += msg.fds
        if decoder.failure is None:
            assert decoder.pending_fds <= max_pending + max_fds
            assert decoder.buffered_bytes < FRAME_HEADER_SIZE + max_size
        else:
            assert decoder.pending_fds == 0
            assert decoder.buffered_bytes == 0
        transcript.append((str(decoder.failure), decoder.pending_fds, decoder.buffered_bytes))
    if inp.byte() & 1:
        decoder.eof()
        transcript.append(str(decoder.failure))
    decoder.close()
    ids = {id(f) for f in delivered}
    assert len(ids) == len(delivered), "an fd was delivered twice"
    for f in given:
        assert f.closed != (id(f) in ids), f"fd {f!r}: delivered={id(f) in ids}"
    for f in delivered:
        f.close()
    return transcript


Record = tuple[str, int, bytes]  # (kind, how many fds, bytes)


def read_cmsg_case(inp: Input) -> tuple[Platform, int, int, int | None, list[Record]]:
    """The cmsg case an input describes, before any fd is opened."""
    platform = PLATFORMS[inp.byte() % len(PLATFORMS)]
    msg_flags = FLAGS[inp.byte() % len(FLAGS)]
    recv_flags = socket.MSG_CMSG_CLOEXEC if inp.byte() & 1 else 0
    maxfds_byte = inp.byte()
    maxfds = None if maxfds_byte >= 200 else maxfds_byte % 10
    records: list[Record] = []
    for _ in range(inp.byte() % 6):
        kind = inp.byte() % 4
        if kind == 0:  # SCM_RIGHTS with real fds, maybe a partial int after them
            nfds = inp.byte() % 6
            records.append(("rights", nfds, inp.bytes(inp.byte() % 4)))
        elif kind == 1 and platform.name == "linux":  # SCM_PIDFD: an fd the kernel adds
            records.append(("pidfd", 1, b""))
        elif kind == 2:  # SCM_CREDENTIALS-shaped bytes
            records.append(("creds", 0, inp.bytes(inp.byte() % 24)))
        else:  # anything else: must never be taken for fds
            level = [SOL, 0, 41, 0xFFFF][inp.byte() % 4]
            kind_ = inp.byte() % 48
            if level == SOL and kind_ in (RIGHTS, PIDFD):
                kind_ += 50
            records.append((f"{level}:{kind_}", 0, inp.bytes(inp.byte() % 32)))
    return platform, msg_flags, recv_flags, maxfds, records


def materialise(records: list[Record]) -> tuple[list[tuple[int, int, bytes]], list[int], list[int]]:
    """``(ancdata, rights, every fd opened)`` for the records, with fresh /dev/null fds."""
    ancdata: list[tuple[int, int, bytes]] = []
    rights: list[int] = []
    real: list[int] = []
    for kind, nfds, extra in records:
        if kind in ("rights", "pidfd"):
            fds = [_devnull() for _ in range(nfds)]
            real += fds
            if kind == "rights":
                rights += fds
            ancdata.append((SOL, RIGHTS if kind == "rights" else PIDFD, _ints(fds) + extra))
        elif kind == "creds":
            ancdata.append((SOL, CREDS, extra))
        else:
            level, kind_ = map(int, kind.split(":"))
            ancdata.append((level, kind_, extra))
    return ancdata, rights, real


def _ints(fds: list[int]) -> bytes:
    return array.array("i", fds).tobytes()


def fuzz_cmsg(inp: Input) -> None:
    platform, msg_flags, recv_flags, maxfds, records = read_cmsg_case(inp)
    ancdata, rights, real = materialise(records)
    anc = SocketAncillary.parse(
        ancdata, msg_flags, recv_flags=recv_flags, maxfds=maxfds, platform=platform
    )
    if msg_flags & socket.MSG_CTRUNC:
        assert anc.is_truncated
        assert anc.fds == ()
        assert anc.truncated_fds == len(real)
    else:
        keep = len(rights) if maxfds is None else min(maxfds, len(rights))
        assert [f.fileno() for f in anc.fds] == rights[:keep]
        assert anc.discarded_fds == len(rights) - keep
    anc.close()


def control_buffer(ancdata: list[tuple[int, int, bytes]]) -> bytes:
    """The raw control buffer a kernel would fill with these records (CMSG_SPACE-aligned)."""
    out = b""
    for level, kind, data in ancdata:
        header = struct.pack("Lii", socket.CMSG_LEN(len(data)), level, kind)
        out += (header + data).ljust(socket.CMSG_SPACE(len(data)), b"\0")
    return out


def fuzz_cmsg_c(inp: Input) -> None:
    """The C parser against the Python rules (_syscalls._fds_of) on the same case."""
    platform, msg_flags, recv_flags, _maxfds, records = read_cmsg_case(inp)
    outcomes = []
    for side in ("py", "c"):
        ancdata, _rights, real = materialise(records)
        try:
            if side == "py":
                fds = _fds_of(ancdata, msg_flags, recv_flags, platform, buffer=BUFFER, nbytes=3)
            else:
                fds = speedups.parse_control(  # type: ignore[union-attr]
                    control_buffer(ancdata),
                    msg_flags,
                    recv_flags,
                    platform,
                    data=bytes(BUFFER[:3]),
                    buffer_len=len(BUFFER),
                )
            error = None
        except AncillaryError as exc:
            fds, error = [], (type(exc), str(exc), getattr(exc, "closed_fds", None))
        outcomes.append(([real.index(fd) for fd in fds], error, [_is_open(fd) for fd in real]))
        for fd in real:
            with contextlib.suppress(OSError):
                os.close(fd)
    assert outcomes[0] == outcomes[1], outcomes


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def TestOneInput(data: bytes) -> None:
    before = _fd_count()
    inp = Input(data)
    transcript = fuzz_decoder(inp)
    at_cmsg = inp.pos
    fuzz_cmsg(inp)
    if speedups is not None:  # the same input through the C parsers
        assert fuzz_decoder(Input(data), speedups.FrameDecoder) == transcript
        cmsg_input = Input(data)
        cmsg_input.pos = at_cmsg
        fuzz_cmsg_c(cmsg_input)
    after = _fd_count()
    assert after == before, f"fd leak: {before} -> {after} open fds"


def replay(paths: list[str]) -> int:
    files = [Path(p) for p in paths] or sorted(CORPUS.iterdir())
    for path in files:
        TestOneInput(path.read_bytes())
    also = "and the C extension's" if speedups is not None else "(no C extension: Python only)"
    print(f"replayed {len(files)} input(s) through the Python parsers {also}: ok")
    return 0


def main() -> int:
    args = sys.argv[1:]
    if atheris is None or (args and args[0] == "--replay"):
        return replay([a for a in args if a != "--replay"])
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
