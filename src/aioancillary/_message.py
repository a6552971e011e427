"""A received message: its bytes and the fds that came with it, owned."""

from __future__ import annotations

from typing import Self

from ._fd import OwnedFd, close_all

__all__ = ["AncillaryMessage"]


class AncillaryMessage:
    """One received message: ``data`` and the fds that came with it.

    The message owns its fds until they are taken out with :meth:`take_fds`. Leaving a ``with``
    block or calling :meth:`close` closes every fd not taken, so a handler that raises or simply
    ignores the fds cannot leak them::

        async for msg in conn:
            with msg:
                (client,) = msg.take_fds()       # ownership moves to the caller
                sock = client.into_socket()
            # any fd not taken is closed here

    Attributes:
        data: The message's bytes.
        fds: The owned fds still held by the message (empty once taken or closed).
        discarded_fds: How many fds of the message the receiver closed on arrival because they
            exceeded the ``maxfds`` asked for (0 normally).
    """

    __slots__ = ("data", "discarded_fds", "fds")

    def __init__(self, data: bytes, fds: tuple[OwnedFd, ...] = (), discarded_fds: int = 0) -> None:
        self.data = data
        self.fds = fds
        self.discarded_fds = discarded_fds

    def take_fds(self) -> tuple[OwnedFd, ...]:
        """Take every fd out of the message; the caller now owns (and must close) them."""
        fds = self.fds
        self.fds = ()
        return fds

    def take_fd(self) -> OwnedFd:
        """Take the message's single fd.

        Raises:
            ValueError: the message holds no fd or more than one (nothing is taken then).
        """
        if len(self.fds) != 1:
            raise ValueError(
                f"take_fd() expects exactly 1 fd but the message holds {len(self.fds)}; "
                "use take_fds() for several"
            )
        (fd,) = self.take_fds()
        return fd

    def close(self) -> None:
        """Close every fd still held by the message."""
        fds = self.fds
        if fds:
            self.fds = ()
            close_all(fds)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        fds = self.fds  # close() inlined: this runs once per message on the receive hot path
        if fds:
            self.fds = ()
            close_all(fds)

    def __repr__(self) -> str:
        shown = self.data if len(self.data) <= 32 else self.data[:32] + b"..."
        return f"<AncillaryMessage data={shown!r} ({len(self.data)} bytes) fds={len(self.fds)}>"
