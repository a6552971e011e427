"""Zero-downtime reload: a running generation hands its named fds to its successor.

Each server process is one *generation*. It gets its fds (listening sockets, other sockets,
files) by name from its predecessor, or from systemd socket activation when it is the first,
serves, and offers them on a handoff Unix socket to whoever comes next::

    successor                                   running generation
    ---------                                   ------------------
    connect(path)  --------------------------->  accept; authorize (same uid by default)
    {"op": "hello", "version": 1, "pid": P}  -->
                   <--------------------------  {"op": "fds", "names": [...], "last": true}
                                                 + the fds (SCM_RIGHTS), 253 per message at
                                                 most; "last": false when more follow
    take fds by name, start serving
    {"op": "ready"} -------------------------->  close the handoff socket (the path is free)
                   <--------------------------  {"op": "released"}
    bind the handoff path, offer to the next     stop accepting (close only its own copies),
    (connection kept open)                       finish in-flight work, exit: EOF
    EOF: predecessor gone, upgrades allowed

Every message is one framed aioancillary message holding one JSON object; fds ride with the
``fds`` messages only. Instead of ``fds`` the running generation may answer ``{"op": "busy",
"reason": ...}`` (an upgrade is in progress, or its own predecessor is still draining) and
close; instead of ``released`` it may send ``{"op": "abort", "reason": ...}`` (the successor
was not ready in time) and close.

Failure handling: until the running generation has read ``ready`` it serves as before. A successor
that dies, stalls or sends garbage at any step only loses its own copies of the fds: the running
generation closes that connection, logs why, and waits for the next successor. A successor whose
predecessor does not answer in time gets [`HandoffTimeoutError`][aioancillary.HandoffTimeoutError]
and holds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

from .._asyncio._client import open_unix_connection
from .._asyncio._connection import AncillaryConnection
from .._asyncio._server import AncillaryServer, start_unix_server
from .._core._errors import (
    AncillaryError,
    ConnectionClosedError,
    HandoffBusyError,
    HandoffError,
    HandoffTimeoutError,
)
from .._core._fd import FdLike, OwnedFd, close_all
from .._core._message import AncillaryMessage
from .._core._platform import SCM_MAX_FD
from .._kernel._authorize import same_user
from .._kernel._unix import Authorize
from ._systemd import NamedFds, check_fdname, listen_fds

__all__ = [
    "Generation",
    "HandoffBusyError",
    "HandoffError",
    "HandoffTimeoutError",
    "start_generation",
]

logger = logging.getLogger("aioancillary")

PROTOCOL_VERSION = 1
#: Largest handoff message: 253 names of at most 255 characters fit many times over.
_MAX_MESSAGE = 1 << 20


class _PeerGone(HandoffError):
    """The peer closed the handoff connection (end of stream)."""


def _encode(op: str, **fields: Any) -> bytes:
    return json.dumps({"op": op, **fields}, separators=(",", ":")).encode()


def _decode(msg: AncillaryMessage, expected: tuple[str, ...]) -> dict[str, Any]:
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


async def _recv(conn: AncillaryConnection, timeout: float, step: str) -> AncillaryMessage:
    try:
        async with asyncio.timeout(timeout):
            return await conn.recv()  # a cancelled recv() loses no message
    except TimeoutError:
        raise HandoffTimeoutError(f"no answer within {timeout} s while {step}") from None
    except ConnectionClosedError as exc:
        raise _PeerGone(f"the peer closed the handoff connection while {step}") from exc


def _fd_list(fds: FdLike | Sequence[FdLike]) -> list[FdLike]:
    if isinstance(fds, Sequence):
        return list(fds)
    return [fds]


class Generation:
    """One generation of a server: inherits named fds, offers them to its successor.

    Made by [`start_generation`][aioancillary.start_generation], which has already fetched the fds
    of the predecessor (or of systemd). Then:

    1. take what you need by name with [`take_socket`][aioancillary.Generation.take_socket] /
       [`take_fd`][aioancillary.Generation.take_fd] (each also offers the fd to the next
       generation), or [`offer`][aioancillary.Generation.offer] anything else;
    2. start serving, then ``await`` [`ready`][aioancillary.Generation.ready]: the predecessor is
       told, inherited fds nobody took are closed, and the handoff socket opens for the next
       generation;
    3. ``await`` [`handed_over`][aioancillary.Generation.handed_over] (it returns when a successor
       is serving), stop accepting, finish in-flight connections within your deadline, and
       [`close`][aioancillary.Generation.close].

    Example::

        gen = await start_generation("/run/app/handoff.sock")
        web = gen.take_socket("web", create=lambda: socket.create_server(("127.0.0.1", 8080)))
        server = await asyncio.start_server(handle, sock=web)
        await gen.ready()
        await gen.handed_over()          # a successor now accepts on the same socket
        server.close()                   # stop accepting: closes only this process's copy
        ...                              # finish in-flight connections, with a deadline
        await gen.close()
    """

    def __init__(
        self,
        path: str,
        inherited: NamedFds,
        predecessor: AncillaryConnection | None,
        *,
        authorize: Authorize | None,
        timeout: float,
        ready_timeout: float,
    ) -> None:
        """Use [`start_generation`][aioancillary.start_generation]."""
        self._path = path
        self._inherited = inherited
        self._predecessor = predecessor
        creds = predecessor.peercred if predecessor is not None else None
        self._predecessor_pid = creds.pid if creds is not None else None
        self._authorize = authorize
        self._timeout = timeout
        self._ready_timeout = ready_timeout
        self._offered: dict[str, tuple[OwnedFd, ...]] = {}
        self._state = "starting"  # -> serving <-> handing-over -> handed-over; closed
        self._server: AncillaryServer | None = None
        self._handed_over = asyncio.Event()
        self._closing = asyncio.Event()
        self._predecessor_gone = asyncio.Event()
        if predecessor is None:
            self._predecessor_gone.set()
        self._watcher: asyncio.Task[None] | None = None

    # -- what the generation holds ----------------------------------------------------------

    @property
    def inherited(self) -> NamedFds:
        """The fds received and not yet taken (``inherited.source`` says from where)."""
        return self._inherited

    @property
    def predecessor_pid(self) -> int | None:
        """The pid of the generation that handed its fds over, or ``None``."""
        return self._predecessor_pid

    @property
    def offered(self) -> list[str]:
        """The names this generation will hand to its successor."""
        return list(self._offered)

    def offer(self, name: str, fds: FdLike | Sequence[FdLike]) -> None:
        """Offer ``fds`` to the next generation under ``name`` (one fd or several).

        A close-on-exec duplicate of each is kept until the handoff or
        [`close`][aioancillary.Generation.close], so the caller's objects may be closed at any time
        (``asyncio.Server.close()`` closes the socket it was given).

        Raises:
            ValueError: the name is already offered (names are unique per generation), is not
                a valid fd name, or ``fds`` is empty.
            InvalidFdError: an fd is not open.
        """
        if self._state in ("handed-over", "closed"):
            raise RuntimeError(f"this generation is {self._state}: it offers nothing more")
        check_fdname(name)
        if name in self._offered:
            raise ValueError(
                f"{name!r} is already offered: a name identifies one set of fds (offer "
                "several fds under one name in a single call)"
            )
        items = _fd_list(fds)
        if not items:
            raise ValueError(f"no fd to offer under {name!r}")
        dups: list[OwnedFd] = []
        try:
            for fd in items:
                dups.append(OwnedFd.dup_of(fd))
        except BaseException:
            close_all(dups)
            raise
        self._offered[name] = tuple(dups)

    def take_socket(
        self,
        name: str,
        create: Callable[[], socket.socket] | None = None,
        *,
        family: int | None = None,
        type: int | None = None,
    ) -> socket.socket:
        """Take the inherited socket ``name``, or ``create()`` it; offer it to the next one.

        "Inherit by name, or bind if absent" in one call: the first generation binds (or gets
        the socket from systemd under its ``FileDescriptorName=``), every later one inherits
        it, so no generation ever binds while another holds the port.

        Raises:
            FdNameError: nothing inherited under ``name`` and no ``create``, or several fds.
            FdTypeError: the inherited fd is not a socket of ``family``/``type``.
            ValueError: ``name`` is already offered.
        """
        if name in self._offered:
            raise ValueError(f"{name!r} is already offered by this generation")
        sock = self._inherited.take_socket(name, family=family, type=type, create=create)
        try:
            self.offer(name, sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def take_fd(self, name: str, create: Callable[[], OwnedFd] | None = None) -> OwnedFd:
        """Take the inherited fd ``name`` (a file, a pipe...), or ``create()`` it; offer it.

        Example::

            state = gen.take_fd("state", create=lambda: OwnedFd(os.memfd_create("state")))

        Raises:
            FdNameError: nothing inherited under ``name`` and no ``create``, or several fds.
            ValueError: ``name`` is already offered.
        """
        if name in self._offered:
            raise ValueError(f"{name!r} is already offered by this generation")
        if create is not None and name not in self._inherited:
            fd = create()
        else:
            fd = self._inherited.take_fd(name)
        try:
            self.offer(name, fd)
        except BaseException:
            fd.close()
            raise
        return fd

    # -- the successor's side ---------------------------------------------------------------

    async def ready(self) -> None:
        """Declare this generation ready: it serves on the fds it took.

        Closes the inherited fds nobody took; tells the predecessor, which stops accepting
        and releases the handoff path; then listens on that path for the next generation.

        Raises:
            HandoffError: the predecessor gave up (it timed out waiting and keeps serving):
                close the sockets you took and exit.
            HandoffTimeoutError: the predecessor did not confirm in time; it may still be
                accepting on the same sockets.
        """
        if self._state != "starting":
            raise RuntimeError(f"ready() was already called (this generation is {self._state})")
        self._state = "committing"
        unclaimed = self._inherited.close()
        if unclaimed:
            logger.warning("closed inherited fd(s) nobody took: %s", unclaimed)
        conn = self._predecessor
        if conn is not None:
            try:
                await self._confirm(conn)
            except BaseException:
                self._state = "failed"
                raise
            self._watcher = asyncio.get_running_loop().create_task(self._watch(conn))
        try:
            self._server = await start_unix_server(
                self._on_successor, self._path, authorize=self._authorize
            )
        except BaseException:
            self._state = "failed"
            raise
        self._state = "serving"

    async def _confirm(self, conn: AncillaryConnection) -> None:
        # A send to a predecessor that already closed fails, but its last message (an
        # "abort") is still delivered: read before concluding anything.
        with contextlib.suppress(ConnectionClosedError):
            await conn.send(_encode("ready"))
        try:
            msg = await _recv(conn, self._timeout, "waiting for the predecessor to release")
        except _PeerGone:
            # End of stream without an answer: the predecessor process is gone, and with it
            # its copies of the fds. This generation holds the only ones: it serves.
            logger.warning("the predecessor exited before confirming; this generation serves")
            return
        with msg:
            reply = _decode(msg, ("released", "abort"))
        if reply["op"] == "abort":
            raise HandoffError(
                f"the running generation gave up this handoff ({reply.get('reason')}) and "
                "keeps serving: close the sockets taken from it and exit"
            )

    async def _watch(self, conn: AncillaryConnection) -> None:
        # The predecessor keeps the connection open while it drains: its EOF means it exited.
        try:
            async for msg in conn:
                msg.close()  # nothing is expected after "released"
        except (AncillaryError, OSError) as exc:
            logger.debug("handoff connection to the predecessor ended: %s", exc)
        finally:
            conn.close()
            self._predecessor_gone.set()

    # -- the running generation's side ------------------------------------------------------

    def _busy_reason(self) -> str | None:
        if self._state == "handing-over":
            return "another successor is taking over right now"
        if self._state != "serving":
            return f"this generation is {self._state}"
        if not self._predecessor_gone.is_set():
            return (
                f"its predecessor (pid {self._predecessor_pid}) is still finishing its "
                "connections; retry once it has exited"
            )
        return None

    async def _on_successor(self, conn: AncillaryConnection) -> None:
        reason = self._busy_reason()
        if reason is not None:
            logger.warning("refused an upgrade from pid %s: %s", _pid(conn), reason)
            await conn.send(_encode("busy", reason=reason, pid=os.getpid()))
            return
        self._state = "handing-over"  # set before any await: a second successor is refused
        done = False
        try:
            await self._hand_over(conn)
            done = True
        except (AncillaryError, OSError) as exc:
            logger.warning("handoff to pid %s failed, still serving: %s", _pid(conn), exc)
        finally:
            if not done and self._state == "handing-over":
                self._state = "serving"
        if done:
            await self._closing.wait()  # hold the connection: the successor sees EOF when we exit

    async def _hand_over(self, conn: AncillaryConnection) -> None:
        with await _recv(conn, self._timeout, "waiting for the successor's hello") as msg:
            hello = _decode(msg, ("hello",))
        if hello.get("version") != PROTOCOL_VERSION:
            reason = f"protocol version {hello.get('version')!r} is not {PROTOCOL_VERSION}"
            await conn.send(_encode("abort", reason=reason))
            raise HandoffError(f"successor speaks {reason}")
        items = [(name, fd) for name, fds in self._offered.items() for fd in fds]
        for start in range(0, max(len(items), 1), SCM_MAX_FD):
            chunk = items[start : start + SCM_MAX_FD]
            last = start + SCM_MAX_FD >= len(items)
            names = [name for name, _ in chunk]
            await conn.send_fds(_encode("fds", names=names, last=last), [fd for _, fd in chunk])
        try:
            msg = await _recv(conn, self._ready_timeout, "waiting for the successor to be ready")
        except HandoffTimeoutError as exc:
            await conn.send(_encode("abort", reason=str(exc)))
            raise
        with msg:
            _decode(msg, ("ready",))
        # The commit point: the successor serves. Free the path so that it can offer upgrades.
        self._state = "handed-over"
        if self._server is not None:
            self._server.close(unlink=False)
        await conn.send(_encode("released"))
        self._handed_over.set()
        logger.info("handed over to pid %s", _pid(conn))

    async def handed_over(self) -> None:
        """Wait until a successor has taken over and is serving.

        Then stop accepting (closing your copies of the listeners: the successor has its own),
        finish in-flight connections within your deadline, and
        [`close`][aioancillary.Generation.close].
        """
        await self._handed_over.wait()

    async def predecessor_exited(self) -> None:
        """Wait until the predecessor has closed its end (it exited, or called ``close()``).

        Until then this generation refuses upgrades: a third generation must not start while
        the first still drains (returns at once for a first generation).
        """
        await self._predecessor_gone.wait()

    def is_handed_over(self) -> bool:
        """True once a successor has declared itself ready."""
        return self._handed_over.is_set()

    # -- closing ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every fd this generation holds and its handoff socket; idempotent.

        After a handoff this is what lets the successor accept the next upgrade (it waits for
        this process's connection to end). Without a handoff the handoff socket file is
        removed.
        """
        if self._state == "closed":
            return
        self._state = "closed"
        self._inherited.close()
        offered, self._offered = self._offered, {}
        close_all(fd for fds in offered.values() for fd in fds)
        self._closing.set()
        if self._server is not None:
            self._server.close()  # a no-op after the handoff: the path is the successor's
            self._server.close_clients()  # a successor mid-handoff gets EOF: it holds nothing
            await self._server.wait_closed()
        if self._predecessor is not None:
            self._predecessor.close()
            await self._predecessor.wait_closed()
        if self._watcher is not None:
            await self._watcher

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return (
            f"<Generation {self._path!r} {self._state} from={self._inherited.source} "
            f"offered={list(self._offered)}>"
        )


