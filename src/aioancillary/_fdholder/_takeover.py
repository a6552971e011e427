"""A holder hands its whole store to a successor, through the library's generation handoff.

Each holder is a generation (``start_generation``) on the *takeover socket*
(``PATH.takeover``, next to the clients' socket ``PATH``), and offers its listening socket
there under the name ``listener``. A new holder started on the same ``PATH`` takes over::

    successor S                                  running holder H
    -----------                                  ----------------
    connect(PATH), hello, {"op":"takeover"} --->  (its own user or root only)
                                                  freeze: stop accepting and answering;
                                                  offer every entry's fds to its generation
                                                  under "e0", "e1", ...
                    <---------------------------  {"op":"offered","pid":H,"entries":[
                                                    {"name","key","fds","expires_in"},...]}
    start_generation(PATH.takeover): the handoff
    moves "listener", "e0", "e1"... (SCM_RIGHTS)
    adopt the entries by key; ready() ----------> the generation's commit point
    {"op":"bye"} on the takeover request ------>  exit (its copies close; S holds its own)
    serve on the same listener: clients queued meanwhile are answered now

Why the entries do not sit in the generation from the start: a generation keeps a duplicate
of everything it offers until it hands over, and a deleted or expired entry must close for
real (a parked listener must release its port). So entries are offered only once the store is
frozen, and a failed takeover replaces the generation (closing those duplicates) with a fresh
one that offers the listener alone.

Failure at any step before ``bye`` leaves H with everything: S closes its generation and
then the takeover request (a dead S closes both at once); H sees the request end without
``bye``, replaces its generation and resumes. H never ends a takeover on its own (a successor
that stops responding keeps H frozen until it exits or is killed): ending it while S is in
the middle of the generation handoff could make S believe H exited, and both would serve.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._asyncio._client import open_unix_connection
from .._asyncio._connection import AncillaryConnection
from .._core._cmsg import Credentials
from .._core._errors import AncillaryError, ConnectionClosedError, FdHolderError
from .._core._fd import OwnedFd, close_all
from .._core._message import AncillaryMessage
from .._core._platform import SCM_MAX_FD
from .._kernel._authorize import root_or_same_user
from .._lifecycle._reload import Generation, start_generation
from .._lifecycle._systemd import NamedFds
from ._holder import Holder, describe
from ._store import StoreError, check_name
from ._wire import MAX_MESSAGE, SUPPORTED_VERSIONS, decode, encode, error_of, read_hello

__all__ = ["LISTENER", "Offer", "OfferedEntry", "TakeoverSource", "adopt", "request_takeover"]

logger = logging.getLogger("aioancillary")

#: The name the listening socket goes under in the generation handoff.
LISTENER = "listener"
#: How often a holder frozen by a takeover that does not finish says so.
_STALL_WARNING = 30.0


def takeover_path(path: str) -> str:
    """The takeover socket of the holder whose clients' socket is ``path``."""
    return path + ".takeover"


async def open_generation(path: str, step: float) -> Generation:
    """The holder's generation on ``path``'s takeover socket (same user or root only);
    ``step``: seconds each handoff step may take."""
    return await start_generation(
        takeover_path(path), authorize=root_or_same_user, timeout=step, systemd=False
    )


# -- the running holder's side --------------------------------------------------------------


