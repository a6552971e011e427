"""The fd holder protocol, without I/O: message encoding and the client's reading of answers.

Every message is one framed aioancillary message (``docs/reference/protocol.md``) holding one
JSON object with an ``"op"``; fds ride with ``store`` requests and ``fds`` answers only. The
client opens with ``hello`` (the versions it speaks), the holder answers with the version
chosen; then each request gets exactly one answer, in order::

    client                                            holder
    {"op":"hello","versions":[1]}          ------->   (admitted by SO_PEERCRED at accept)
                                           <-------   {"op":"hello","version":1,"pid":P,...}
    {"op":"store","name":N,"timeout":T} + fds ---->
                                           <-------   {"op":"ok"}
    {"op":"retrieve","name":N,"delete":D}  ------->
                                           <-------   {"op":"fds","name":N,"count":K} + K fds
    {"op":"ack"}  (after a delete=True retrieve: the holder drops the entry now)
    {"op":"list"}                          ------->
                                           <-------   {"op":"entries","entries":[...]}
    {"op":"delete","name":N}               ------->
                                           <-------   {"op":"ok"}

Any request may instead be answered ``{"op":"error","code":C,"message":M}``; the codes are in
``ERROR_CODES``. The same functions serve the asyncio and the blocking client, which
differ only in how bytes move.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .._core._errors import (
    FdHolderError,
    FdHolderExistsError,
    FdHolderFullError,
    FdHolderNotFoundError,
    FdHolderRefusedError,
)
from .._core._fd import OwnedFd
from .._core._message import AncillaryMessage

__all__ = [
    "ERROR_CODES",
    "MAX_MESSAGE",
    "PROTOCOL_VERSION",
    "FdHolderEntry",
    "HolderInfo",
    "decode",
    "encode",
    "error_of",
    "read_entries",
    "read_fds",
    "read_hello",
    "read_ok",
]

#: The protocol version this library speaks (the holder picks the highest both speak).
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
#: Largest message either side sends or accepts: a listing of the most entries a holder may
#: hold (10000 names of up to 255 characters) fits with room to spare.
MAX_MESSAGE = 16 << 20

#: Error codes of ``{"op":"error"}`` answers.
ERROR_CODES = {
    "version": "no protocol version in common",
    "request": "a malformed request (not JSON, unknown op, a field of the wrong type)",
    "name": "the name breaks the naming rule",
    "fds": "a request with the wrong fds (a store without any, fds on any other request)",
    "exists": "an entry of that name is already stored",
    "not-found": "no entry of that name",
    "full": "the store is at its bound (entries or fds)",
    "busy": "the entry is being retrieved with delete=True by another client, or a takeover "
    "is in progress",
    "denied": "this client may not do that (a takeover by another user)",
    "moved": "the holder handed its store to a successor before answering: connect again "
    "(the request was not carried out)",
    "stopping": "the holder is stopping (SIGTERM): its store is dropped",
}

_ERROR_TYPES: dict[str, type[FdHolderError]] = {
    "not-found": FdHolderNotFoundError,
    "exists": FdHolderExistsError,
    "full": FdHolderFullError,
    "denied": FdHolderRefusedError,
}


@dataclass(frozen=True, slots=True)
class FdHolderEntry:
    """One entry of the holder, as [`FdHolderClient.list`][aioancillary.FdHolderClient.list]
    reports it.

    Attributes:
        name: The entry's name.
        fd_count: How many fds it holds.
        expires_in: Seconds until the holder closes it, or ``None`` if it never expires.
    """

    name: str
    fd_count: int
    expires_in: float | None


@dataclass(frozen=True, slots=True)
class HolderInfo:
    """What the holder's ``hello`` says: its pid and bounds, and the version agreed."""

    version: int
    pid: int
    max_entries: int
    max_fds: int


