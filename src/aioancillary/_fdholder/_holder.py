"""The fd holder's serving core: clients' requests against the store, expiry, freezing.

``Holder`` accepts clients on the listening socket it is given, admits them by their
credentials (``SO_PEERCRED``, checked at accept, before a byte is read: a refused client's
fds are never received), and answers their requests (``_wire`` describes the protocol). It
owns the store's fds: every fd it receives is either stored or closed before the answer goes
out.

A takeover *freezes* the holder (``Holder.freeze``): it stops accepting (new clients
queue in the listening socket's backlog for whoever serves next), stops answering (requests
wait), and the store stops changing and expiring, so that the snapshot handed to a successor
stays true. ``Holder.resume`` undoes it when the takeover fails. The ``takeover`` request
itself is handed to a callback (``_takeover`` implements it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from .._asyncio._connection import AncillaryConnection
from .._asyncio._server import AncillaryServer, start_unix_server
from .._core._cmsg import Credentials
from .._core._errors import ConnectionClosedError
from .._core._fd import OwnedFd, close_all
from .._core._message import AncillaryMessage
from .._core._platform import SCM_MAX_FD
from ._store import Entry, Store, StoreError, check_name
from ._wire import MAX_MESSAGE, PROTOCOL_VERSION, SUPPORTED_VERSIONS, decode, encode

__all__ = ["Admit", "Holder", "TakeoverHandler"]

logger = logging.getLogger("aioancillary")

#: ``await handler(holder, conn, credentials)``: runs a ``takeover`` request on its connection.
TakeoverHandler = Callable[["Holder", AncillaryConnection, Credentials], Awaitable[None]]


@dataclass(frozen=True)
class Admit:
    """Who may talk to the holder: its own user and root, and the uids and gids given."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def __call__(self, creds: Credentials | None) -> bool:
        if creds is None:
            return False  # a platform that cannot tell who the peer is: nobody
        return creds.uid in (0, os.geteuid()) or creds.uid in self.uids or creds.gid in self.gids

    def is_owner(self, creds: Credentials) -> bool:
        """True for the holder's own user and root (who may take the whole store over)."""
        return creds.uid in (0, os.geteuid())

    def __str__(self) -> str:
        parts = ["root"] if os.geteuid() == 0 else [f"uid {os.geteuid()}", "root"]
        parts += [f"uid {uid}" for uid in sorted(self.uids)]
        parts += [f"gid {gid}" for gid in sorted(self.gids)]
        return ", ".join(parts)


def describe(entries: Sequence[Entry[OwnedFd]]) -> str:
    """``3 entries (5 fds): a, b, c`` for a log line."""
    fds = sum(len(entry.fds) for entry in entries)
    names = ", ".join(repr(entry.name) for entry in entries)
    noun = "entry" if len(entries) == 1 else "entries"
    return f"{len(entries)} {noun} ({fds} fds)" + (f": {names}" if names else "")


