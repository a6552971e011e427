"""Zero-downtime reload: a running generation hands its named fds to its successor.

Each server process is one *generation*. It gets its fds (listening sockets, other sockets,
files) by name from its predecessor, or from systemd socket activation when it is the first,
serves, and offers them on a handoff Unix socket to whoever comes next::

    successor                                   running generation
    ---------                                   ------------------
    connect(path)  --------------------------->  accept; authorize (same uid by default)
    {"op": "hello", "version": 1, "pid": P}  -->  (only a valid hello makes a successor)
                   <--------------------------  {"op": "fds", "names": [...], "last": true}
                                                 + the fds (SCM_RIGHTS), 253 per message at
                                                 most; "last": false when more follow
    take fds by name, start serving
    {"op": "ready"} -------------------------->  close the handoff socket (the path is free)
                   <--------------------------  {"op": "released"}
    bind the handoff path, offer to the next     stop accepting (close only its own copies),
    (connection kept open)                       finish in-flight work, exit: EOF
    EOF: predecessor gone, upgrades allowed

Every message is one framed aioancillary message holding one JSON object (``_reload_wire``);
fds ride with the ``fds`` messages only. Instead of ``fds`` the running generation may answer
``{"op": "busy", "reason": ...}`` (an upgrade is in progress, or its own predecessor is still
draining) and close; instead of ``released`` it may send ``{"op": "abort", "reason": ...}``
(the successor was not ready in time) and close.

Failure handling: until the running generation has read ``ready`` it serves as before
(``_reload_offer``). A peer that says nothing, or garbage, delays nobody; a successor that
dies, stalls or sends garbage at any step only loses its own copies of the fds. A successor
whose predecessor does not hand its fds over in time, or sends more than it accepts, gets an
error and holds nothing (``_reload_fetch``). The states and their moves: ``_reload_state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Sequence

from .._asyncio._closing import AsyncClosing
from .._asyncio._connection import AncillaryConnection
from .._core._errors import (
    FdTypeError,
    HandoffBusyError,
    HandoffError,
    HandoffTimeoutError,
)
from .._core._fd import FdLike, OwnedFd, close_all
from .._kernel._authorize import same_user
from .._kernel._unix import Authorize
from ._reload_fetch import confirm, connect, fetch, watch
from ._reload_offer import Offering
from ._reload_state import GenerationState, GenerationStates
from ._systemd import NamedFds, listen_fds

__all__ = [
    "Generation",
    "HandoffBusyError",
    "HandoffError",
    "HandoffTimeoutError",
    "start_generation",
]

logger = logging.getLogger("aioancillary")

_S = GenerationState


def _fd_list(fds: FdLike | Sequence[FdLike]) -> list[FdLike]:
    if isinstance(fds, Sequence):
        return list(fds)
    return [fds]


class Generation(AsyncClosing):
    """One generation of a server: inherits named fds, offers them to its successor.

    Made by [`start_generation`][aioancillary.start_generation], which has already fetched the
    fds of the predecessor (or of systemd). Then:

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
        async with ConnectionServer(handle) as server:
            server.add_listener(web)
            await gen.ready()
            await gen.handed_over()          # a successor now accepts on the same socket
            await server.drain(timeout=30)   # stop accepting, finish in flight, cut the rest
        await gen.close()

    ([`ConnectionServer`][aioancillary.ConnectionServer] tracks its connections for the
    drain; ``asyncio.start_server`` works too, with your own bookkeeping of the connections
    in flight.)
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
        self._timeout = timeout
        self._states = GenerationStates()
        self._predecessor_gone = asyncio.Event()
        if predecessor is None:
            self._predecessor_gone.set()
        self._offering = Offering(
            self._states,
            authorize=authorize,
            timeout=timeout,
            ready_timeout=ready_timeout,
            predecessor_gone=self._predecessor_gone,
            predecessor_pid=self._predecessor_pid,
        )
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
        return self._offering.names

    def offer(self, name: str, fds: FdLike | Sequence[FdLike]) -> None:
        """Offer ``fds`` to the next generation under ``name`` (one fd or several).

        A close-on-exec duplicate of each is kept until the handoff or
        [`close`][aioancillary.Generation.close], so the caller's objects may be closed at any
        time (``asyncio.Server.close()`` closes the socket it was given).

        Raises:
            ValueError: the name is already offered (names are unique per generation), is not
                a valid fd name, or ``fds`` is empty.
            InvalidFdError: an fd is not open.
        """
        state = self._states.state
        if state in (_S.HANDED_OVER, _S.CLOSED):
            raise RuntimeError(f"this generation is {state.value}: it offers nothing more")
        self._offering.add(name, _fd_list(fds))

    def take_socket(
        self,
        name: str,
        create: Callable[[], socket.socket] | None = None,
        *,
        family: int | None = None,
        type: int | None = None,
        listening: bool = True,
    ) -> socket.socket:
        """Take the inherited socket ``name``, or ``create()`` it; offer it to the next one.

        "Inherit by name, or bind if absent" in one call: the first generation binds (or gets
        the socket from systemd under its ``FileDescriptorName=``), every later one inherits
        it, so no generation ever binds while another holds the port.

        An inherited stream or seqpacket socket must be listening (``SO_ACCEPTCONN``): a
        connected socket handed over as a listener is refused, and the fds of that name are
        closed. Pass ``listening=False`` to take a connected socket.

        Raises:
            FdNameError: nothing inherited under ``name`` and no ``create``, or several fds.
            FdTypeError: the inherited fd is not a socket of ``family``/``type``, or not
                listening; every fd of that name is closed.
            ValueError: ``name`` is already offered.
        """
        if name in self._offering.names:
            raise ValueError(f"{name!r} is already offered by this generation")
        try:
            sock = self._inherited.take_socket(
                name, family=family, type=type, create=create, listening=listening
            )
        except FdTypeError as exc:
            # What the predecessor (or systemd) passed under this name is unusable: keeping
            # it open would only hand it on to the next generation.
            close_all(self._inherited.take_fds(name))
            raise FdTypeError(f"{exc}. It came from {self._source()} and was closed") from None
        try:
            self.offer(name, sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _source(self) -> str:
        if self._inherited.source == "predecessor":
            return f"the predecessor (pid {self._predecessor_pid})"
        return self._inherited.source

    def take_fd(self, name: str, create: Callable[[], OwnedFd] | None = None) -> OwnedFd:
        """Take the inherited fd ``name`` (a file, a pipe...), or ``create()`` it; offer it.

        Example::

            state = gen.take_fd("state", create=lambda: OwnedFd(os.memfd_create("state")))

        Raises:
            FdNameError: nothing inherited under ``name`` and no ``create``, or several fds.
            ValueError: ``name`` is already offered.
        """
        if name in self._offering.names:
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

    # -- taking over ------------------------------------------------------------------------

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
        if self._states.state is not _S.STARTING:
            raise RuntimeError(
                f"ready() was already called (this generation is {self._states.state.value})"
            )
        self._states.move(_S.COMMITTING)
        unclaimed = self._inherited.close()
        if unclaimed:
            logger.warning("closed inherited fd(s) nobody took: %s", unclaimed)
        try:
            conn = self._predecessor
            if conn is not None:
                await confirm(conn, self._timeout)
                self._watcher = asyncio.get_running_loop().create_task(
                    watch(conn, self._predecessor_gone)
                )
            await self._offering.listen(self._path)
        except BaseException:
            self._states.move_from(_S.COMMITTING, _S.FAILED)  # unless closed meanwhile
            raise
        self._states.move_from(_S.COMMITTING, _S.SERVING)

    async def handed_over(self) -> None:
        """Wait until a successor has taken over and is serving.

        Then stop accepting (closing your copies of the listeners: the successor has its
        own), finish in-flight connections within your deadline, and
        [`close`][aioancillary.Generation.close].
        """
        await self._offering.handed_over.wait()

    async def predecessor_exited(self) -> None:
        """Wait until the predecessor has closed its end (it exited, or called ``close()``).

        Until then this generation refuses upgrades: a third generation must not start while
        the first still drains (returns at once for a first generation).
        """
        await self._predecessor_gone.wait()

    def is_handed_over(self) -> bool:
        """True once a successor has declared itself ready."""
        return self._offering.handed_over.is_set()

    # -- closing ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every fd this generation holds and its handoff socket; idempotent.

        After a handoff this is what lets the successor accept the next upgrade (it waits for
        this process's connection to end). Without a handoff the handoff socket file is
        removed.
        """
        if self._states.state is _S.CLOSED:
            return
        self._states.move(_S.CLOSED)
        self._inherited.close()
        await self._offering.close()
        if self._predecessor is not None:
            self._predecessor.close()
            await self._predecessor.wait_closed()
        if self._watcher is not None:
            await self._watcher

    async def _close_and_wait(self, cancelled: bool) -> None:
        """``async with``'s exit (AsyncClosing): close, then wait until closed."""
        await self.close()

    def __repr__(self) -> str:
        return (
            f"<Generation {self._path!r} {self._states.state.value} "
            f"from={self._inherited.source} offered={self._offering.names}>"
        )


async def start_generation(
    path: str | os.PathLike[str],
    *,
    authorize: Authorize | None = same_user,
    timeout: float = 10.0,
    ready_timeout: float = 60.0,
    max_fds: int = 1024,
    systemd: bool = True,
) -> Generation:
    """Start a server generation: fetch the named fds of the running one, if any.

    If a generation listens on the handoff socket ``path``, its fds are fetched (it keeps
    serving until this one calls [`Generation.ready`][aioancillary.Generation.ready]).
    Otherwise this is the first generation: its fds come from systemd socket activation
    ([`listen_fds`][aioancillary.listen_fds]) when the process was activated, else it has
    none and creates them (``create=``).

    Example::

        async with await start_generation("/run/app/handoff.sock") as gen:
            web = gen.take_socket("web", create=lambda: socket.create_server(("", 8080)))
            ...

    Args:
        path: The handoff socket (a filesystem path; created with mode 0600).
        authorize: Checks the peer on both sides of a handoff, before any fd moves; the
            default accepts only processes of the same user.
        timeout: Seconds the fetch may take in all (connect, hello, every fds message), and
            each later step (a successor's hello, the predecessor's release).
        ready_timeout: Seconds a running generation waits for its successor's ``ready``
            after sending the fds; then it aborts that handoff and keeps serving.
        max_fds: The most fds this generation takes from its predecessor; more is a
            protocol error (nothing is taken).
        systemd: Adopt ``LISTEN_FDS`` when there is no running generation.

    Raises:
        HandoffBusyError: the running generation is busy with another upgrade, or its
            predecessor still drains; nothing was taken: retry later.
        HandoffError: the running generation closed the connection, broke the protocol or
            sent more than ``max_fds`` fds; nothing was taken.
        HandoffTimeoutError: it did not hand its fds over within ``timeout``; nothing was
            taken.
        PeerRejectedError: ``authorize`` refused the running generation.
        ActivationError: the systemd variables are for another process or malformed.
    """
    if max_fds < 0:
        raise ValueError(f"max_fds must be >= 0, got {max_fds}")
    fspath = os.fspath(path)
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        conn = await connect(fspath, authorize=authorize, seconds=timeout, deadline=deadline)
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
    try:
        inherited = await fetch(conn, seconds=timeout, deadline=deadline, max_fds=max_fds)
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
