"""The acceptor's listening sockets: what it owns, announces and drops (no loop here).

Each listener gets a wire id (never reused, so workers keep what they were told), a record
packer for its clients' addresses and its announcement for the workers (``_wire``). A listener
whose ``accept()`` fails for good is dropped: its socket closed, its name kept for
``AcceptorStats.failed_listeners``, one error logged.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

from . import _wire as wire

__all__ = ["Listener", "Listeners"]

logger = logging.getLogger("aioancillary")


class Listener:
    """One listening socket of the acceptor, with what its clients' hand-off needs."""

    __slots__ = ("accept", "announcement", "fd", "index", "name", "prefix", "record", "sock")

    def __init__(
        self, sock: socket.socket, index: int, name: str, metadata: Mapping[str, Any]
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.index = index
        self.name = name
        self.record = wire.record_packer(index, sock.family)
        # The first bytes of each client's record (the C accept burst builds the rest).
        self.prefix = wire.record_prefix(index)
        self.announcement = wire.listener_message(index, sock, name, metadata)
        # socket._accept() returns (fd, address): no socket object is built for a client
        # that only passes through.
        self.accept = sock._accept  # type: ignore[attr-defined]


class Listeners:
    """The acceptor's listening sockets (it owns them), and the names of those dropped."""

    __slots__ = ("_next_id", "failed", "items")

    def __init__(self) -> None:
        self.items: list[Listener] = []
        self._next_id = 0  # wire ids are never reused: workers keep what they were told
        self.failed: list[str] = []

    def add(self, sock: socket.socket, name: str | None, metadata: Mapping[str, Any]) -> Listener:
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ValueError(f"{sock!r} is not a listening stream socket: call listen() first")
        listener = Listener(sock, self._next_id, name or address_name(sock), metadata)
        self._next_id += 1
        sock.setblocking(False)
        self.items.append(listener)
        return listener

    def drop(self, listener: Listener, exc: OSError) -> None:
        """Close a listener whose ``accept()`` failed for good, and say so (once)."""
        if listener not in self.items:
            return
        self.items.remove(listener)
        listener.sock.close()
        self.failed.append(listener.name)
        logger.error(
            "accept() on listener %r failed (%s): it is no longer served (its socket is "
            "closed); %d other listener(s) still served. Add a new listening socket to serve "
            "that address again",
            listener.name,
            exc,
            len(self.items),
        )

    def close(self) -> None:
        items, self.items = self.items, []
        for listener in items:
            listener.sock.close()

    def announcements(self) -> list[bytes]:
        return [listener.announcement for listener in self.items]


def address_name(sock: socket.socket) -> str:
    addr = sock.getsockname()
    if sock.family == socket.AF_INET:
        return f"{addr[0]}:{addr[1]}"
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    return os.fsdecode(addr) if addr else "unix"