def _pid(conn: AncillaryConnection) -> int | str:
    creds = conn.peercred
    return creds.pid if creds is not None else "?"


async def _fetch(conn: AncillaryConnection, timeout: float) -> NamedFds:
    """The successor's half of the handshake: hello, then the named fds."""
    items: list[tuple[str, OwnedFd]] = []
    try:
        await conn.send(_encode("hello", version=PROTOCOL_VERSION, pid=os.getpid()))
        last = False
        while not last:
            with await _recv(conn, timeout, "waiting for the running generation's fds") as msg:
                reply = _decode(msg, ("fds", "busy"))
                if reply["op"] == "busy":
                    raise HandoffBusyError(
                        f"the running generation (pid {reply.get('pid')}) refused the upgrade: "
                        f"{reply.get('reason')}. Nothing was taken; retry later"
                    )
                names = reply.get("names")
                if (
                    not isinstance(names, list)
                    or len(names) != len(msg.fds)
                    or not all(isinstance(name, str) for name in names)
                ):
                    raise HandoffError(
                        f"handoff protocol error: {len(msg.fds)} fd(s) arrived with names "
                        f"{names!r}; every fd needs exactly one name"
                    )
                for name in names:
                    try:
                        check_fdname(name)
                    except ValueError as exc:
                        raise HandoffError(f"handoff protocol error: {exc}") from None
                items.extend(zip(names, msg.take_fds(), strict=True))
                last = reply.get("last") is True
    except _PeerGone as exc:
        close_all(fd for _, fd in items)
        raise HandoffError(
            "the running generation closed the handoff connection before handing its fds over "
            "(its authorize callback refused this process, or it exited); nothing was taken"
        ) from exc
    except BaseException:
        close_all(fd for _, fd in items)  # a failed handoff leaves nothing open here
        raise
    return NamedFds(items, "predecessor")


