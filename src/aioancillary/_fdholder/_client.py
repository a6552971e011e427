"""The fd holder's asyncio client: [`FdHolderClient`][aioancillary.FdHolderClient]."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from .._asyncio._client import open_unix_connection
from .._asyncio._closing import AsyncClosing
from .._asyncio._connection import AncillaryConnection
from .._core._errors import (
    ConnectionClosedError,
    FdHolderError,
    FdHolderRefusedError,
    TooManyFdsError,
)
from .._core._fd import FdLike, OwnedFd
from .._core._message import AncillaryMessage
from .._core._platform import SCM_MAX_FD
from .._kernel._unix import Authorize, PathArg
from ._store import StoreError, check_name, check_timeout
from ._wire import (
    MAX_MESSAGE,
    SUPPORTED_VERSIONS,
    FdHolderEntry,
    HolderInfo,
    encode,
    read_entries,
    read_fds,
    read_hello,
    read_ok,
)

__all__ = [
    "FdHolderClient",
    "check_request",
    "closed_twice",
    "fd_items",
    "gone",
    "refused",
    "unreachable",
]

_T = TypeVar("_T")


def fd_items(fds: FdLike | Sequence[FdLike]) -> list[FdLike]:
    """``fds`` as a list: one fd, or a sequence of them."""
    if isinstance(fds, Sequence):
        return list(fds)
    return [fds]


def check_request(name: str, fd_count: int | None = None, timeout: object = None) -> None:
    """Refuse, before anything is sent, what the holder would refuse.

    Raises:
        ValueError: a bad name, no fds, or a bad timeout.
        TooManyFdsError: more fds than one entry holds.
    """
    try:
        check_name(name)
        check_timeout(timeout)
    except StoreError as exc:
        raise ValueError(str(exc)) from None
    if fd_count is not None and fd_count < 1:
        raise ValueError(f"store {name!r}: give at least one fd")
    if fd_count is not None and fd_count > SCM_MAX_FD:
        raise TooManyFdsError(
            f"store {name!r}: {fd_count} fds, but an entry holds at most {SCM_MAX_FD} (one "
            "message); store them under several names"
        )


def unreachable(path: str, exc: OSError) -> OSError:
    """The error for a failed connect: a permission problem says what the holder admits."""
    if isinstance(exc, PermissionError):
        return FdHolderRefusedError(
            f"cannot connect to the fd holder at {path!r}: {exc.strerror}. Its socket file "
            "admits only its owner unless the holder was started with --allow-uid/--allow-gid "
            "(and the directory must be reachable)",
            code="denied",
        )
    return exc


def gone(path: str, exc: OSError) -> FdHolderError:
    """The error for a connection that ended unanswered, with no holder to connect to again."""
    return FdHolderError(
        f"the connection to the fd holder at {path!r} ended, and no holder answers there now "
        f"({exc}): it exited, and its store with it",
        code="closed",
    )


def closed_twice(path: str) -> FdHolderError:
    """The error for a request that a fresh connection could not get answered either."""
    return FdHolderError(
        f"the fd holder at {path!r} closed the connection twice without answering: it is exiting",
        code="closed",
    )


def refused(path: str) -> FdHolderRefusedError:
    """The error for a holder that closed the connection before answering ``hello``."""
    return FdHolderRefusedError(
        f"the fd holder at {path!r} closed the connection before answering: it does not admit "
        f"this process (uid {os.geteuid()}, gid {os.getegid()}; a holder admits its own user, "
        "root, and the uids/gids given with --allow-uid/--allow-gid), or it is shutting down. "
        "No fd was sent",
        code="denied",
    )


class FdHolderClient(AsyncClosing):
    """A connection to an fd holder (``python -m aioancillary fdholder``).

    Example::

        async with await FdHolderClient.connect("/run/fdholder.sock") as holder:
            await holder.store("web", [listener])            # the holder keeps a copy
            (web,) = await holder.retrieve("web", delete=True)
            for entry in await holder.list():
                print(entry.name, entry.fd_count, entry.expires_in)

    Requests are answered one at a time, in order; concurrent calls from several tasks wait
    their turn. When the holder is replaced by a new one (a takeover) or its connection ends
    before a request is answered, the client connects again once and repeats the request:
    a holder that closes a connection unanswered has carried nothing out, or has exited with
    its whole store. A request interrupted mid-exchange (cancelled, timed out) closes the
    connection: its answer could no longer be matched.
    """

    def __init__(
        self,
        conn: AncillaryConnection,
        info: HolderInfo,
        path: str,
        timeout: float,
        authorize: Authorize | None,
    ) -> None:
        """Use ``connect``."""
        self._conn = conn
        self._info = info
        self._path = path
        self._timeout = timeout
        self._authorize = authorize
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        path: PathArg,
        *,
        # Bounds each exchange, later ones too: one asyncio.timeout() around connect() could not.
        timeout: float = 10.0,  # noqa: ASYNC109
        authorize: Authorize | None = None,
    ) -> FdHolderClient:
        """Connect to the holder at ``path`` and agree on a protocol version.

        Args:
            path: The holder's socket (``--socket``): a path, or ``"\\0name"`` (abstract).
            timeout: Seconds the connection and each later exchange may take (a holder
                answers at once: this only guards against a stuck or wrong peer).
            authorize: Checks the holder's credentials before anything is sent (e.g.
                [`root_or_same_user`][aioancillary.root_or_same_user]); by default the
                socket's path is trusted.

        Raises:
            FdHolderRefusedError: the holder does not admit this process; no fd was sent.
            FdHolderError: the peer is not a compatible fd holder.
            OSError: nothing listens at ``path`` (``FileNotFoundError``,
                ``ConnectionRefusedError``).
            TimeoutError: no answer within ``timeout``.
        """
        fspath = os.fsdecode(path)
        conn, info = await _open(fspath, timeout, authorize)
        return cls(conn, info, fspath, timeout, authorize)

    @property
    def holder_pid(self) -> int:
        """The pid of the holder process this client talks to."""
        return self._info.pid

    @property
    def max_entries(self) -> int:
        """The holder's bound on entries."""
        return self._info.max_entries

    @property
    def max_fds(self) -> int:
        """The holder's bound on fds, all entries together."""
        return self._info.max_fds

    async def _roundtrip(self, request: bytes, fds: Sequence[FdLike]) -> AncillaryMessage:
        try:
            async with asyncio.timeout(self._timeout):
                await self._conn.send_fds(request, fds)
                return await self._conn.recv()
        except ConnectionClosedError:
            raise
        except BaseException:
            self._conn.abort()  # the answer, if it comes, could not be matched any more
            raise

    async def _request(
        self, request: bytes, read: Callable[[AncillaryMessage], _T], fds: Sequence[FdLike] = ()
    ) -> _T:
        """Send one request and read its answer; once more on a new connection if the holder
        moved or closed this one unanswered."""
        async with self._lock:
            try:
                return read(await self._roundtrip(request, fds))
            except FdHolderError as exc:
                if exc.code != "moved":
                    raise
            except ConnectionClosedError:
                pass
            self._conn.abort()
            try:
                self._conn, self._info = await _open(self._path, self._timeout, self._authorize)
            except OSError as exc:
                raise gone(self._path, exc) from exc
            try:
                return read(await self._roundtrip(request, fds))
            except ConnectionClosedError as exc:
                raise closed_twice(self._path) from exc

    async def store(
        self,
        name: str,
        fds: FdLike | Sequence[FdLike],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the entry's lifetime, not this call's
    ) -> None:
        """Store ``fds`` in the holder under ``name``; the holder keeps its own copies.

        The fds are borrowed: they stay open here (close them when you like).

        Args:
            name: The entry's name: systemd's ``FDNAME=`` rule (printable ASCII without
                ``:``, at most 255 characters), not empty.
            fds: One fd, or up to 253 (files, sockets, ``OwnedFd``, ints).
            timeout: Seconds after which the holder closes the entry; ``None``: never.

        Raises:
            ValueError: a bad name or timeout, or no fd (nothing sent).
            TooManyFdsError: more than 253 fds.
            FdHolderExistsError: the name is taken.
            FdHolderFullError: the store is at its bound.
            FdHolderError: another refusal; the holder closed the fds it was sent.
        """
        items = fd_items(fds)
        check_request(name, len(items), timeout)
        await self._request(encode("store", name=name, timeout=timeout), read_ok, items)

    async def retrieve(self, name: str, *, delete: bool = False) -> tuple[OwnedFd, ...]:
        """Get copies of the fds stored under ``name``: the same open files, owned by you.

        With ``delete=True`` the holder drops the entry once this client has the fds (if
        this process dies before, the entry stays).

        Raises:
            FdHolderNotFoundError: no such entry.
            FdHolderError: another refusal (``busy``: another client is retrieving it with
                ``delete=True``).
        """
        check_request(name)
        request = encode("retrieve", name=name, delete=bool(delete))
        fds, ack = await self._request(request, lambda msg: read_fds(msg, name))
        if ack:
            # If this fails the holder keeps the entry; the caller has the fds all the same.
            with contextlib.suppress(ConnectionClosedError):
                await self._conn.send(encode("ack", name=name))
        return fds

    async def list(self) -> builtins.list[FdHolderEntry]:
        """Every entry's name, fd count and seconds left before it expires, by name."""
        return await self._request(encode("list"), read_entries)

    async def delete(self, name: str) -> None:
        """Drop the entry ``name``; the holder closes its fds.

        Raises:
            FdHolderNotFoundError: no such entry.
        """
        check_request(name)
        await self._request(encode("delete", name=name), read_ok)

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn.close()
        await self._conn.wait_closed()

    async def _close_and_wait(self, cancelled: bool) -> None:
        """``async with``'s exit (AsyncClosing): close, then wait until closed."""
        await self.close()

    def __repr__(self) -> str:
        return f"<FdHolderClient {self._path!r} holder_pid={self._info.pid}>"


async def _open(
    path: str, step: float, authorize: Authorize | None
) -> tuple[AncillaryConnection, HolderInfo]:
    """A connection to the holder at ``path``, past ``hello``; ``step`` bounds each wait."""
    try:
        async with asyncio.timeout(step):
            conn = await open_unix_connection(
                path, authorize=authorize, max_message_size=MAX_MESSAGE, max_queued_fds=SCM_MAX_FD
            )
    except OSError as exc:
        raise unreachable(path, exc) from exc
    try:
        async with asyncio.timeout(step):
            try:
                await conn.send(encode("hello", versions=list(SUPPORTED_VERSIONS)))
                msg = await conn.recv()
            except ConnectionClosedError as exc:
                raise refused(path) from exc  # closed unanswered: refused at accept
        return conn, read_hello(msg)
    except BaseException:
        conn.abort()
        raise
