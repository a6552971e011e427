"""Which implementation of the hot paths this process uses: C or pure Python.

The one selection point. The optional C extension ``_speedups`` (built at install where a
compiler is present) replaces, with the same interface, results, errors and fds closed:

* ``_outbox.Outbox`` (the send queue, its rules and counters), whose C version also sends: a
  transport whose outbox is the C one (``WriteSide._csend``) gives ``write_fds`` to its
  ``try_write`` (the checks of the common shapes, then the direct ``sendmsg`` or the message
  queued with copies of its fds, as ``WriteSide._queue`` with ``_syscalls.duplicates``) and
  runs ``WriteSide._send_queued``'s loop in its ``flush``,
* ``_syscalls.Receiver`` (the read loop and the control-message
  rules),
* ``_framing.FrameDecoder`` (framed streams),
* ``_message.messages_of`` (``ReadDecoder``'s batch path).

The pure-Python path is used when the extension is absent (no compiler at install, another
interpreter) or when ``AIOANCILLARY_NO_EXTENSIONS`` is set to anything but ``""``/``"0"`` in
the environment before the package is imported. ``PATH`` names the one in use.
"""

from __future__ import annotations

import os
from types import ModuleType

from .._core import _framing, _message, _outbox
from . import _syscalls

__all__ = [
    "EXTENSION",
    "PATH",
    "FrameDecoder",
    "Outbox",
    "ReadDecoder",
    "Receiver",
    "messages_of",
    "use_extension",
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
_LOADED = EXTENSION

Receiver: type[_syscalls.Receiver]
FrameDecoder: type[_framing.FrameDecoder]
ReadDecoder: type[_framing.ReadDecoder]
Outbox: type[_outbox.Outbox]


def _c_read_decoder(module: ModuleType) -> type[_framing.ReadDecoder]:
    class ReadDecoder(_framing.ReadDecoder):
        """``ReadDecoder`` whose batch path builds the messages in C."""

        __slots__ = ()
        # A builtin function is not a descriptor: called as messages_of(reads), no self.
        feed_reads = module.messages_of

    return ReadDecoder


def _bind(module: ModuleType | None) -> None:
    global Outbox
    global Receiver, FrameDecoder, ReadDecoder, messages_of
    if module is None:
        Outbox = _outbox.Outbox
        Receiver = _syscalls.Receiver
        FrameDecoder = _framing.FrameDecoder
        ReadDecoder = _framing.ReadDecoder
        messages_of = _message.messages_of
    else:
        Outbox = module.Outbox
        Receiver = module.Receiver
        FrameDecoder = module.FrameDecoder
        ReadDecoder = _c_read_decoder(module)
        messages_of = module.messages_of


def use_extension(enabled: bool) -> None:
    """Switch this process's hot path (for the benchmarks, which compare both in one run).

    Transports created afterwards use the new path; existing ones keep theirs.

    Raises:
        RuntimeError: the extension was asked for and is not loaded.
    """
    global EXTENSION, PATH
    if enabled and _LOADED is None:
        raise RuntimeError(f"the C extension is not in use: {PATH}")
    EXTENSION = _LOADED if enabled else None
    PATH = "C extension" if enabled else "pure Python, switched with use_extension(False)"
    _bind(EXTENSION)


messages_of = _message.messages_of
_bind(EXTENSION)
