"""The reload handoff's messages: one JSON object per framed aioancillary message.

Both sides of a handoff (``_reload_offer`` for the running generation, ``_reload_fetch`` for
its successor) build and check their messages here. Fds ride with ``fds`` messages only; any
other message that carries some is a protocol error (its fds are closed with it).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .._asyncio._connection import AncillaryConnection
from .._core._errors import ConnectionClosedError, HandoffError, HandoffTimeoutError
from .._core._message import AncillaryMessage

__all__ = ["MAX_MESSAGE", "PROTOCOL_VERSION", "PeerGone", "decode", "encode", "receive"]

PROTOCOL_VERSION = 1
#: Largest handoff message: 253 names of at most 255 characters fit many times over.
MAX_MESSAGE = 1 << 20


class PeerGone(HandoffError):
    """The peer closed the handoff connection (end of stream)."""


def encode(op: str, **fields: Any) -> bytes:
    """The message ``{"op": op, **fields}``."""
    return json.dumps({"op": op, **fields}, separators=(",", ":")).encode()


def decode(msg: AncillaryMessage, expected: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object of ``msg``, whose ``op`` must be one of ``expected``.

    Raises:
        HandoffError: not a JSON object, another ``op``, or fds on a message other than
            ``fds`` (the caller's ``with msg`` closes them).
    """
    try:
        body = json.loads(msg.data)
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("op") not in expected:
        raise HandoffError(
            f"handoff protocol error: expected one of {expected}, got {msg.data[:80]!r}; the "
            "peer is not an aioancillary generation of a compatible version"
        )
    if msg.fds and body["op"] != "fds":
        raise HandoffError(f"handoff protocol error: a {body['op']!r} message carried fds")
    return body


async def receive(conn: AncillaryConnection, seconds: float, step: str) -> AncillaryMessage:
    """The next message within ``seconds``; ``step`` names the wait in errors.

    Raises:
        HandoffTimeoutError: nothing came in time.
        PeerGone: the peer closed the connection.
    """
    try:
        async with asyncio.timeout(seconds):
            return await conn.recv()  # a cancelled recv() loses no message
    except TimeoutError:
        raise HandoffTimeoutError(f"no answer within {seconds} s while {step}") from None
    except ConnectionClosedError as exc:
        raise PeerGone(f"the peer closed the handoff connection while {step}") from exc
