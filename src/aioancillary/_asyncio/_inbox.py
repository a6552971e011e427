"""An [`AncillaryConnection`][aioancillary.AncillaryConnection]'s receive side: its state, the
queue of received messages and its byte/fd budget, ``recv()``, ``recv_batch()`` and ``async
for``."""

from __future__ import annotations

import asyncio
import collections
import enum
import operator
import resource
from typing import Any, Self

from .._core._errors import AncillaryError, ConnectionClosedError
from .._core._message import AncillaryMessage
from .._core._platform import SCM_MAX_FD
from ._transport import AncillaryTransport

__all__ = [
    "DEFAULT_MAX_QUEUED_BYTES",
    "DEFAULT_MAX_QUEUED_FDS",
    "NO_MESSAGES",
    "Inbox",
    "State",
    "default_max_queued_fds",
    "waited_on",
]

#: Default receive-queue byte budget: reading pauses above it.
DEFAULT_MAX_QUEUED_BYTES = 4 * 1024 * 1024
#: Upper bound of the default receive-queue fd budget. Reading pauses above the budget, so
#: that a fast peer cannot push a slow consumer to its RLIMIT_NOFILE; by default the budget is
#: this or a quarter of the soft RLIMIT_NOFILE, whichever is smaller (never under SCM_MAX_FD).
DEFAULT_MAX_QUEUED_FDS = 4 * SCM_MAX_FD