class TakeoverSource:
    """The running holder's half: its generation, and the ``takeover`` request handler.

    ``handed_over`` resolves with the successor's pid once it serves; then the holder
    exits. Until then a failed takeover leaves the holder serving, with a fresh generation.
    """

    def __init__(self, gen: Generation, path: str, timeout: float) -> None:
        self._gen: Generation | None = gen
        self._path = path
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self.handed_over: asyncio.Future[int] = self._loop.create_future()
        self._predecessor_gone = asyncio.Event()
        self._watcher = self._loop.create_task(self._watch_predecessor(gen))

    async def _watch_predecessor(self, gen: Generation) -> None:
        await gen.predecessor_exited()
        if gen.predecessor_pid is not None:
            logger.info("the previous holder (pid %d) has exited", gen.predecessor_pid)
        self._predecessor_gone.set()

    async def handle(self, holder: Holder, conn: AncillaryConnection, creds: Credentials) -> None:
        """Run one ``takeover`` request (the ``TakeoverHandler`` of the holder)."""
        refusal = self._refusal(holder, creds)
        if refusal is not None:
            code, message = refusal
            logger.warning("refused a takeover by pid %d: %s", creds.pid, message)
            await conn.send(encode("error", code=code, message=message))
            return
        gen = self._gen
        assert gen is not None  # _refusal said so
        holder.freeze()
        entries = list(holder.store)
        try:
            offered = []
            for index, entry in enumerate(entries):
                key = f"e{index}"
                gen.offer(key, entry.fds)  # duplicates, closed when the generation is
                expires_in = None if entry.deadline is None else entry.deadline - self._loop.time()
                offered.append(
                    {
                        "name": entry.name,
                        "key": key,
                        "fds": len(entry.fds),
                        "expires_in": None if expires_in is None else max(0.0, expires_in),
                    }
                )
        except (AncillaryError, OSError, RuntimeError, ValueError) as exc:
            logger.error("cannot offer the store to pid %d: %s; still serving", creds.pid, exc)
            await conn.send(
                encode("error", code="busy", message=f"the holder cannot offer its store: {exc}")
            )
            await self._resume(holder)
            return
        logger.info("pid %d is taking over %s", creds.pid, describe(entries))
        await conn.send(encode("offered", pid=os.getpid(), entries=offered))
        if await self._committed(conn, creds.pid, gen):
            logger.info("handed %s over to pid %d; exiting", describe(entries), creds.pid)
            self.handed_over.set_result(creds.pid)
            return
        conn.close()  # after an offer only "bye" is expected: anything else ends the request
        if holder.closing:
            return  # stopped by a signal meanwhile: the store is being dropped, no resuming
        logger.warning(
            "the takeover by pid %d did not complete; still serving %s",
            creds.pid,
            describe(entries),
        )
        await self._resume(holder)

    def _refusal(self, holder: Holder, creds: Credentials) -> tuple[str, str] | None:
        if not holder.admit.is_owner(creds):
            return (
                "denied",
                f"only the holder's own user (uid {os.geteuid()}) or root may take its store "
                f"over, not uid {creds.uid}",
            )
        if self.handed_over.done():
            return "busy", "this holder has already handed its store over"
        if self._gen is None:
            return "busy", "this holder has no takeover socket (see its log); restart it"
        if not self._predecessor_gone.is_set():
            return (
                "busy",
                f"the previous holder (pid {self._gen.predecessor_pid}) has not exited yet; "
                "retry in a moment",
            )
        return None

    async def _committed(self, conn: AncillaryConnection, pid: int, gen: Generation) -> bool:
        """Wait for the successor's ``bye`` (it serves) or the end of its request (it gave up)."""
        waited = 0.0
        while True:
            try:
                async with asyncio.timeout(_STALL_WARNING):
                    msg = await conn.recv()  # a cancelled recv() loses no message
            except TimeoutError:
                waited += _STALL_WARNING
                logger.warning(
                    "the takeover by pid %d has not finished after %.0f s; this holder stays "
                    "frozen (clients wait) until that process finishes or exits",
                    pid,
                    waited,
                )
                continue
            except (AncillaryError, OSError) as exc:
                logger.info("the takeover request of pid %d ended: %s", pid, exc)
                return False
            with msg:
                body = decode(msg.data)
            if body is None or body["op"] != "bye":
                logger.warning("pid %d sent %r instead of bye during its takeover", pid, msg.data)
                return False
            try:
                async with asyncio.timeout(self._timeout):
                    await gen.handed_over()
            except TimeoutError:
                logger.warning("pid %d said bye but never took the generation over", pid)
                return False
            return True

    async def _resume(self, holder: Holder) -> None:
        """Replace the generation (dropping the entries' duplicates) and serve again."""
        old, self._gen = self._gen, None
        if old is not None:
            await old.close()
        try:
            gen = await open_generation(self._path, self._timeout)
        except (AncillaryError, OSError) as exc:
            logger.error(
                "cannot reopen the takeover socket %s (%s): serving without it; restart this "
                "holder to allow takeovers again",
                takeover_path(self._path),
                exc,
            )
            await holder.start()
            return
        if gen.inherited.source == "predecessor":
            # A generation already serves on the takeover socket: a successor took over and
            # serves (it committed before its takeover request ended). It has everything.
            logger.warning(
                "pid %s serves on %s already; this holder exits",
                gen.predecessor_pid,
                takeover_path(self._path),
            )
            await gen.close()
            self.handed_over.set_result(gen.predecessor_pid or 0)
            return
        gen.offer(LISTENER, holder.listener)
        await gen.ready()
        if holder.closing:  # a signal came meanwhile: the daemon is dropping everything
            await gen.close()
            return
        self._gen = gen
        await holder.start()

    async def close(self) -> None:
        """Close the generation (and its duplicates); the handoff socket file goes with it."""
        self._watcher.cancel()
        await asyncio.gather(self._watcher, return_exceptions=True)
        gen, self._gen = self._gen, None
        if gen is not None:
            await gen.close()


# -- the successor's side -------------------------------------------------------------------


@dataclass(frozen=True)
class OfferedEntry:
    """One entry of a running holder's offer."""

    name: str
    key: str
    fd_count: int
    expires_in: float | None


@dataclass
class Offer:
    """A running holder's answer to ``takeover``: it is frozen and offers these entries."""

    conn: AncillaryConnection
    pid: int
    entries: list[OfferedEntry]

    @property
    def fd_count(self) -> int:
        """Fds of all entries together."""
        return sum(entry.fd_count for entry in self.entries)

    async def bye(self) -> None:
        """Tell the running holder this one serves: it exits."""
        try:
            await self.conn.send(encode("bye"))
            await self.conn.drain()
        except ConnectionClosedError:
            pass  # it exited already: this holder has everything anyway
        self.conn.close()
        await self.conn.wait_closed()

    async def abort(self) -> None:
        """End the request without ``bye``: the running holder resumes with everything."""
        self.conn.abort()
        await self.conn.wait_closed()


