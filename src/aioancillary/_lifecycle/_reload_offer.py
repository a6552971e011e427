"""The running generation's side of a reload handoff: offer named fds to the next one.

The handoff socket serves every peer that connects at once, each in its own task. A peer
counts as a successor only once it has sent a valid ``hello`` within the step timeout: until
then the generation's state does not change, so a peer that connects and says nothing (or
garbage) delays nobody; it is dropped at its deadline with one log line. The first valid
hello moves the generation to ``handing-over``; later ones are answered ``busy``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence

from .._asyncio._connection import AncillaryConnection
from .._asyncio._server import AncillaryServer, start_unix_server
from .._core._errors import AncillaryError, HandoffError, HandoffTimeoutError
from .._core._fd import FdLike, OwnedFd, close_all
from .._core._platform import SCM_MAX_FD
from .._kernel._unix import Authorize
from ._reload_state import GenerationState, GenerationStates
from ._reload_wire import PROTOCOL_VERSION, decode, encode, receive
from ._systemd import check_fdname

__all__ = ["Offering"]

logger = logging.getLogger("aioancillary")

_S = GenerationState


class Offering:
    """The fds a generation offers, and the handoff socket it offers them on.

    Args:
        states: The generation's state, shared with it (moved here to ``handing-over``,
            back to ``serving``, or on to ``handed-over``).
        predecessor_gone: Set once this generation's own predecessor has exited; until then
            every successor is refused (at most two generations hold the fds).
        predecessor_pid: For the refusal's reason.
    """

    def __init__(
        self,
        states: GenerationStates,
        *,
        authorize: Authorize | None,
        timeout: float,
        ready_timeout: float,
        predecessor_gone: asyncio.Event,
        predecessor_pid: int | None,
    ) -> None:
        self._states = states
        self._authorize = authorize
        self._timeout = timeout
        self._ready_timeout = ready_timeout
        self._predecessor_gone = predecessor_gone
        self._predecessor_pid = predecessor_pid
        self._fds: dict[str, tuple[OwnedFd, ...]] = {}
        self._server: AncillaryServer | None = None
        self.handed_over = asyncio.Event()
        self._closing = asyncio.Event()

    @property
    def names(self) -> list[str]:
        """The names offered, in the order they were."""
        return list(self._fds)

    def fds(self, name: str) -> tuple[OwnedFd, ...]:
        """The duplicates kept for ``name``."""
        return self._fds[name]

    def add(self, name: str, fds: Sequence[FdLike]) -> None:
        """Keep a close-on-exec duplicate of each of ``fds`` to hand over under ``name``."""
        check_fdname(name)
        if name in self._fds:
            raise ValueError(
                f"{name!r} is already offered: a name identifies one set of fds (offer "
                "several fds under one name in a single call)"
            )
        if not fds:
            raise ValueError(f"no fd to offer under {name!r}")
        dups: list[OwnedFd] = []
        try:
            for fd in fds:
                dups.append(OwnedFd.dup_of(fd))
        except BaseException:
            close_all(dups)
            raise
        self._fds[name] = tuple(dups)

    async def listen(self, path: str) -> None:
        """Serve successors on the handoff socket ``path`` (created with mode 0600)."""
        self._server = await start_unix_server(self._on_peer, path, authorize=self._authorize)

    # -- one peer of the handoff socket -----------------------------------------------------

    def _busy_reason(self) -> str | None:
        state = self._states.state
        if state is _S.HANDING_OVER:
            return "another successor is taking over right now"
        if state is not _S.SERVING:
            return f"this generation is {state.value}"
        if not self._predecessor_gone.is_set():
            return (
                f"its predecessor (pid {self._predecessor_pid}) is still finishing its "
                "connections; retry once it has exited"
            )
        return None

    async def _on_peer(self, conn: AncillaryConnection) -> None:
        pid = _pid(conn)
        try:
            await self._hello(conn)
        except (AncillaryError, OSError) as exc:
            logger.warning("handoff connection from pid %s dropped: %s", pid, exc)
            return
        reason = self._busy_reason()
        if reason is not None:
            logger.warning("refused an upgrade from pid %s: %s", pid, reason)
            await conn.send(encode("busy", reason=reason, pid=os.getpid()))
            return
        self._states.move(_S.HANDING_OVER)  # before any await: a second successor is busy
        done = False
        try:
            await self._hand_over(conn)
            done = True
        except (AncillaryError, OSError) as exc:
            logger.warning("handoff to pid %s failed, still serving: %s", pid, exc)
        finally:
            if not done:
                self._states.move_from(_S.HANDING_OVER, _S.SERVING)  # unless closed meanwhile
        if done:
            await self._closing.wait()  # hold the connection: the successor sees EOF when we exit

    async def _hello(self, conn: AncillaryConnection) -> None:
        with await receive(conn, self._timeout, "waiting for the successor's hello") as msg:
            hello = decode(msg, ("hello",))
        if hello.get("version") != PROTOCOL_VERSION:
            reason = f"protocol version {hello.get('version')!r} is not {PROTOCOL_VERSION}"
            await conn.send(encode("abort", reason=reason))
            raise HandoffError(f"the peer speaks {reason}")

    async def _hand_over(self, conn: AncillaryConnection) -> None:
        items = [(name, fd) for name, fds in self._fds.items() for fd in fds]
        for start in range(0, max(len(items), 1), SCM_MAX_FD):
            chunk = items[start : start + SCM_MAX_FD]
            last = start + SCM_MAX_FD >= len(items)
            names = [name for name, _ in chunk]
            await conn.send_fds(encode("fds", names=names, last=last), [fd for _, fd in chunk])
        try:
            msg = await receive(conn, self._ready_timeout, "waiting for the successor to be ready")
        except HandoffTimeoutError as exc:
            await conn.send(encode("abort", reason=str(exc)))
            raise
        with msg:
            decode(msg, ("ready",))
        # The commit point: the successor serves. Free the path so that it can offer upgrades.
        if not self._states.move_from(_S.HANDING_OVER, _S.HANDED_OVER):
            raise HandoffError("this generation was closed during the handoff")
        if self._server is not None:
            self._server.close(unlink=False)
        await conn.send(encode("released"))
        self.handed_over.set()
        logger.info("handed over to pid %s", _pid(conn))

    # -- closing ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every offered fd and the handoff socket; a successor mid-handoff gets EOF."""
        fds, self._fds = self._fds, {}
        close_all(fd for dups in fds.values() for fd in dups)
        self._closing.set()
        if self._server is not None:
            self._server.close()  # a no-op after the handoff: the path is the successor's
            self._server.close_clients()  # a successor mid-handoff gets EOF: it holds nothing
            await self._server.wait_closed()


def _pid(conn: AncillaryConnection) -> int | str:
    creds = conn.peercred
    return creds.pid if creds is not None else "?"