def default_max_queued_fds() -> int:
    """The receive-queue fd budget used when none is given (see ``DEFAULT_MAX_QUEUED_FDS``)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_QUEUED_FDS
    return max(SCM_MAX_FD, min(DEFAULT_MAX_QUEUED_FDS, int(soft) // 4))


_DATA = operator.attrgetter("data")
_FD_COUNT = operator.attrgetter("fd_count")  # a slot: read in C

# Connections a task is waiting on (in recv() or drain()). The loop reaches a connection only
# through its protocol's weak reference, so that a connection the application dropped without
# close() is collected (with a ResourceWarning) instead of living as long as its reader
# registration; a waiting task keeps its connection alive through this set.
waited_on: set[Any] = set()


class State(enum.Enum):
    """Where an [`AncillaryConnection`][aioancillary.AncillaryConnection] is in its life, as seen
    by the application: whether messages may still arrive, and why not."""

    #: Messages may arrive.
    OPEN = "open"
    #: The peer closed its sending side: what is queued is all there will be (sending goes on).
    EOF = "eof"
    #: The socket closed under the connection (the peer vanished, or the transport was closed
    #: directly); the failure, if any, is kept for ``recv()`` and ``drain()`` to raise.
    LOST = "lost"
    #: Closed here (``close()``, ``abort()``, or collected): unread messages were closed.
    CLOSED = "closed"


#: The moves a connection may make; anything else is a bug of this module (h11's
#: ``_state.py`` keeps the same kind of table).
_MOVES: dict[State, frozenset[State]] = {
    State.OPEN: frozenset({State.EOF, State.LOST, State.CLOSED}),
    State.EOF: frozenset({State.LOST, State.CLOSED}),
    State.LOST: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}
_OPEN = State.OPEN
_EOF = State.EOF
_CLOSED = State.CLOSED

# The queue of every connection with no message waiting (never appended to): CPython gives
# every deque, empty or not, a 64-slot block (about 760 bytes in all), and most connections of
# a server are idle. A connection gets a deque of its own when messages arrive and drops it
# when the application has taken them all.
NO_MESSAGES: collections.deque[AncillaryMessage] = collections.deque()
_deque = collections.deque


class Inbox:
    """Receiving for [`AncillaryConnection`][aioancillary.AncillaryConnection] (a mixin: the
    connection holds the state). Messages the transport hands over wait in a queue until the
    application takes them; reading pauses while the queue is over its byte or fd budget."""

    _loop: asyncio.AbstractEventLoop
    _transport: AncillaryTransport
    _state: State
    _queue: collections.deque[AncillaryMessage]
    _qbytes: int
    _qfds: int
    _max_qbytes: int
    _max_qfds: int
    _read_paused: bool
    _waiter: asyncio.Future[None] | None
    _exc: BaseException | None
    _drain_waiters: list[asyncio.Future[None]] | None  # None: no task in drain()

    def _move(self, new: State) -> None:
        """Go to ``new`` if the table allows it from the current state."""
        if new not in _MOVES[self._state]:
            raise RuntimeError(
                f"aioancillary bug: an AncillaryConnection cannot go from {self._state.name} "
                f"to {new.name}"
            )
        self._state = new

    def _on_messages(self, messages: list[AncillaryMessage]) -> None:
        if self._state is _CLOSED:
            for msg in messages:
                msg.close()  # the application closed the connection: nobody will read them
            return
        queue = self._queue
        if queue:
            queue.extend(messages)
        else:
            self._queue = _deque(messages)
        if len(messages) == 1:
            msg = messages[0]
            self._qbytes += len(msg.data)
            self._qfds += msg.fd_count
        else:
            # map/attrgetter iterate in C: cheaper per message than a comprehension.
            self._qbytes += sum(map(len, map(_DATA, messages)))
            self._qfds += sum(map(_FD_COUNT, messages))
        self._wake_reader()
        if not self._read_paused and (
            self._qbytes > self._max_qbytes
            or self._qfds + self._transport.get_read_pending_fds() > self._max_qfds
        ):
            # Fds still in the frame decoder count too: they are open in this process.
            self._read_paused = True
            self._transport.pause_reading()

    def _on_eof(self) -> None:
        if self._state is _OPEN:
            self._move(State.EOF)
        self._wake_reader()

    def _wake_reader(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _consumed(self) -> None:
        qfds = self._qfds
        if (
            self._read_paused
            and self._qbytes <= self._max_qbytes // 2
            and qfds <= self._max_qfds // 2
            # Decoder fds wait for bytes still unread: never let them alone keep reading
            # paused (they are at most SCM_MAX_FD, and the budget is never below that).
            and qfds + self._transport.get_read_pending_fds() <= self._max_qfds
        ):
            self._read_paused = False
            self._transport.resume_reading()

    async def _wait_for_messages(self) -> None:
        while not self._queue:
            exc = self._exc
            if exc is not None:
                if isinstance(exc, AncillaryError):
                    raise exc  # ProtocolError, FdTruncatedError...: the cause itself
                raise ConnectionClosedError(f"the connection was lost: {exc}") from exc
            if self._state is not _OPEN:
                raise ConnectionClosedError("the connection is closed: no more messages")
            if self._waiter is not None:
                raise RuntimeError(
                    "another task is already waiting for a message on this connection; "
                    "concurrent receivers would race for messages"
                )
            self._waiter = self._loop.create_future()
            self._transport.end_burst()
            waited_on.add(self)
            try:
                await self._waiter
            finally:
                self._waiter = None
                if not self._drain_waiters:
                    waited_on.discard(self)

    async def recv(self) -> AncillaryMessage:
        """Return the next message; the caller owns it (close it, or take its fds).

        Returns at once, without a trip through the event loop, when a message is queued.
        Cancelling a waiting ``recv()`` loses no message.

        Raises:
            ConnectionClosedError: the peer closed the connection (EOF) or it was closed here.
            ProtocolError: the peer broke the framing protocol (the connection is closed).
        """
        queue = self._queue
        if not queue:
            await self._wait_for_messages()
            queue = self._queue
        msg = queue.popleft()
        if not queue:
            self._queue = NO_MESSAGES
        self._qbytes -= len(msg.data)
        self._qfds -= msg.fd_count
        if self._read_paused:
            self._consumed()
        return msg

    async def recv_batch(self) -> list[AncillaryMessage]:
        """Return every queued message at once (at least one); the caller owns them all.

        The fastest way to consume a flood: one call hands over everything the connection has
        read so far. Raises as [`recv`][aioancillary.AncillaryConnection.recv] does.
        """
        if not self._queue:
            await self._wait_for_messages()
        messages = list(self._queue)
        self._queue = NO_MESSAGES
        self._qbytes = 0
        self._qfds = 0
        if self._read_paused:
            self._consumed()
        return messages

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> AncillaryMessage:
        """The next message; iteration ends at EOF or local close, and raises on errors."""
        queue = self._queue
        if not queue:
            try:
                await self._wait_for_messages()
            except ConnectionClosedError:
                if self._exc is not None:
                    raise
                raise StopAsyncIteration from None
            queue = self._queue
        # recv() inlined: one coroutine frame less per message.
        msg = queue.popleft()
        if not queue:
            self._queue = NO_MESSAGES
        self._qbytes -= len(msg.data)
        self._qfds -= msg.fd_count
        if self._read_paused:
            self._consumed()
        return msg

    def _close_queue(self) -> None:
        queue = self._queue
        while queue:
            queue.popleft().close()  # the application gave up on them: close their fds
        self._queue = NO_MESSAGES
        self._qbytes = 0
        self._qfds = 0

    def at_eof(self) -> bool:
        """True once nothing more will ever be received and every queued message was taken:
        the peer closed its sending side, or the connection was lost or closed.

        Like `asyncio.StreamReader.at_eof`.
        """
        return self._state is not _OPEN and not self._queue
