"""Connecting a non-blocking Unix socket from a coroutine."""

from __future__ import annotations

import asyncio
import errno
import socket

from .._kernel._unix import named_error

__all__ = ["connect"]


async def connect(sock: socket.socket, path: str | bytes) -> None:
    """Connect the non-blocking ``sock`` to ``path``.

    Not ``loop.sock_connect``: a non-blocking AF_UNIX ``connect()`` fails with EAGAIN when the
    listener's backlog is full, with nothing in progress, and the socket polls writable, so
    ``sock_connect`` would report a connection that does not exist. Nothing signals room in
    the backlog either: retry with a capped backoff (wrap in ``asyncio.timeout`` to bound it).

    Raises:
        OSError: the connection failed; the message names the path.
    """
    sock.setblocking(False)
    delay = 0.001
    while True:
        try:
            sock.connect(path)
        except (BlockingIOError, InterruptedError):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
        except OSError as exc:
            if exc.errno != errno.EISCONN:  # a kernel that did connect asynchronously
                raise named_error(exc, path) from None
            return
        else:
            return
