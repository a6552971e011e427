"""Both implementations of the receive hot path, for tests that must cover each one.

The suite as a whole runs on the path the process selected (``AIOANCILLARY_NO_EXTENSIONS``;
CI runs it twice). Tests of the parsers themselves run on both here, whichever was selected:
the C extension's classes are imported directly. Where the extension is missing the C half is
skipped, saying so, unless ``AIOANCILLARY_REQUIRE_EXTENSIONS=1`` (CI), where a missing
extension fails instead: a C half must never be skipped silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from aioancillary._core import _framing, _message
from aioancillary._kernel import _syscalls

from . import is_open

speedups: ModuleType | None
try:
    from aioancillary._kernel import _speedups as speedups
except ImportError:
    speedups = None

REQUIRED = os.environ.get("AIOANCILLARY_REQUIRE_EXTENSIONS", "") not in ("", "0")
NO_EXTENSION = "the C extension is not built (pip install -e . with a C compiler)"


def require_extension() -> ModuleType:
    """The extension module; skip the test (fail under REQUIRED) where it is missing."""
    if speedups is None:
        if REQUIRED:
            pytest.fail(f"AIOANCILLARY_REQUIRE_EXTENSIONS is set but {NO_EXTENSION}")
        pytest.skip(NO_EXTENSION)
    return speedups


def fd_table() -> set[int]:
    """The fds open in this process now (without the listing's own)."""
    return {int(name) for name in os.listdir("/proc/self/fd") if is_open(int(name))}


def call_failing(count: int, function: Any, *args: Any) -> Any:
    """``function(*args)`` with every memory allocation after the first ``count`` failing
    (``_testcapi``'s allocator hooks; the test is skipped where that module is missing)."""
    testcapi = pytest.importorskip("_testcapi")
    testcapi.set_nomemory(count, 0)
    try:
        return function(*args)
    finally:
        testcapi.remove_mem_hooks()


def _c_read_decoder() -> type[_framing.ReadDecoder]:
    module = require_extension()

    class CReadDecoder(_framing.ReadDecoder):
        __slots__ = ()
        feed_reads = module.messages_of

    return CReadDecoder


@pytest.fixture(params=["py", "c"])
def both_decoders(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the requesting module's test with its ``FrameDecoder``/``ReadDecoder`` names bound
    to the Python classes, then to the C ones."""
    if request.param == "c":
        module = require_extension()
        monkeypatch.setitem(request.module.__dict__, "FrameDecoder", module.FrameDecoder)
        if "ReadDecoder" in request.module.__dict__:
            monkeypatch.setitem(request.module.__dict__, "ReadDecoder", _c_read_decoder())
    return str(request.param)


def use_receive_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Make transports created from now on read through ``path`` ("python" or "C"), whichever
    path this process selected; ``monkeypatch`` puts the selection back afterwards (the C half
    is skipped, or fails under REQUIRED, where the extension is missing)."""
    from aioancillary._kernel import _accel  # noqa: PLC0415 (the selection point itself)

    if path == "C":
        module = require_extension()
        chosen = (module.Receiver, module.FrameDecoder, _c_read_decoder())
    else:
        chosen = (_syscalls.Receiver, _framing.FrameDecoder, _framing.ReadDecoder)
    for name, value in zip(("Receiver", "FrameDecoder", "ReadDecoder"), chosen, strict=True):
        monkeypatch.setattr(_accel, name, value)


def receivers() -> Iterator[Any]:
    """``pytest.param`` of each Receiver class (the C one skipped where missing)."""
    yield pytest.param(_syscalls.Receiver, id="py")
    marks = [] if speedups is not None or REQUIRED else [pytest.mark.skip(reason=NO_EXTENSION)]
    yield pytest.param(getattr(speedups, "Receiver", None), id="c", marks=marks)


#: The pure-Python messages_of, for comparisons.
py_messages_of = _message.messages_of
