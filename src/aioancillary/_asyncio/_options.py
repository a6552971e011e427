"""What the client and server entry points share: checking where to connect or listen, and
the options every connection they make gets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from .._kernel._unix import PathArg
from ._connection import DEFAULT_MAX_QUEUED_BYTES, AncillaryConnection
from ._protocol import AncillaryProtocol
from ._transport import AncillaryTransport, OnClosed

__all__ = ["ConnectionOptions", "closed_on_error", "path_or_sock"]


def path_or_sock(path: PathArg | None, sock: socket.socket | None) -> str | bytes | None:
    """Check that exactly one of ``path`` and ``sock`` was given; return ``path`` as a string.

    Raises:
        ValueError: both or neither.
    """
    if (path is None) == (sock is None):
        raise ValueError("give exactly one of path= or sock=")
    return None if path is None else os.fspath(path)


@contextlib.contextmanager
def closed_on_error(sock: socket.socket) -> Iterator[None]:
    """Close ``sock`` if the block raises: it is the block's to hand over, or nobody's."""
    try:
        yield
    except BaseException:
        sock.close()  # unread fds the peer may have sent are closed by the kernel with it
        raise


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """The options an entry point gives every connection it makes (see
    [`open_unix_connection`][aioancillary.open_unix_connection] for each)."""

    framed: bool | None
    max_message_size: int
    max_fds_per_send: int | None
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    max_queued_fds: int | None = None

    def connection(
        self, sock: socket.socket, on_closed: OnClosed | None = None
    ) -> AncillaryConnection:
        """An [`AncillaryConnection`][aioancillary.AncillaryConnection] owning ``sock``."""
        return AncillaryConnection(
            sock,
            framed=self.framed,
            max_message_size=self.max_message_size,
            max_queued_bytes=self.max_queued_bytes,
            max_queued_fds=self.max_queued_fds,
            max_fds_per_send=self.max_fds_per_send,
            on_closed=on_closed,
        )

    def transport(
        self,
        sock: socket.socket,
        protocol: AncillaryProtocol,
        on_closed: OnClosed | None = None,
    ) -> AncillaryTransport:
        """An [`AncillaryTransport`][aioancillary.AncillaryTransport] owning ``sock``."""
        return AncillaryTransport(
            asyncio.get_running_loop(),
            sock,
            protocol,
            framed=self.framed,
            max_message_size=self.max_message_size,
            max_fds_per_send=self.max_fds_per_send,
            on_closed=on_closed,
        )
