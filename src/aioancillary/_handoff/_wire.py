"""The hand-off wire format between an [`Acceptor`][aioancillary.Acceptor] and its workers
(sans-I/O).

Every message is one framed aioancillary message (see ``docs/reference/protocol.md``) whose
first byte says what it is. Acceptor to worker::

    b"W" + JSON {"v": 1}                      welcome: the first message, protocol version
    b"L" + JSON {"id", "family", "type",      a listener: sent once per worker, before any
                 "proto", "name", "metadata"}  client accepted on it
    b"C" + records                           clients, one fd each (their sockets), in order;
                                              a record: uint16 listener id, uint8 address
                                              length, the address

Worker to acceptor::

    b"D" + uint32 count                       ``count`` more clients are finished

Integers are big-endian. The address of a client is packed by the listener's family, which the
worker learned from the ``L`` message: ``AF_INET`` 4 address bytes + port (uint16);
``AF_INET6`` 16 address bytes + port (uint16) + flowinfo (uint32) + scope id (uint32);
``AF_UNIX`` a tag byte (``s`` for a path Python reports as ``str``, ``b`` for ``bytes``, e.g. a
Linux abstract name) and the raw bytes of the path (empty for an unnamed client).

The acceptor sends each worker the clients of one wake-up as one ``C`` message (one frame,
one ``sendmsg``, at most ``SCM_MAX_FD`` clients): per client it only builds a record (the
listener's precomputed prefix and the packed address); the worker decodes an address only
when it is asked for.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from .._core._errors import ProtocolError

__all__ = [
    "CLIENT",
    "DONE",
    "LISTENER",
    "VERSION",
    "WELCOME",
    "AddressPacker",
    "ListenerInfo",
    "client_message",
    "client_records",
    "decode_address",
    "done_message",
    "listener_message",
    "packer_for",
    "parse_done",
    "parse_listener",
    "parse_welcome",
    "record_packer",
    "record_prefix",
    "welcome_message",
]

VERSION = 1
WELCOME = ord("W")
LISTENER = ord("L")
CLIENT = ord("C")
DONE = ord("D")

#: Most listeners one acceptor can announce (the id is a uint16).
MAX_LISTENERS = 0xFFFF
#: Largest completion count one ``D`` message may carry.
MAX_DONE = 0xFFFFFFFF

_PORT6 = struct.Struct("!HII")
_inet_aton = socket.inet_aton
_inet_ntoa = socket.inet_ntoa
_inet_pton = socket.inet_pton
_inet_ntop = socket.inet_ntop
_AF_INET6 = socket.AF_INET6

#: Packs the address ``accept()`` returned for a listener of one family.
AddressPacker = Callable[[Any], bytes]


def _pack_inet(addr: tuple[str, int]) -> bytes:
    return _inet_aton(addr[0]) + addr[1].to_bytes(2, "big")


def _pack_inet6(addr: tuple[str, int, int, int]) -> bytes:
    return _inet_pton(_AF_INET6, addr[0]) + _PORT6.pack(addr[1], addr[2], addr[3])


def _pack_unix(addr: str | bytes) -> bytes:
    if isinstance(addr, str):
        return b"s" + os.fsencode(addr)
    return b"b" + bytes(addr)


def packer_for(family: int) -> AddressPacker:
    """The address packer for listeners of ``family`` (AF_INET, AF_INET6 or AF_UNIX).

    Raises:
        ValueError: another family.
    """
    if family == socket.AF_INET:
        return _pack_inet
    if family == socket.AF_INET6:
        return _pack_inet6
    if family == socket.AF_UNIX:
        return _pack_unix
    raise ValueError(
        f"listeners of family {family!r} are not supported: use AF_INET, AF_INET6 or AF_UNIX"
    )


def decode_address(family: int, raw: bytes) -> Any:
    """The address packed by `packer_for` ``(family)``, as ``accept()`` returned it.

    Raises:
        ProtocolError: ``raw`` is not a packed address of that family.
    """
    if family == socket.AF_INET and len(raw) == 6:
        return (_inet_ntoa(raw[:4]), int.from_bytes(raw[4:], "big"))
    if family == socket.AF_INET6 and len(raw) == 26:
        port, flowinfo, scope_id = _PORT6.unpack(raw[16:])
        return (_inet_ntop(_AF_INET6, raw[:16]), port, flowinfo, scope_id)
    if family == socket.AF_UNIX and raw[:1] == b"s":
        return os.fsdecode(raw[1:])
    if family == socket.AF_UNIX and raw[:1] == b"b":
        return raw[1:]
    raise ProtocolError(f"malformed client address for family {family!r}: {raw!r}")


def welcome_message() -> bytes:
    """The acceptor's first message to a worker."""
    return b"W" + json.dumps({"v": VERSION}).encode()


def parse_welcome(data: bytes) -> None:
    """Check the acceptor's welcome.

    Raises:
        ProtocolError: not a welcome, or another protocol version.
    """
    obj = _json_object(data, WELCOME, "welcome")
    if obj.get("v") != VERSION:
        raise ProtocolError(
            f"the acceptor speaks hand-off protocol version {obj.get('v')!r}, this worker "
            f"{VERSION}: run the same aioancillary version on both sides"
        )


class ListenerInfo(NamedTuple):
    """What a worker knows of one of the acceptor's listeners."""

    id: int
    family: int
    type: int
    proto: int
    name: str
    metadata: dict[str, Any]


