"""The fd holder's blocking client: [`FdHolderBlockingClient`][aioancillary.FdHolderBlockingClient].

The same requests and answers as the asyncio client (``_wire``), over a blocking socket: each
frame goes out with one ``sendmsg`` carrying its fds (the simplest conforming sender of the
framing protocol), and what ``recvmsg`` returns feeds the same ``FrameDecoder`` the
asyncio transport uses, so received fds are owned, close-on-exec and matched to their frame.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self, TypeVar

from .._core._errors import ConnectionClosedError, FdHolderError
from .._core._fd import FdLike, OwnedFd
from .._core._framing import FrameDecoder, frame_header
from .._core._message import AncillaryMessage
from .._core._platform import current_platform
from .._kernel._blocking import send_fds
from .._kernel._syscalls import receive_into
from .._kernel._unix import Authorize, PathArg, check_peer, named_error
from ._client import check_request, closed_twice, fd_items, gone, refused, unreachable
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

__all__ = ["FdHolderBlockingClient"]

_T = TypeVar("_T")


class _Link:
    """Framed messages over a blocking socket (with a timeout on every call)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._platform = current_platform()
        self._decoder = FrameDecoder(max_frame_size=MAX_MESSAGE)
        self._ready: collections.deque[AncillaryMessage] = collections.deque()
        self._buffer = bytearray(65536)

    def send(self, data: bytes, fds: Sequence[FdLike] = ()) -> None:
        send_fds(self._sock, frame_header(len(fds), len(data)) + data, fds)

    def recv(self) -> AncillaryMessage:
        view = memoryview(self._buffer)
        while not self._ready:
            nbytes, fds, _ = receive_into(self._sock, view, 0, self._platform)
            if nbytes == 0 and not fds:
                self._decoder.eof()
                if self._decoder.failure is not None:
                    raise self._decoder.failure
                raise ConnectionClosedError("the fd holder closed the connection")
            self._ready.extend(self._decoder.feed(view[:nbytes], fds))
            if self._decoder.failure is not None and not self._ready:
                raise self._decoder.failure  # it closed every fd it held
        return self._ready.popleft()

    def close(self) -> None:
        while self._ready:
            self._ready.popleft().close()
        self._decoder.close()
        self._sock.close()


class FdHolderBlockingClient:
    """The blocking form of [`FdHolderClient`][aioancillary.FdHolderClient]: the same requests,
    for code without a running event loop (scripts, a service's shutdown path, a forked child).

    Example::

        with FdHolderBlockingClient.connect("/run/fdholder.sock") as holder:
            holder.store("web", [listener])
            fds = holder.retrieve("web", delete=True)

    Like the asyncio client it connects again once when the holder moved or closed the
    connection unanswered. A request interrupted mid-exchange (timeout, signal) closes the
    connection.
    """

    def __init__(
        self, link: _Link, info: HolderInfo, path: str, timeout: float, authorize: Authorize | None
    ) -> None:
        """Use ``connect``."""
        self._link: _Link | None = link
        self._info = info
        self._path = path
        self._timeout = timeout
        self._authorize = authorize

    @classmethod
    def connect(
        cls,
        path: PathArg,
        *,
        timeout: float = 10.0,
        authorize: Authorize | None = None,
    ) -> FdHolderBlockingClient:
        """Connect to the holder at ``path``; as
        [`FdHolderClient.connect`][aioancillary.FdHolderClient.connect], which also says what
        it raises.
        """
        fspath = os.fsdecode(path)
        link, info = _open(fspath, timeout, authorize)
        return cls(link, info, fspath, timeout, authorize)

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

    def _roundtrip(self, request: bytes, fds: Sequence[FdLike]) -> AncillaryMessage:
        link = self._link
        if link is None:
            raise FdHolderError("this fd holder client is closed", code="closed")
        try:
            link.send(request, fds)
            return link.recv()
        except (ConnectionClosedError, BrokenPipeError, ConnectionResetError) as exc:
            self.close()
            raise ConnectionClosedError(str(exc)) from exc
        except BaseException:
            self.close()  # the answer, if it comes, could not be matched any more
            raise

    def _request(
        self, request: bytes, read: Callable[[AncillaryMessage], _T], fds: Sequence[FdLike] = ()
    ) -> _T:
        """As [`FdHolderClient._request`][aioancillary.FdHolderClient._request]."""
        if self._link is None:
            raise FdHolderError("this fd holder client is closed", code="closed")
        try:
            return read(self._roundtrip(request, fds))
        except FdHolderError as exc:
            if exc.code != "moved":
                raise
        except ConnectionClosedError:
            pass
        self.close()
        try:
            self._link, self._info = _open(self._path, self._timeout, self._authorize)
        except OSError as exc:
            raise gone(self._path, exc) from exc
        try:
            return read(self._roundtrip(request, fds))
        except ConnectionClosedError as exc:
            raise closed_twice(self._path) from exc

    def store(
        self, name: str, fds: FdLike | Sequence[FdLike], *, timeout: float | None = None
    ) -> None:
        """Store ``fds`` under ``name``; as
        [`FdHolderClient.store`][aioancillary.FdHolderClient.store]."""
        items = fd_items(fds)
        check_request(name, len(items), timeout)
        self._request(encode("store", name=name, timeout=timeout), read_ok, items)

    def retrieve(self, name: str, *, delete: bool = False) -> tuple[OwnedFd, ...]:
        """Get copies of the fds stored under ``name``; as
        [`FdHolderClient.retrieve`][aioancillary.FdHolderClient.retrieve]."""
        check_request(name)
        request = encode("retrieve", name=name, delete=bool(delete))
        fds, ack = self._request(request, lambda msg: read_fds(msg, name))
        if ack and self._link is not None:
            # If this fails the holder keeps the entry; the caller has the fds all the same.
            with contextlib.suppress(OSError):
                self._link.send(encode("ack", name=name))
        return fds

    def list(self) -> builtins.list[FdHolderEntry]:
        """Every entry's name, fd count and seconds left; as
        [`FdHolderClient.list`][aioancillary.FdHolderClient.list]."""
        return self._request(encode("list"), read_entries)

    def delete(self, name: str) -> None:
        """Drop the entry ``name``; as
        [`FdHolderClient.delete`][aioancillary.FdHolderClient.delete]."""
        check_request(name)
        self._request(encode("delete", name=name), read_ok)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FdHolderBlockingClient {self._path!r} holder_pid={self._info.pid}>"


def _open(path: str, timeout: float, authorize: Authorize | None) -> tuple[_Link, HolderInfo]:
    """A connection to the holder at ``path``, past ``hello``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise unreachable(path, named_error(exc, path)) from exc
        check_peer(sock, authorize)
        link = _Link(sock)
    except BaseException:
        sock.close()
        raise
    try:
        try:
            link.send(encode("hello", versions=list(SUPPORTED_VERSIONS)))
            msg = link.recv()
        except (ConnectionClosedError, ConnectionResetError, BrokenPipeError) as exc:
            # Closed unanswered: refused at accept (a reset, when our hello was still unread).
            raise refused(path) from exc
        return link, read_hello(msg)
    except BaseException:
        link.close()
        raise
