"""The send side, sans I/O: what a caller may send, and the queue of what is to be sent.

Two parts, neither of which touches a socket:

* checking what a caller hands over (`payload_of`, `borrowed_fds`,
  `take_over`): every refusal happens here, before anything is queued or sent, and with
  ``close_fds=True`` every fd handed over is closed on every refusal;
* `Outbox`: the queue of bytes and the fds that must ride with them, the rules that
  decide which messages share a ``sendmsg`` (bursts, the per-``sendmsg`` fd cap, sealing), and
  the byte/fd counters. The transport asks it what to send next (`Outbox.pending`),
  tells it what the kernel took (`Outbox.advance`), and closes the fds it hands back.

Queued fds are raw numbers owned by the outbox (duplicates of borrowed fds, or fds handed over with
``close_fds=True``), not [`OwnedFd`][aioancillary.OwnedFd] objects: this is a sender's per-message
path. Every method that removes fds from the queue returns them to the caller, who closes them.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import socket
from collections.abc import Iterable
from typing import Any

from ._errors import InvalidFdError, MessageTooLargeError, TooManyFdsError
from ._fd import FD_MAX, OwnedFd, close_raw, fd_number
from ._framing import FRAME_HEADER_SIZE, Mode, encode_header, frames_of

__all__ = [
    "Outbox",
    "Payload",
    "borrowed_fds",
    "check_message",
    "check_open",
    "payload_of",
    "release_handed_over",
    "take_over",
]

#: What a message's bytes are held as once checked: one-byte items, contiguous.
Payload = bytes | bytearray | memoryview
_SEQUENCES = (list, tuple)
_F_GETFD = fcntl.F_GETFD
_deque = collections.deque


# -- what a caller may send --------------------------------------------------------------------


def payload_of(data: Any) -> Payload:
    """Return ``data`` as bytes whose ``len()`` is its size in bytes, or refuse it.

    Any bytes-like object is accepted and framed by its size in bytes: a memoryview of wider
    items (``array('H')``) or of several dimensions is cast to bytes, a non-contiguous one is
    copied. Anything else (``str``, a list, an int) is refused.

    Raises:
        TypeError: ``data`` does not support the buffer protocol.
    """
    kind = type(data)
    if kind is bytes or kind is bytearray:
        return data  # type: ignore[no-any-return]
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            "data must be a bytes-like object (bytes, bytearray, memoryview, array...), "
            f"not {kind.__name__}; encode text first"
        ) from None
    if view.itemsize == 1 and view.ndim == 1 and view.c_contiguous:
        return view
    if view.c_contiguous:
        return view.cast("B")  # items of any size and shape, as their bytes
    return view.tobytes()


def borrowed_fds(fds: Iterable[Any]) -> list[int]:
    """Validate borrowed fds (ints or objects with ``fileno()``) and return their numbers.

    Raises:
        TypeError: ``fds`` is not iterable, or an item is not an int or an object with
            ``fileno()`` (``bool``, ``None``, ``str``, ``float`` are refused).
        InvalidFdError: a number is negative or too large, or an object is closed.
    """
    if type(fds) in _SEQUENCES:
        items = fds
    else:
        try:
            items = list(fds)
        except TypeError:
            raise TypeError(
                f"fds must be an iterable of fds (ints or objects with fileno()), not "
                f"{type(fds).__name__}"
            ) from None
    return [fd if type(fd) is int and 0 <= fd <= FD_MAX else fd_number(fd) for fd in items]


def take_over(fds: Iterable[Any]) -> list[int]:
    """Take ownership of fds handed over with ``close_fds=True``; return their raw numbers.

    ``OwnedFd`` and ``socket.socket`` items are detached, ints are taken as they are. If any
    item is refused, every fd handed over is closed before the error is raised: the caller
    gave them away either way.

    Raises:
        TypeError: ``fds`` is not iterable, or an item is neither an ``OwnedFd``, a
            ``socket.socket`` nor an int (other objects cannot be taken over).
        InvalidFdError: an int is out of range, or an object is already closed.
        ValueError: the same fd is listed twice (it would be closed twice).
    """
    try:
        items = fds if type(fds) in _SEQUENCES else list(fds)
    except TypeError:
        raise TypeError(
            f"fds must be an iterable of fds (ints or objects with fileno()), not "
            f"{type(fds).__name__}"
        ) from None
    nums: list[int] = []
    error: Exception | None = None
    for item in items:
        kind = type(item)
        if kind is int and 0 <= item <= FD_MAX:
            nums.append(item)
        elif kind is OwnedFd or kind is socket.socket or isinstance(item, (OwnedFd, socket.socket)):
            num = item.detach()
            if num >= 0:
                nums.append(num)
            elif error is None:
                error = InvalidFdError(f"cannot send {item!r}: it is already closed")
        elif error is None:
            try:
                fd_number(item)  # the precise TypeError / InvalidFdError for this item
            except (TypeError, InvalidFdError) as exc:
                error = exc
            else:
                error = TypeError(
                    f"close_fds=True takes over OwnedFd, socket.socket or int items, not "
                    f"{kind.__name__}: the connection cannot take ownership away from it. "
                    "Send it without close_fds, or pass OwnedFd.dup_of(obj)"
                )
    if error is None and len(set(nums)) != len(nums):
        error = ValueError(
            "close_fds=True with the same fd listed twice: it would be closed twice. List "
            "each fd once, or send without close_fds"
        )
    if error is not None:
        close_raw(list(set(nums)))  # handed over: the caller gave them away either way
        raise error
    return nums


def release_handed_over(fds: Iterable[Any]) -> None:
    """Close every fd handed over with ``close_fds=True`` to a send that is refused outright."""
    with contextlib.suppress(TypeError, ValueError):  # take_over closed what it could
        close_raw(take_over(fds))


def check_message(
    mode: Mode,
    size: int,
    nfds: int,
    *,
    fd_cap: int | None,
    max_message_size: int,
    datagram_limit: int,
    cap_name: str = "SCM_MAX_FD, or max_fds_per_send",
) -> None:
    """Refuse a message the kernel or the peer would refuse; nothing is queued yet.

    Raises:
        TooManyFdsError: more than ``fd_cap`` fds (the kernel's cap, or ``max_fds_per_send``).
        MessageTooLargeError: over ``max_message_size`` (framed: the peer's frame limit), or
            over what the kernel takes in one datagram.
        ValueError: fds with no byte on an unframed stream (the kernel would drop them).
    """
    if fd_cap is not None and nfds > fd_cap:
        raise TooManyFdsError(
            f"one message can carry at most {fd_cap} fds ({cap_name}); this one has {nfds}. "
            "Split them over several messages"
        )
    if mode is Mode.DATAGRAM:
        if size > datagram_limit:
            raise MessageTooLargeError(
                f"message of {size} bytes exceeds the {datagram_limit} bytes this socket takes "
                "in one datagram (max_message_size, or SO_SNDBUF - 32 on Linux); send smaller "
                "messages or raise SO_SNDBUF"
            )
    elif mode is Mode.FRAMED:
        if size > max_message_size:
            raise MessageTooLargeError(
                f"message of {size} bytes exceeds max_message_size={max_message_size}; the "
                "peer would refuse it"
            )
    elif nfds and not size:
        raise ValueError(
            "a stream socket sends nothing, fds included, for an empty write: send at least "
            "one byte with the fds"
        )


def check_open(fds: list[int]) -> None:
    """Raise [`InvalidFdError`][aioancillary.InvalidFdError] unless every number in ``fds`` is an
    open fd.

    For fds that will be queued without a duplicate (handed over with ``close_fds=True``):
    ``sendmsg`` would otherwise find the bad number only when the batch goes out, with other
    messages in it.
    """
    getfd = fcntl.fcntl
    for fd in fds:
        try:
            getfd(fd, _F_GETFD)
        except OSError as exc:
            raise InvalidFdError(
                f"cannot send fd {fd}: it is not open ({exc.strerror}); nothing was queued"
            ) from exc


# -- the queue ---------------------------------------------------------------------------------


class _Batch:
    """Bytes for one ``sendmsg`` and the fds that ride with their first byte.

    ``fds`` are raw numbers owned by the outbox. Once any byte of the batch has gone out, its
    fds have too: the batch is sealed and no fd may join it (it would arrive late).
    """

    __slots__ = ("data", "fds", "sealed", "sent")

    def __init__(self, fds: list[int]) -> None:
        self.data = bytearray()
        self.fds = fds
        self.sent = 0
        self.sealed = False


# The queue of an outbox with nothing queued, shared by all of them (never appended to): CPython
# gives every deque, empty or not, a 64-slot block (about 760 bytes in all), and most
# connections are idle with nothing queued. An outbox gets a deque of its own when something is
# queued and drops it when it empties again.
_NO_BATCHES: collections.deque[_Batch] = collections.deque()


class Outbox:
    """The queue of bytes and fds waiting for the socket, and the rules for grouping them.

    Rules (``Mode`` decides which apply):

    * the fds of a ``sendmsg`` ride with its first byte, so a batch that has sent anything
      is sealed; a partial write sends the rest of the batch without fds;
    * framed streams merge queued messages into batches of up to ``fd_cap`` fds per
      ``sendmsg``; the first message of a burst is not queued at all (`sendable_now`)
      so round trips stay fast, and the burst ends when the writer waits (`end_burst`);
    * raw streams start a new batch for every fd-carrying message, so that a peer reading one
      ``recvmsg`` at a time gets those fds with that message's bytes; they have no bursts;
    * datagram sockets (seqpacket, dgram) send one message per ``sendmsg``.

    Attributes:
        nbytes: Bytes queued and not yet sent.
        nfds: Fds queued (owned here) and not yet sent.
        direct: A new message may be sent at once instead of queued (`sendable_now`;
            an attribute because the transport reads it for every message).
    """

    __slots__ = ("_batches", "_burst", "_cap", "_framed", "_mode", "direct", "nbytes", "nfds")

    def __init__(self, mode: Mode, fd_cap: int) -> None:
        self._mode = mode
        self._framed = mode is Mode.FRAMED
        self._cap = fd_cap
        self._batches = _NO_BATCHES
        self._burst = False
        self.direct = True
        self.nbytes = 0
        self.nfds = 0

    def __bool__(self) -> bool:
        return bool(self._batches)

    # -- the direct path: what goes out without being queued -------------------------------------

    def sendable_now(self) -> bool:
        """True when a new message may be sent at once instead of queued.

        Nothing may be queued (order), and on a framed stream no burst may be running: after
        the first message of a loop iteration went out, later ones are merged into one batch.
        """
        return self.direct

    def sent_directly(self) -> None:
        """Note that a message went out directly: on a framed stream a burst begins."""
        if self._framed:
            self._burst = True
            self.direct = False

    def end_burst(self) -> None:
        """The burst is over (the writer waits, data arrived, the flush ran)."""
        self._burst = False
        self.direct = not self._batches

    def _emptied(self) -> None:
        if not self._batches:
            self._batches = _NO_BATCHES
            self.direct = not self._burst

    def frame(self, payload: Payload, nfds: int) -> list[Payload]:
        """The buffers that carry one message on the wire (header first when framed)."""
        if self._framed:
            return [encode_header(nfds, len(payload)), payload]
        return [payload]

    def group_size(self, messages: list[tuple[Payload, list[int]]], start: int) -> int:
        """How many of ``messages[start:]`` share the next ``sendmsg`` (at least one)."""
        mode = self._mode
        if mode is Mode.DATAGRAM:
            return 1
        cap = self._cap
        nfds = len(messages[start][1])
        count = 1
        for _payload, fds in messages[start + 1 :]:
            if fds and (mode is Mode.RAW or nfds + len(fds) > cap):
                break
            nfds += len(fds)
            count += 1
        return count

    # -- queueing ---------------------------------------------------------------------------------

    def queue(self, payload: Payload, fds: list[int]) -> bool:
        """Queue one message; the outbox owns ``fds`` (raw numbers) from now on.

        Returns True when the batch it joined carries as many fds as one ``sendmsg`` may (it
        gains nothing from waiting for more).
        """
        batches = self._batches
        if batches:
            last: _Batch | None = batches[-1]
        else:
            last = None
            batches = self._batches = _deque()
        nfds = len(fds)
        if nfds:
            # Only a framed stream merges fd-carrying messages: a raw stream's reader would
            # get the fds with the wrong message's bytes, a datagram keeps its own.
            if (
                self._framed
                and last is not None
                and not last.sealed
                and len(last.fds) + nfds <= self._cap
            ):
                last.fds += fds
            else:
                last = _Batch(fds)
                batches.append(last)
            self.nfds += nfds
        elif last is None or self._mode is Mode.DATAGRAM:
            last = _Batch([])
            batches.append(last)
        data = last.data
        size = len(payload)
        if self._framed:
            data += encode_header(nfds, size)
            self.nbytes += FRAME_HEADER_SIZE + size
        else:
            self.nbytes += size
        data += payload
        self.direct = False
        return len(last.fds) >= self._cap

    def queue_rest(self, rest: Payload) -> None:
        """Queue what a direct ``sendmsg`` left unsent; its fds went with its first byte."""
        batch = _Batch([])
        batch.data += rest
        batch.sealed = True
        if not self._batches:
            self._batches = _deque()
        self._batches.append(batch)
        self.nbytes += len(rest)
        self.direct = False

    # -- sending the queue ------------------------------------------------------------------------

    def pending(self) -> tuple[memoryview, list[int]]:
        """The bytes and fds of the next ``sendmsg`` (the queue must not be empty)."""
        batch = self._batches[0]
        return memoryview(batch.data)[batch.sent :], batch.fds

    def advance(self, sent: int) -> list[int]:
        """Record that the kernel took ``sent`` bytes of `pending`'s.

        Returns the fds that went with them (the kernel holds its own references now: the
        caller closes these numbers). A datagram's ``sendmsg`` is all or nothing.
        """
        batch = self._batches[0]
        fds = batch.fds
        if fds:
            batch.fds = []
            self.nfds -= len(fds)
        batch.sealed = True
        batch.sent += sent
        self.nbytes -= sent
        if batch.sent >= len(batch.data) or self._mode is Mode.DATAGRAM:
            self._batches.popleft()
            self._emptied()
        return fds

    def discard_first(self) -> list[int]:
        """Drop the next datagram (the kernel refused it for good); return its fds to close."""
        batch = self._batches.popleft()
        self.nbytes -= len(batch.data) - batch.sent
        self.nfds -= len(batch.fds)
        self._emptied()
        return batch.fds

    # -- tearing down -----------------------------------------------------------------------------

    def take_unsent(self) -> list[tuple[bytes, list[int]]]:
        """Remove and return the messages none of whose bytes (nor fds) reached the kernel.

        Each is ``(payload, fds)`` as it was queued (framed streams are split back into their
        messages; a raw stream's batch comes back as one chunk). The caller owns the fds.
        """
        out: list[tuple[bytes, list[int]]] = []
        kept: collections.deque[_Batch] = collections.deque()
        for batch in self._batches:
            if batch.sealed:
                kept.append(batch)
                continue
            if self._framed:
                out += frames_of(batch.data, batch.fds)
            else:
                out.append((bytes(batch.data), batch.fds))
            self.nbytes -= len(batch.data)
            self.nfds -= len(batch.fds)
        self._batches = kept
        self._emptied()
        return out

    def drop(self) -> list[int]:
        """Empty the queue; return every fd it owned (never sent: the caller closes them)."""
        fds = [fd for batch in self._batches for fd in batch.fds]
        self._batches = _NO_BATCHES
        self.nbytes = 0
        self.nfds = 0
        self._burst = False
        self.direct = True
        return fds
