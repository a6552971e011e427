"""Which implementation of the receive hot path this process uses: C or pure Python.

The one selection point. The optional C extension ``_speedups`` (built at install where a
compiler is present) replaces, with the same interface, results, errors and fds closed:

* :class:`~aioancillary._kernel._syscalls.Receiver` (the read loop and the control-message
  rules),
* :class:`~aioancillary._core._framing.FrameDecoder` (framed streams),
* :func:`~aioancillary._core._message.messages_of` (:class:`ReadDecoder`'s batch path).

The pure-Python path is used when the extension is absent (no compiler at install, another
interpreter) or when ``AIOANCILLARY_NO_EXTENSIONS`` is set to anything but ``""``/``"0"`` in
the environment before the package is imported. :data:`PATH` names the one in use.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

from .._core import _framing, _message
from . import _syscalls

__all__ = [
    "EXTENSION",
    "PATH",
    "FrameDecoder",
    "ReadDecoder",
    "Receiver",
    "messages_of",
]


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("AIOANCILLARY_NO_EXTENSIONS", "") not in ("", "0"):
        return None, "pure Python, AIOANCILLARY_NO_EXTENSIONS is set"
    try:
        from . import _speedups  # noqa: PLC0415
    except ImportError as exc:
        return None, f"pure Python, the C extension is not available ({exc})"
    return _speedups, "C extension"


#: The extension module in use (``None``: pure Python), and the path in words (with why).
EXTENSION, PATH = _load()

if TYPE_CHECKING or EXTENSION is None:
    Receiver: type[_syscalls.Receiver] = _syscalls.Receiver
    FrameDecoder: type[_framing.FrameDecoder] = _framing.FrameDecoder
    messages_of = _message.messages_of
    ReadDecoder: type[_framing.ReadDecoder] = _framing.ReadDecoder
else:
    Receiver = EXTENSION.Receiver
    FrameDecoder = EXTENSION.FrameDecoder
    messages_of = EXTENSION.messages_of

    class ReadDecoder(_framing.ReadDecoder):
        """:class:`ReadDecoder` whose batch path builds the messages in C."""

        __slots__ = ()
        # A builtin function is not a descriptor: called as messages_of(reads), no self.
        feed_reads = EXTENSION.messages_of