async def start_generation(
    path: str | os.PathLike[str],
    *,
    authorize: Authorize | None = same_user,
    timeout: float = 10.0,
    ready_timeout: float = 60.0,
    systemd: bool = True,
) -> Generation:
    """Start a server generation: fetch the named fds of the running one, if any.

    If a generation listens on the handoff socket ``path``, its fds are fetched (it keeps serving
    until this one calls [`Generation.ready`][aioancillary.Generation.ready]). Otherwise this is the
    first
    generation: its fds come from systemd socket activation
        ([`listen_fds`][aioancillary.listen_fds]) when the
    process was activated, else it has none and creates them (``create=``).

    Example::

        async with await start_generation("/run/app/handoff.sock") as gen:
            web = gen.take_socket("web", create=lambda: socket.create_server(("", 8080)))
            ...

    Args:
        path: The handoff socket (a filesystem path; created with mode 0600).
        authorize: Checks the peer on both sides of a handoff, before any fd moves; the
            default accepts only processes of the same user.
        timeout: Seconds each handoff step may take (connect, hello, fds, release).
        ready_timeout: Seconds a running generation waits for its successor's ``ready``
            after sending the fds; then it aborts that handoff and keeps serving.
        systemd: Adopt ``LISTEN_FDS`` when there is no running generation.

    Raises:
        HandoffBusyError: the running generation is busy with another upgrade, or its
            predecessor still drains; nothing was taken: retry later.
        HandoffError: the running generation closed the connection or broke the protocol;
            nothing was taken.
        HandoffTimeoutError: it did not answer within ``timeout``; nothing was taken.
        PeerRejectedError: ``authorize`` refused the running generation.
        ActivationError: the systemd variables are for another process or malformed.
    """
    fspath = os.fspath(path)
    try:
        async with asyncio.timeout(timeout):
            conn = await open_unix_connection(
                fspath, authorize=authorize, max_message_size=_MAX_MESSAGE
            )
    except (FileNotFoundError, ConnectionRefusedError):
        # Nobody serves there (no file, or a stale one): this is the first generation.
        inherited = listen_fds() if systemd else NamedFds()
        return Generation(
            fspath,
            inherited,
            None,
            authorize=authorize,
            timeout=timeout,
            ready_timeout=ready_timeout,
        )
    except TimeoutError:
        raise HandoffTimeoutError(
            f"connecting to the running generation at {fspath!r} took over {timeout} s "
            "(its backlog is full: is it stuck?); nothing was taken"
        ) from None
    try:
        inherited = await _fetch(conn, timeout)
    except BaseException:
        conn.abort()
        with contextlib.suppress(Exception):
            await conn.wait_closed()
        raise
    return Generation(
        fspath,
        inherited,
        conn,
        authorize=authorize,
        timeout=timeout,
        ready_timeout=ready_timeout,
    )
