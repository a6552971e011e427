"""A received message: its bytes and the fds that came with it, owned."""

from __future__ import annotations

import os
import warnings
from typing import Any, Self

from ._fd import OwnedFd, close_all, close_raw

__all__ = ["AncillaryMessage", "messages_of", "new_message", "take_raw_fds"]

_new = object.__new__
_close = os.close
_NO_FDS: tuple[OwnedFd, ...] = ()


class AncillaryMessage:
    """One received message: ``data`` and the fds that came with it.

    The message owns its fds until they are taken out with
    [`take_fds`][aioancillary.AncillaryMessage.take_fds]. Leaving a ``with`` block or calling
    [`close`][aioancillary.AncillaryMessage.close] closes every fd not taken, so a handler that
    raises or simply ignores the fds cannot leak them; a message dropped without either closes them
    when it is garbage collected, with a `ResourceWarning`::

        async for msg in conn:
            with msg:
                (client,) = msg.take_fds()       # ownership moves to the caller
                sock = client.into_socket()
            # any fd not taken is closed here

    Attributes:
        data: The message's bytes.
        fd_count: How many fds the message still holds (read-only; counting them this way
            builds no [`OwnedFd`][aioancillary.OwnedFd] objects).
        discarded_fds: How many fds of the message the receiver closed on arrival because they
            exceeded the ``maxfds`` asked for (0 normally).
    """

    # The fds are held as raw numbers until the application looks at them (``fds``,
    # ``take_fds``): a receiver that only closes them (``with msg:``) never pays for an
    # OwnedFd per fd, and closes them in bulk. ``_raw`` and ``_owned`` are never both set;
    # ``fd_count`` counts whichever holds them (a slot: queues read it for every message).
    __slots__ = ("_owned", "_raw", "data", "discarded_fds", "fd_count")

    def __init__(self, data: bytes, fds: tuple[OwnedFd, ...] = (), discarded_fds: int = 0) -> None:
        """Build a message owning ``fds`` (tests and custom decoders; receivers make them)."""
        self.data = data
        self._raw: list[int] | None = None
        self._owned = fds
        self.fd_count = len(fds)
        self.discarded_fds = discarded_fds

    @property
    def fds(self) -> tuple[OwnedFd, ...]:
        """The owned fds still held by the message (empty once taken or closed)."""
        raw = self._raw
        if raw:
            self._raw = None
            self._owned = tuple(map(OwnedFd, raw))
        return self._owned

    def take_fds(self) -> tuple[OwnedFd, ...]:
        """Take every fd out of the message; the caller now owns (and must close) them."""
        fds = self.fds
        self._owned = _NO_FDS
        self.fd_count = 0
        return fds

    def take_fd(self) -> OwnedFd:
        """Take the message's single fd.

        Raises:
            ValueError: the message holds no fd or more than one (nothing is taken then).
        """
        count = self.fd_count
        if count != 1:
            raise ValueError(
                f"take_fd() expects exactly 1 fd but the message holds {count}; "
                "use take_fds() for several"
            )
        (fd,) = self.take_fds()
        return fd

    def __enter__(self) -> Self:
        return self

    def close(self, *_exc_info: object) -> None:
        """Close every fd still held by the message (also what leaving ``with`` does)."""
        # One body for both: this runs once per received message on the hot path.
        if not self.fd_count:
            return
        self.fd_count = 0
        raw = self._raw
        if raw:
            self._raw = None
            if len(raw) == 1:
                try:  # noqa: SIM105 - contextlib.suppress costs more than the close itself
                    _close(raw[0])
                except OSError:
                    pass
            else:
                close_raw(raw)
        owned = self._owned
        if owned:
            self._owned = _NO_FDS
            close_all(owned)

    __exit__ = close

    def __repr__(self) -> str:
        shown = self.data if len(self.data) <= 32 else self.data[:32] + b"..."
        return f"<AncillaryMessage data={shown!r} ({len(self.data)} bytes) fds={self.fd_count}>"

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if not self.fd_count:
            return
        raw = self._raw
        if raw:
            # Unlike an OwnedFd, a raw number has no finaliser of its own. Closed before
            # warning: with warnings turned into errors, warn() raises.
            self._raw = None
            close_raw(raw)
            _warn(
                f"unclosed AncillaryMessage holding {len(raw)} fd(s): close it, use 'with', "
                "or take its fds",
                ResourceWarning,
                source=self,
            )


def new_message(data: bytes, raw: list[int] | None) -> AncillaryMessage:
    """A message owning the raw fds ``raw`` (or none), built without ``__init__``.

    For receivers: this runs once per message on the receive path.
    """
    msg = _new(AncillaryMessage)
    msg.data = data
    msg._raw = raw
    msg.fd_count = len(raw) if raw else 0
    msg._owned = _NO_FDS
    msg.discarded_fds = 0
    return msg


def messages_of(reads: list[tuple[bytes, list[int] | None]]) -> list[AncillaryMessage]:
    """One message per ``(data, raw fds or None)`` read: `new_message` for a batch."""
    new = _new
    out: list[AncillaryMessage] = []
    append = out.append
    for data, raw in reads:
        msg = new(AncillaryMessage)
        msg.data = data
        msg._raw = raw
        msg.fd_count = len(raw) if raw else 0
        msg._owned = _NO_FDS
        msg.discarded_fds = 0
        append(msg)
    return out


def take_raw_fds(msg: AncillaryMessage) -> list[int]:
    """Take every fd out of ``msg`` as plain numbers; the caller must close each one.

    For the package's own consumers that turn fds straight into other objects (the hand-off worker
    makes sockets of them): no [`OwnedFd`][aioancillary.OwnedFd] is built only to be detached.
    """
    raw = msg._raw
    if raw:
        msg._raw = None
    else:
        owned = msg._owned
        msg._owned = _NO_FDS
        raw = [fd.detach() for fd in owned]
    msg.fd_count = 0
    return raw
