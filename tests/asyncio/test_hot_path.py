"""The transport reads through the hot path this process selected: the C extension's classes,
or the pure-Python ones with ``AIOANCILLARY_NO_EXTENSIONS=1`` (CI runs the suite both ways)."""

from __future__ import annotations

import os
import socket

import pytest
from helpers import transport_pair
from helpers.speedups import REQUIRED

from aioancillary._core import _framing
from aioancillary._kernel import _accel, _syscalls

DISABLED = os.environ.get("AIOANCILLARY_NO_EXTENSIONS", "") not in ("", "0")


def test_the_selected_path_is_the_expected_one() -> None:
    if DISABLED:
        assert _accel.EXTENSION is None
        assert _accel.PATH == "pure Python, AIOANCILLARY_NO_EXTENSIONS is set"
        assert _accel.Receiver is _syscalls.Receiver
        assert _accel.FrameDecoder is _framing.FrameDecoder
    elif REQUIRED:  # CI: a pass meant to use the extension must not fall back silently
        assert _accel.EXTENSION is not None, _accel.PATH
        assert _accel.PATH == "C extension"


@pytest.mark.parametrize(
    ("sock_type", "decoder"),
    [(socket.SOCK_STREAM, "FrameDecoder"), (socket.SOCK_SEQPACKET, "ReadDecoder")],
)
async def test_transport_reads_through_the_selected_classes(sock_type: int, decoder: str) -> None:
    async with transport_pair(sock_type) as (ta, _pa, _tb, _pb):
        assert type(ta._receiver) is _accel.Receiver
        assert type(ta._decoder) is getattr(_accel, decoder)


async def test_transports_of_a_loop_share_their_read_buffer() -> None:
    # Every read is copied out before the next: a connection needs no buffer of its own.
    async with (
        transport_pair() as (ta, _pa, tb, _pb),
        transport_pair(socket.SOCK_SEQPACKET) as (tc, _pc, td, _pd),
    ):
        assert ta._rview is tb._rview
        assert tc._rview is td._rview
        assert tc._rview is not ta._rview  # another size: a message's maximum, not 256 KiB
