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
* ``_message.messages_of`` (``ReadDecoder``'s batch path),
* ``_accept.accept_burst`` on a listener's ``accept`` (``accept_into``: the same burst and
  classification with ``accept4(SOCK_CLOEXEC | SOCK_NONBLOCK)``, each client as a raw fd for
  the servers, or as its hand-off item, ``(record, fd)``, for the
  [`Acceptor`][aioancillary.Acceptor], the record encoded from the kernel's address without a
  Python address tuple),
* the acceptor's batched hand-off: the ``C`` message of a batch and its fds
  (``client_batch``), the fds closed once sent (``close_item_fds``).

The hand-off functions are ``None`` on the pure-Python path: their callers (above this layer)
then run their own Python code, unchanged.

The pure-Python path is used when the extension is absent (no compiler at install, another
interpreter) or when ``AIOANCILLARY_NO_EXTENSIONS`` is set to anything but ``""``/``"0"`` in
the environment before the package is imported. ``PATH`` names the one in use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .._core import _framing, _message, _outbox
from . import _syscalls
from ._accept import AcceptFailure

__all__ = [
    "EXTENSION",
    "PATH",
    "AcceptInto",
    "FrameDecoder",
    "Outbox",
    "ReadDecoder",
    "Receiver",
    "accept_into",
    "client_batch",
    "close_item_fds",
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

#: ``accept_into(fd, limit, into, prefix)``: see ``_speedups.pyi``.
AcceptInto = Callable[[int, int, list[Any], bytes | None], AcceptFailure | None]

Receiver: type[_syscalls.Receiver]
#: The C accept burst, or ``None``: use ``_accept.accept_burst``.
accept_into: AcceptInto | None = None
#: ``(b"C" + records, fds)`` of a batch of hand-off items in C, or ``None``.
client_batch: Callable[[list[tuple[bytes, int]]], tuple[bytes, list[int]]] | None = None
#: Close the fds of hand-off items in C, or ``None``.
close_item_fds: Callable[[list[tuple[bytes, int]]], None] | None = None
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
    global accept_into, client_batch, close_item_fds
    if module is None:
        Outbox = _outbox.Outbox
        Receiver = _syscalls.Receiver
        FrameDecoder = _framing.FrameDecoder
        ReadDecoder = _framing.ReadDecoder
        messages_of = _message.messages_of
        accept_into = client_batch = close_item_fds = None
    else:
        Outbox = module.Outbox
        Receiver = module.Receiver
        FrameDecoder = module.FrameDecoder
        ReadDecoder = _c_read_decoder(module)
        messages_of = module.messages_of
        accept_into = module.accept_into
        client_batch = module.client_batch
        close_item_fds = module.close_item_fds


def use_extension(enabled: bool) -> None:
    """Switch this process's hot path (for the benchmarks, which compare both in one run).

    Transports created afterwards use the new path; existing ones keep theirs. Accept loops
    and the acceptor's hand-off look the path up at every wake-up: they switch at once.

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