class Holder:
    """Serves the store to clients on ``listener``; see the module docstring.

    The holder keeps ``listener`` (its own reference) for its whole life: the client server
    accepts on a duplicate of it, closed whenever the holder stops accepting.
    """

    def __init__(
        self,
        store: Store[OwnedFd],
        listener: socket.socket,
        admit: Admit,
        on_takeover: TakeoverHandler,
    ) -> None:
        self.store = store
        self.listener = listener
        self.admit = admit
        self._on_takeover = on_takeover
        self._loop = asyncio.get_running_loop()
        self._server: AncillaryServer | None = None
        self._servers: list[AncillaryServer] = []
        self._running = asyncio.Event()  # set while requests are answered (not frozen)
        self._held = 0  # requests waiting for the end of a freeze
        self._none_held = asyncio.Event()
        self._none_held.set()
        # Once closing: the (code, message) that requests still waiting are answered with.
        self._closing: tuple[str, str] | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- accepting --------------------------------------------------------------------------

    async def start(self) -> None:
        """Accept clients and answer them (again, after ``freeze``)."""
        if self._server is None:
            # Servers closed by earlier freezes are kept while clients they accepted remain.
            self._servers = [server for server in self._servers if server.stats.active]
            self._server = await start_unix_server(
                self._serve,
                sock=self.listener.dup(),
                authorize=self.admit,
                max_message_size=MAX_MESSAGE,
                # A client sends at most one store (253 fds) before reading its answer.
                max_queued_fds=SCM_MAX_FD,
                peer_error_level=logging.WARNING,
            )
            self._servers.append(self._server)
        self._running.set()
        self._schedule_expiry()

    @property
    def frozen(self) -> bool:
        """True while a takeover holds the store still."""
        return not self._running.is_set()

    @property
    def closing(self) -> bool:
        """True once `close` was called: the holder never serves again."""
        return self._closing is not None

    def freeze(self) -> None:
        """Stop accepting and answering; the store stops changing (see the module docstring)."""
        self._running.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        server, self._server = self._server, None
        if server is not None:
            server.close(unlink=False)  # closes only the duplicate: the listener stays bound

    async def close(self, code: str, message: str) -> list[Entry[OwnedFd]]:
        """Stop for good: close every connection; return the entries (the caller closes them).

        Requests held by a freeze were never carried out: they are answered with the error
        ``code`` (``moved``: the client connects again and meets the successor). The listener
        itself is left to the caller (a successor may hold it too).
        """
        self._closing = (code, message)
        self.freeze()
        self._running.set()  # wake the held requests: they answer with the closing error
        await self._none_held.wait()
        for server in self._servers:
            server.close_clients()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        return self.store.take_all()

    # -- expiry -----------------------------------------------------------------------------

    def _schedule_expiry(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.store.next_deadline()
        if deadline is not None and not self.frozen and self._closing is None:
            self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self.frozen:
            return  # a takeover snapshot is being handed over: the store stays as it is
        for entry in self.store.expire(self._loop.time()):
            close_all(entry.fds)
            logger.info("expired %r: closed its %d fd(s)", entry.name, len(entry.fds))
        self._schedule_expiry()

    # -- a client ---------------------------------------------------------------------------

    async def _serve(self, conn: AncillaryConnection) -> None:
        creds = conn.peercred
        assert creds is not None  # Admit refused anyone the kernel could not name
        if not await self._hello(conn):
            return
        try:
            async for msg in conn:
                with msg:
                    if not await self._hold(conn):
                        return
                    body = decode(msg.data)
                    if body is not None and body["op"] == "takeover" and not msg.fd_count:
                        await self._on_takeover(self, conn, creds)
                        if self._closing is not None:
                            return
                        continue
                    await self._answer(conn, msg, body)
        finally:
            released = self.store.release(conn)
            if released:
                logger.info(
                    "a client (pid %d) left before confirming retrieve(delete=True) of %s: kept",
                    creds.pid,
                    released,
                )

    async def _hold(self, conn: AncillaryConnection) -> bool:
        """Wait while frozen; False (the request answered with the closing error) if closing."""
        if not self._running.is_set():
            self._held += 1
            self._none_held.clear()
            try:
                await self._running.wait()
            finally:
                self._held -= 1
                if not self._held:
                    self._none_held.set()
        if self._closing is None:
            return True
        with contextlib.suppress(ConnectionClosedError):
            await self._error(conn, *self._closing)
        return False

    async def _hello(self, conn: AncillaryConnection) -> bool:
        try:
            msg = await conn.recv()
        except ConnectionClosedError:
            return False
        with msg:
            body = decode(msg.data)
        if body is None or body["op"] != "hello" or msg.fd_count:
            await self._error(conn, "request", "the first message must be a hello without fds")
            return False
        versions = body.get("versions")
        common = [v for v in SUPPORTED_VERSIONS if isinstance(versions, list) and v in versions]
        if not common:
            await self._error(
                conn,
                "version",
                f"this holder speaks protocol version(s) {list(SUPPORTED_VERSIONS)}, the "
                f"client {versions!r}: upgrade the older side",
            )
            return False
        await conn.send(
            encode(
                "hello",
                version=max(common),
                pid=os.getpid(),
                max_entries=self.store.max_entries,
                max_fds=self.store.max_fds,
            )
        )
        return True

    async def _error(self, conn: AncillaryConnection, code: str, message: str) -> None:
        await conn.send(encode("error", code=code, message=message))

    async def _answer(
        self, conn: AncillaryConnection, msg: AncillaryMessage, body: dict[str, object] | None
    ) -> None:
        """Answer one request; the message's fds are stored or closed (``with msg``) here."""
        if body is None:
            await self._error(
                conn,
                "request",
                f"not a JSON request: {msg.data[:80]!r} (protocol version "
                f"{PROTOCOL_VERSION} sends one JSON object per message)",
            )
            return
        op = body["op"]
        if op == "store":
            await self._store(conn, msg, body)
            return
        if msg.fd_count:
            await self._error(conn, "fds", f"a {op!r} request carries no fds (they were closed)")
            return
        try:
            if op == "retrieve":
                await self._retrieve(conn, body)
            elif op == "ack":
                self._ack(conn, body)
            elif op == "list":
                listing = self.store.listing(self._loop.time())
                entries = [
                    {"name": e.name, "fds": e.fd_count, "expires_in": e.expires_in} for e in listing
                ]
                await conn.send(encode("entries", entries=entries))
            elif op == "delete":
                entry = self.store.delete(check_name(body.get("name")), owner=conn)
                close_all(entry.fds)
                logger.info("deleted %r: closed its %d fd(s)", entry.name, len(entry.fds))
                self._schedule_expiry()
                await conn.send(encode("ok"))
            else:
                await self._error(conn, "request", f"unknown request {op!r}")
        except StoreError as exc:
            await self._error(conn, exc.code, str(exc))

    async def _store(
        self, conn: AncillaryConnection, msg: AncillaryMessage, body: dict[str, object]
    ) -> None:
        fds = msg.take_fds()
        try:
            entry = self.store.add(
                check_name(body.get("name")), fds, body.get("timeout"), self._loop.time()
            )
        except StoreError as exc:
            close_all(fds)  # a refused store keeps nothing: the client still has its own
            await self._error(conn, exc.code, str(exc))
            return
        except BaseException:
            close_all(fds)
            raise
        logger.info(
            "stored %r: %d fd(s)%s",
            entry.name,
            len(fds),
            "" if entry.deadline is None else f", expires in {body.get('timeout')} s",
        )
        self._schedule_expiry()
        await conn.send(encode("ok"))

    async def _retrieve(self, conn: AncillaryConnection, body: dict[str, object]) -> None:
        name = check_name(body.get("name"))
        delete = body.get("delete") is True
        entry = self.store.claim(name, conn) if delete else self.store.get(name)
        await conn.send_fds(encode("fds", name=name, count=len(entry.fds), ack=delete), entry.fds)

    def _ack(self, conn: AncillaryConnection, body: dict[str, object]) -> None:
        name = body.get("name")
        entry = self.store.remove_claimed(name, conn) if isinstance(name, str) else None
        if entry is not None:
            close_all(entry.fds)  # the client confirmed it has its copies
            logger.info("retrieved and deleted %r (%d fd(s))", entry.name, len(entry.fds))
            self._schedule_expiry()

    # -- a successor's store ----------------------------------------------------------------

    def adopt(self, name: str, fds: Sequence[OwnedFd], expires_in: float | None) -> None:
        """Put an entry received from a predecessor in the store (the store owns ``fds``).

        Raises:
            StoreError: the entry does not fit this holder's bounds (``fds`` untouched).
        """
        self.store.add(name, fds, expires_in, self._loop.time())

    def __repr__(self) -> str:
        state = "closing" if self._closing is not None else "frozen" if self.frozen else "serving"
        return f"<Holder {state} {self.store!r}>"