def _offered_entry(item: object) -> OfferedEntry:
    if not isinstance(item, dict):
        raise FdHolderError(f"takeover protocol error: bad entry {item!r}")
    try:
        name = check_name(item.get("name"))
    except StoreError as exc:
        raise FdHolderError(f"takeover protocol error: {exc}") from None
    key, count, expires = item.get("key"), item.get("fds"), item.get("expires_in")
    if (
        not isinstance(key, str)
        or isinstance(count, bool)
        or not isinstance(count, int)
        or not 1 <= count <= SCM_MAX_FD
        or (
            expires is not None
            and (not isinstance(expires, int | float) or not math.isfinite(expires))
        )
    ):
        raise FdHolderError(f"takeover protocol error: bad entry {item!r}")
    return OfferedEntry(name, key, count, None if expires is None else max(0.0, float(expires)))


def _read_offer(conn: AncillaryConnection, msg: AncillaryMessage) -> Offer:
    with msg:
        body: dict[str, Any] | None = decode(msg.data)
        if body is not None and body["op"] == "error":
            raise error_of(body)
        if body is None or body["op"] != "offered" or msg.fd_count:
            raise FdHolderError(
                f"takeover protocol error: expected an offer, got {msg.data[:80]!r}"
            )
    items = body.get("entries")
    pid = body.get("pid")
    if not isinstance(items, list) or not isinstance(pid, int):
        raise FdHolderError("takeover protocol error: an offer without entries or pid")
    return Offer(conn, pid, [_offered_entry(item) for item in items])


async def request_takeover(path: str, *, step: float, deadline: float) -> Offer | None:
    """Ask the holder serving ``path`` for its store; ``None`` if no holder serves there.

    Each exchange may take ``step`` seconds. A busy holder (its own predecessor still
    exiting) is asked again until ``deadline`` seconds have passed.

    Raises:
        FdHolderError: the holder refused (``denied``: another user's holder) or broke the
            protocol; ``busy`` when it was busy or silent until the deadline.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline
    delay = 0.05
    while True:
        try:
            async with asyncio.timeout(step):
                conn = await open_unix_connection(
                    path, authorize=root_or_same_user, max_message_size=MAX_MESSAGE
                )
        except (FileNotFoundError, ConnectionRefusedError):
            return None  # no file, or a stale one: nobody serves there
        try:
            try:
                async with asyncio.timeout(step):
                    await conn.send(encode("hello", versions=list(SUPPORTED_VERSIONS)))
                    read_hello(await conn.recv())
                    await conn.send(encode("takeover", pid=os.getpid()))
                    return _read_offer(conn, await conn.recv())
            except TimeoutError:
                # A holder frozen by another process's takeover answers nobody meanwhile.
                raise FdHolderError(
                    f"the holder at {path!r} did not answer within {step} s (another "
                    "process may be taking it over); nothing was taken",
                    code="busy",
                ) from None
        except FdHolderError as exc:
            conn.abort()
            await conn.wait_closed()
            if exc.code != "busy" or loop.time() + delay > give_up:
                raise
            logger.info("the running holder is busy (%s); asking again", exc)
        except BaseException:
            conn.abort()
            await conn.wait_closed()
            raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


def check_fits(offer: Offer, max_entries: int, max_fds: int) -> None:
    """Refuse an offer over this holder's bounds.

    Raises:
        FdHolderError: code ``full``.
    """
    if len(offer.entries) > max_entries or offer.fd_count > max_fds:
        raise FdHolderError(
            f"the running holder (pid {offer.pid}) holds {len(offer.entries)} entries and "
            f"{offer.fd_count} fds, over this holder's bounds (--max-entries {max_entries}, "
            f"--max-fds {max_fds}): start it with bounds at least that high",
            code="full",
        )


def adopt(
    offer: Offer,
    inherited: NamedFds,
    add: Callable[[str, tuple[OwnedFd, ...], float | None], None],
) -> None:
    """Move every offered entry's fds from the generation's ``inherited`` fds into the store
    (``add``).

    Raises:
        FdHolderError: an entry's fds are missing or do not match the offer; every fd not
            yet in the store is closed (the caller closes the store's).
    """
    for entry in offer.entries:
        try:
            fds = inherited.take_fds(entry.key)
        except AncillaryError as exc:
            raise FdHolderError(f"takeover: {exc}") from None
        if len(fds) != entry.fd_count:
            close_all(fds)
            raise FdHolderError(
                f"takeover: {len(fds)} fd(s) arrived for {entry.name!r}, the offer said "
                f"{entry.fd_count}"
            )
        try:
            # An entry due while the store was frozen expires right after the takeover.
            add(entry.name, fds, None if entry.expires_in is None else max(entry.expires_in, 1e-3))
        except (StoreError, ValueError) as exc:
            close_all(fds)
            raise FdHolderError(f"takeover: cannot keep {entry.name!r}: {exc}") from None
