"""The successor's side of a reload handoff: fetch the running generation's fds, then commit.

The running generation is a peer like any other: the fetch has one deadline for all of it
(connect, hello, every ``fds`` message) and a cap on the fds it takes, so a predecessor that
drips messages can neither keep the successor waiting nor fill its fd table. Whatever goes
wrong, every fd received so far is closed before the error is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from .._asyncio._client import open_unix_connection
from .._asyncio._connection import AncillaryConnection
from .._core._errors import (
    AncillaryError,
    ConnectionClosedError,
    HandoffBusyError,
    HandoffError,
    HandoffTimeoutError,
)
from .._core._fd import OwnedFd, close_all
from .._core._message import AncillaryMessage
from .._kernel._unix import Authorize
from ._reload_wire import MAX_MESSAGE, PROTOCOL_VERSION, PeerGone, decode, encode, receive
from ._systemd import NamedFds, check_fdname

__all__ = ["confirm", "connect", "fetch", "watch"]

logger = logging.getLogger("aioancillary")


async def connect(
    path: str, *, authorize: Authorize | None, seconds: float, deadline: float
) -> AncillaryConnection:
    """Connect to the running generation at ``path`` by ``deadline`` (loop time; ``seconds``
    from the start, for messages).

    Raises:
        FileNotFoundError, ConnectionRefusedError: nobody serves there.
        HandoffTimeoutError: the connection was not made in time.
        PeerRejectedError: ``authorize`` refused the running generation.
    """
    try:
        async with asyncio.timeout_at(deadline):
            return await open_unix_connection(
                path, authorize=authorize, max_message_size=MAX_MESSAGE
            )
    except TimeoutError:
        raise HandoffTimeoutError(
            f"connecting to the running generation at {path!r} took over {seconds} s "
            "(its backlog is full: is it stuck?); nothing was taken"
        ) from None


async def fetch(
    conn: AncillaryConnection, *, seconds: float, deadline: float, max_fds: int
) -> NamedFds:
    """Say hello and take the named fds, all by ``deadline`` (loop time, ``seconds`` from the
    start), ``max_fds`` at most.

    Raises:
        HandoffBusyError: the running generation refused the upgrade for now.
        HandoffTimeoutError: the fds did not all arrive by the deadline.
        HandoffError: it closed the connection, broke the protocol or sent too many fds.
    """
    items: list[tuple[str, OwnedFd]] = []
    try:
        async with asyncio.timeout_at(deadline):
            await conn.send(encode("hello", version=PROTOCOL_VERSION, pid=os.getpid()))
            last = False
            while not last:
                with await conn.recv() as msg:  # closes whatever _take does not take
                    last = _take(msg, items, max_fds)
    except TimeoutError:
        close_all(fd for _, fd in items)
        raise HandoffTimeoutError(
            f"the running generation did not hand its fds over within {seconds} s (it is "
            "stuck, or it keeps sending without end); nothing was taken"
        ) from None
    except ConnectionClosedError as exc:
        close_all(fd for _, fd in items)
        raise HandoffError(
            "the running generation closed the handoff connection before handing its fds over "
            "(its authorize callback refused this process, or it exited); nothing was taken"
        ) from exc
    except BaseException:
        close_all(fd for _, fd in items)  # a failed handoff leaves nothing open here
        raise
    return NamedFds(items, "predecessor")


def _take(msg: AncillaryMessage, items: list[tuple[str, OwnedFd]], max_fds: int) -> bool:
    """Move the fds of one ``fds`` message into ``items``; True when it was the last."""
    reply = decode(msg, ("fds", "busy"))
    if reply["op"] == "busy":
        raise HandoffBusyError(
            f"the running generation (pid {reply.get('pid')}) refused the upgrade: "
            f"{reply.get('reason')}. Nothing was taken; retry later"
        )
    names = reply.get("names")
    if (
        not isinstance(names, list)
        or len(names) != len(msg.fds)
        or not all(isinstance(name, str) for name in names)
    ):
        raise HandoffError(
            f"handoff protocol error: {len(msg.fds)} fd(s) arrived with names {names!r}; "
            "every fd needs exactly one name"
        )
    if len(items) + len(names) > max_fds:
        raise HandoffError(
            f"the running generation sent more than max_fds={max_fds} fds; nothing was taken "
            "(raise max_fds= of start_generation if it really offers that many)"
        )
    for name in names:
        try:
            check_fdname(name)
        except ValueError as exc:
            raise HandoffError(f"handoff protocol error: {exc}") from None
    items.extend(zip(names, msg.take_fds(), strict=True))
    return reply.get("last") is True


async def confirm(conn: AncillaryConnection, seconds: float) -> None:
    """Tell the predecessor this generation is ready; wait for ``released``.

    Raises:
        HandoffError: the predecessor answered ``abort``: it keeps serving.
        HandoffTimeoutError: no answer within ``seconds``.
    """
    # A send to a predecessor that already closed fails, but its last message (an
    # "abort") is still delivered: read before concluding anything.
    with contextlib.suppress(ConnectionClosedError):
        await conn.send(encode("ready"))
    try:
        msg = await receive(conn, seconds, "waiting for the predecessor to release")
    except PeerGone:
        # End of stream without an answer: the predecessor process is gone, and with it
        # its copies of the fds. This generation holds the only ones: it serves.
        logger.warning("the predecessor exited before confirming; this generation serves")
        return
    with msg:
        reply = decode(msg, ("released", "abort"))
    if reply["op"] == "abort":
        raise HandoffError(
            f"the running generation gave up this handoff ({reply.get('reason')}) and "
            "keeps serving: close the sockets taken from it and exit"
        )


async def watch(conn: AncillaryConnection, gone: asyncio.Event) -> None:
    """Set ``gone`` when the predecessor's end closes (it keeps it open while it drains)."""
    try:
        async for msg in conn:
            msg.close()  # nothing is expected after "released"
    except (AncillaryError, OSError) as exc:
        logger.debug("handoff connection to the predecessor ended: %s", exc)
    finally:
        conn.close()
        gone.set()
