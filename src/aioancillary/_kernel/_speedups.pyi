"""Types of the optional C extension (``_speedups.c``); see :mod:`._accel`."""

import socket
from collections.abc import Sequence

from .._core import _outbox
from .._core._errors import ProtocolError
from .._core._fd import OwnedFd
from .._core._message import AncillaryMessage
from .._core._platform import Platform

CONTROL_BUFFER: int

class Outbox(_outbox.Outbox):
    # Not a subclass at run time: the same interface, in C, with the transport's send calls.
    size_limit: int
    def try_write(self, fileno: int, data: object, fds: object) -> int | OSError: ...
    def write(self, fileno: int, payload: _outbox.Payload, nums: list[int]) -> int | OSError: ...
    def flush(self, fileno: int) -> OSError | None: ...

def duplicates(nums: list[int]) -> list[int]: ...

class Receiver:
    def __init__(
        self, sock: socket.socket, buffer: memoryview, platform: Platform, eof: int
    ) -> None: ...
    def read(
        self, limit: int, max_fds: int
    ) -> tuple[list[tuple[bytes, list[int] | None]], int, Exception | None]: ...

class FrameDecoder:
    failure: ProtocolError | None
    def __init__(
        self, *, max_frame_size: int = ..., max_fds_per_frame: int = ..., max_pending_fds: int = ...
    ) -> None: ...
    @property
    def pending_fds(self) -> int: ...
    @property
    def buffered_bytes(self) -> int: ...
    def feed(
        self, data: bytes | bytearray | memoryview, fds: Sequence[int | OwnedFd] | None
    ) -> list[AncillaryMessage]: ...
    def feed_reads(self, reads: list[tuple[bytes, list[int] | None]]) -> list[AncillaryMessage]: ...
    def eof(self) -> None: ...
    def close(self) -> None: ...

def messages_of(reads: list[tuple[bytes, list[int] | None]]) -> list[AncillaryMessage]: ...
def parse_control(
    control: bytes,
    msg_flags: int,
    recv_flags: int,
    platform: Platform,
    data: bytes = b"",
    buffer_len: int = 0,
) -> list[int]: ...
