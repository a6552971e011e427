"""The fd holder's blocking client: :class:`FdHolderBlockingClient`.

The same requests and answers as the asyncio client (``_wire``), over a blocking socket: each
frame goes out with one ``sendmsg`` carrying its fds (the simplest conforming sender of the
framing protocol), and what ``recvmsg`` returns feeds the same :class:`FrameDecoder` the
asyncio transport uses, so received fds are owned, close-on-exec and matched to their frame.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import os
import socket
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from .._core._errors import ConnectionClosedError, FdHolderError
from .._core._fd import FdLike, OwnedFd
from .._core._framing import FrameDecoder, frame_header
from .._core._message import AncillaryMessage
from .._core._platform import current_platform
from .._kernel._blocking import send_fds
from .._kernel._syscalls import receive_into
from .._kernel._unix import Authorize, PathArg, check_peer, named_error
from ._client import check_request, fd_items, refused, unreachable
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
    """The blocking form of :class:`FdHolderClient`: the same requests, for code without a
    running event loop (scripts, a service's shutdown path, a forked child).

    Example::

        with FdHolderBlockingClient.connect("/run/fdholder.sock") as holder:
            holder.store("web", [listener])
            fds = holder.retrieve("web", delete=True)

    A request interrupted mid-exchange (timeout, signal) closes the connection.
    """

    def __init__(self, link: _Link, info: HolderInfo, path: str) -> None:
        """Use :meth:`connect`."""
        self._link: _Link | None = link
        self._info = info
        self._path = path

    @classmethod
    def connect(
        cls,
        path: PathArg,
        *,
        timeout: float = 10.0,
        authorize: Authorize | None = None,
    ) -> FdHolderBlockingClient:
        """Connect to the holder at ``path``; as :meth:`FdHolderClient.connect`.

        Raises:
            The same errors as :meth:`FdHolderClient.connect`.
        """
        fspath = os.fsdecode(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            try:
                sock.connect(fspath)
            except OSError as exc:
                raise unreachable(fspath, named_error(exc, fspath)) from exc
            check_peer(sock, authorize)
            link = _Link(sock)
        except BaseException:
            sock.close()
            raise
        try:
            link.send(encode("hello", versions=list(SUPPORTED_VERSIONS)))
            try:
                msg = link.recv()
            except ConnectionClosedError as exc:
                raise refused(fspath) from exc
            info = read_hello(msg)
        except BaseException:
            link.close()
            raise
        return cls(link, info, fspath)

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

    def _exchange(self, request: bytes, fds: Sequence[FdLike] = ()) -> AncillaryMessage:
        link = self._link
        if link is None:
            raise FdHolderError("this fd holder client is closed", code="closed")
        try:
            link.send(request, fds)
            return link.recv()
        except (ConnectionClosedError, BrokenPipeError, ConnectionResetError) as exc:
            self.close()
            raise FdHolderError(
                f"the connection to the fd holder at {self._path!r} ended ({exc}): it exited "
                "or handed its store to a new holder; connect again",
                code="closed",
            ) from exc
        except BaseException:
            self.close()  # the answer, if it comes, could not be matched any more
            raise

    def store(
        self, name: str, fds: FdLike | Sequence[FdLike], *, timeout: float | None = None
    ) -> None:
        """Store ``fds`` under ``name``; as :meth:`FdHolderClient.store`."""
        items = fd_items(fds)
        check_request(name, len(items), timeout)
        read_ok(self._exchange(encode("store", name=name, timeout=timeout), items))

    def retrieve(self, name: str, *, delete: bool = False) -> tuple[OwnedFd, ...]:
        """Get copies of the fds stored under ``name``; as :meth:`FdHolderClient.retrieve`."""
        check_request(name)
        fds, ack = read_fds(
            self._exchange(encode("retrieve", name=name, delete=bool(delete))), name
        )
        if ack and self._link is not None:
            # If this fails the holder keeps the entry; the caller has the fds all the same.
            with contextlib.suppress(OSError):
                self._link.send(encode("ack", name=name))
        return fds

    def list(self) -> builtins.list[FdHolderEntry]:
        """Every entry's name, fd count and seconds left; as :meth:`FdHolderClient.list`."""
        return read_entries(self._exchange(encode("list")))

    def delete(self, name: str) -> None:
        """Drop the entry ``name``; as :meth:`FdHolderClient.delete`."""
        check_request(name)
        read_ok(self._exchange(encode("delete", name=name)))

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