def listener_message(
    index: int, sock: socket.socket, name: str, metadata: Mapping[str, Any]
) -> bytes:
    """Announce the listener ``sock`` to a worker, under the id ``index``.

    Raises:
        ValueError: ``index`` out of range, or ``metadata`` cannot be encoded as JSON.
        TypeError: ``metadata`` holds values JSON cannot encode.
    """
    if not 0 <= index <= MAX_LISTENERS:
        raise ValueError(f"listener id {index} out of range 0..{MAX_LISTENERS}")
    doc = {
        "id": index,
        "family": int(sock.family),
        "type": int(sock.type),
        "proto": sock.proto,
        "name": name,
        "metadata": dict(metadata),
    }
    return b"L" + json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def parse_listener(data: bytes) -> ListenerInfo:
    """Decode a listener announcement.

    Raises:
        ProtocolError: malformed.
    """
    obj = _json_object(data, LISTENER, "listener announcement")
    ints = [obj.get(k) for k in ("id", "family", "type", "proto")]
    name, metadata = obj.get("name"), obj.get("metadata")
    numbers = [v for v in ints if type(v) is int]
    if (
        len(numbers) != len(ints)
        or not 0 <= numbers[0] <= MAX_LISTENERS
        or not isinstance(name, str)
        or not isinstance(metadata, dict)
    ):
        raise ProtocolError(f"malformed listener announcement: {data[:200]!r}")
    index, family, kind, proto = numbers
    if proto == 0 and kind == socket.SOCK_STREAM and family in _INET:
        # 0 asks the kernel for the family's default protocol, which for an IP stream socket
        # is TCP (ip(7)); saying so lets asyncio set TCP_NODELAY on the worker's transports
        # (it checks proto == IPPROTO_TCP), as it does on the sockets it accepts itself. A
        # listener made by socket.create_server() reports proto 0.
        proto = socket.IPPROTO_TCP
    return ListenerInfo(index, family, kind, proto, name, metadata)


_INET = frozenset({socket.AF_INET, socket.AF_INET6})


def record_prefix(index: int) -> bytes:
    """The listener id that starts the record of every client of listener ``index``.

    Raises:
        ValueError: ``index`` out of range.
    """
    if not 0 <= index <= MAX_LISTENERS:
        raise ValueError(f"listener id {index} out of range 0..{MAX_LISTENERS}")
    return index.to_bytes(2, "big")


def record_packer(index: int, family: int) -> Callable[[Any], bytes]:
    """The function that turns an address ``accept()`` returned on listener ``index`` (of
    ``family``) into that client's record.

    Raises:
        ValueError: ``index`` out of range, or another family.
    """
    listener = record_prefix(index)
    pack = packer_for(family)
    if family == socket.AF_INET:
        prefix = listener + b"\x06"  # the length of every packed IPv4 address
        aton = _inet_aton
        return lambda addr: prefix + aton(addr[0]) + addr[1].to_bytes(2, "big")
    if family == socket.AF_INET6:
        prefix6 = listener + b"\x1a"
        return lambda addr: prefix6 + pack(addr)

    def unix_record(addr: Any) -> bytes:
        packed = pack(addr)
        return listener + len(packed).to_bytes(1, "big") + packed

    return unix_record


def client_message(records: Iterable[bytes]) -> bytes:
    """The ``C`` message carrying ``records`` (their fds go with it, in the same order)."""
    return b"C" + b"".join(records)


def client_records(data: bytes) -> list[tuple[int, bytes]]:
    """The ``(listener id, packed address)`` of each client of a ``C`` message, in order.

    Raises:
        ProtocolError: not a well-formed ``C`` message.
    """
    if not data or data[0] != CLIENT:
        raise ProtocolError(f"expected a client message (b'C'...), got {data[:64]!r}")
    records = []
    pos = 1
    end = len(data)
    while pos < end:
        if pos + 3 > end:
            raise ProtocolError(f"client message cut inside a record header: {data[:64]!r}")
        size = data[pos + 2]
        stop = pos + 3 + size
        if stop > end:
            raise ProtocolError(f"client message cut inside an address: {data[:64]!r}")
        records.append(((data[pos] << 8) | data[pos + 1], data[pos + 3 : stop]))
        pos = stop
    if not records:
        raise ProtocolError("a client message with no client")
    return records


def done_message(count: int) -> bytes:
    """A worker's report that ``count`` more clients are finished (1..MAX_DONE)."""
    return b"D" + count.to_bytes(4, "big")


def parse_done(data: bytes) -> int:
    """The count of a ``D`` message.

    Raises:
        ProtocolError: not a well-formed completion report.
    """
    if len(data) != 5 or data[0] != DONE:
        raise ProtocolError(
            f"expected a completion report (b'D' + 4-byte count), got {data[:64]!r}"
        )
    count = int.from_bytes(data[1:], "big")
    if count == 0:
        raise ProtocolError("a completion report of 0 clients")
    return count


def _json_object(data: bytes, kind: int, what: str) -> dict[str, Any]:
    if not data or data[0] != kind:
        raise ProtocolError(f"expected a {what} (b{chr(kind)!r}...), got {data[:64]!r}")
    try:
        obj = json.loads(data[1:])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed {what}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed {what}: not a JSON object")
    return obj