def encode(op: str, **fields: Any) -> bytes:
    """One message: ``{"op": op, **fields}`` as compact JSON."""
    return json.dumps({"op": op, **fields}, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any] | None:
    """The JSON object of a message, or ``None`` if it is not an object with a string op."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("op"), str):
        return None
    return body


def _shown(data: bytes) -> str:
    return repr(data[:120]) + ("..." if len(data) > 120 else "")


def error_of(body: dict[str, Any]) -> FdHolderError:
    """The exception for an ``{"op":"error"}`` answer."""
    code = body.get("code")
    code = code if isinstance(code, str) else "protocol"
    message = body.get("message")
    text = message if isinstance(message, str) else ERROR_CODES.get(code, "no reason given")
    return _ERROR_TYPES.get(code, FdHolderError)(f"the fd holder refused: {text}", code=code)


def _answer(msg: AncillaryMessage, expected: str) -> dict[str, Any]:
    """The body of an answer whose op is ``expected``; errors raised, stray fds closed."""
    body = decode(msg.data)
    if body is None:
        msg.close()
        raise FdHolderError(
            f"fd holder protocol error: expected a JSON answer, got {_shown(msg.data)}; is "
            "this the socket of an aioancillary fd holder?"
        )
    if body["op"] == "error":
        msg.close()  # an error answer carries no fds; any that came are not ours to keep
        raise error_of(body)
    if body["op"] != expected:
        msg.close()
        raise FdHolderError(f"fd holder protocol error: expected {expected!r}, got {body['op']!r}")
    if expected != "fds" and msg.fd_count:
        msg.close()
        raise FdHolderError(f"fd holder protocol error: the {expected!r} answer carried fds")
    return body


def _count(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FdHolderError(f"fd holder protocol error: {key}={value!r} is not a count")
    return value


def read_hello(msg: AncillaryMessage) -> HolderInfo:
    """The holder's answer to ``hello``.

    Raises:
        FdHolderError: a version refusal (code ``version``) or a malformed answer.
    """
    with msg:
        body = _answer(msg, "hello")
    version = body.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise FdHolderError(
            f"the fd holder chose protocol version {version!r}, which this library does not "
            f"speak (it speaks {list(SUPPORTED_VERSIONS)}): upgrade aioancillary",
            code="version",
        )
    return HolderInfo(
        version, _count(body, "pid"), _count(body, "max_entries"), _count(body, "max_fds")
    )


def read_ok(msg: AncillaryMessage) -> None:
    """Check an ``ok`` answer."""
    with msg:
        _answer(msg, "ok")


def read_fds(msg: AncillaryMessage, name: str) -> tuple[tuple[OwnedFd, ...], bool]:
    """The fds of an ``fds`` answer for ``name``, owned by the caller, and whether to ack.

    Raises:
        FdHolderError: an error answer, or fds that do not match the answer (all closed).
    """
    with msg:
        body = _answer(msg, "fds")
        count = body.get("count")
        if body.get("name") != name or count != msg.fd_count or not msg.fd_count:
            raise FdHolderError(
                f"fd holder protocol error: asked for {name!r}, got {msg.fd_count} fd(s) for "
                f"{body.get('name')!r} (count={count!r}); every fd received was closed"
            )
        return msg.take_fds(), body.get("ack") is True


def _entry(item: object) -> FdHolderEntry:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise FdHolderError(f"fd holder protocol error: bad entry {item!r} in a listing")
    expires = item.get("expires_in")
    if expires is not None and (
        isinstance(expires, bool)
        or not isinstance(expires, int | float)
        or not math.isfinite(expires)
    ):
        raise FdHolderError(f"fd holder protocol error: bad expiry in {item!r}")
    return FdHolderEntry(
        item["name"], _count(item, "fds"), None if expires is None else float(expires)
    )


def read_entries(msg: AncillaryMessage) -> list[FdHolderEntry]:
    """The entries of an ``entries`` answer, by name."""
    with msg:
        body = _answer(msg, "entries")
    items = body.get("entries")
    if not isinstance(items, list):
        raise FdHolderError("fd holder protocol error: a listing without an entries list")
    return [_entry(item) for item in items]
