"""The fd holder process: start (first, or taking a running holder's store over), serve, exit.

``python -m aioancillary fdholder --socket PATH`` runs ``run``. The process:

1. asks a holder already serving ``PATH`` for its store (``_takeover``); if none answers, it
   is the first holder and binds ``PATH`` itself (mode 0600, or 0666 when other uids/gids are
   admitted: admission is by ``SO_PEERCRED``, the file mode only lets them reach it);
2. serves until SIGTERM or SIGINT (the store is dropped: every fd closed, the names logged)
   or until a successor took the store over (then it exits, its copies closed);
3. tells a service manager ``READY=1`` once it serves (``sd_notify``; nothing without
   ``$NOTIFY_SOCKET``), with ``MAINPID=`` after a takeover so that systemd follows the new
   process (``NotifyAccess=all``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._core._errors import AncillaryError, FdHolderError, NotifyError
from .._core._fd import OwnedFd, close_all
from .._core._platform import SCM_MAX_FD
from .._kernel._unix import is_abstract, listen
from .._lifecycle._notify import notify_async
from .._lifecycle._reload import Generation
from ._holder import Admit, Holder, describe
from ._store import MAX_ENTRIES_CAP, Store
from ._takeover import (
    LISTENER,
    Offer,
    TakeoverSource,
    adopt,
    check_fits,
    open_generation,
    request_takeover,
    takeover_path,
)

__all__ = ["HolderConfig", "run"]

logger = logging.getLogger("aioancillary")


@dataclass(frozen=True)
class HolderConfig:
    """The holder's command line, checked.

    Attributes:
        path: The clients' socket (``"\\0name"`` for an abstract one).
        allow_uids: Uids admitted besides the holder's own and root.
        allow_gids: Primary gids admitted.
        max_entries: Most entries held.
        max_fds: Most fds held, all entries together.
        timeout: Seconds each step of a takeover may take.
        takeover_deadline: Seconds a new holder keeps asking a busy running one.
    """

    path: str
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    max_entries: int = 1000
    max_fds: int = 1000
    timeout: float = 10.0
    takeover_deadline: float = 30.0
    backlog: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.max_entries <= MAX_ENTRIES_CAP:
            raise ValueError(f"max_entries must be 1..{MAX_ENTRIES_CAP}, got {self.max_entries}")
        if self.max_fds < 1:
            raise ValueError(f"max_fds must be at least 1, got {self.max_fds}")

    @property
    def mode(self) -> int:
        """The socket file's permissions: others may reach it only if some are admitted."""
        return 0o666 if self.allow_uids or self.allow_gids else 0o600

    @property
    def fds_needed(self) -> int:
        """Open files the holder may need: the store, its duplicates while a takeover offers
        them, one message of fds per client in flight, and room for the rest."""
        return 2 * self.max_fds + 4 * SCM_MAX_FD + 64


def raise_nofile(needed: int) -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to ``needed`` (within the hard limit).

    Raises:
        FdHolderError: the hard limit is lower.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise FdHolderError(
            f"the holder may need {needed} open files (twice --max-fds, plus clients' fds in "
            f"flight), but RLIMIT_NOFILE's hard limit is {hard}: lower --max-fds, or raise "
            "the limit (ulimit -Hn, LimitNOFILE= in a unit)",
            code="full",
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _inode(path: str) -> int | None:
    if is_abstract(path):
        return None
    with contextlib.suppress(OSError):
        return os.stat(path).st_ino
    return None


class Daemon:
    """A started holder: its store, listener, generation and what ends it."""

    def __init__(
        self,
        config: HolderConfig,
        holder: Holder,
        source: TakeoverSource,
        predecessor: int | None,
    ) -> None:
        self.config = config
        self.holder = holder
        self.source = source
        self.predecessor = predecessor
        self._inode = _inode(config.path)

    @classmethod
    async def start(cls, config: HolderConfig) -> Daemon:
        """Take the running holder's store over, or start empty; serve.

        Raises:
            FdHolderError: the running holder refused or broke the protocol, its store does
                not fit this one's bounds, or a stray generation holds the takeover socket.
            OSError: ``PATH`` cannot be bound.
        """
        offer = await request_takeover(
            config.path, step=config.timeout, deadline=config.takeover_deadline
        )
        try:
            if offer is not None:
                check_fits(offer, config.max_entries, config.max_fds)
            gen = await open_generation(config.path, config.timeout)
        except BaseException:
            if offer is not None:
                await offer.abort()
            raise
        source = TakeoverSource(gen, config.path, config.timeout)
        store: Store[OwnedFd] = Store(max_entries=config.max_entries, max_fds=config.max_fds)
        listener: socket.socket | None = None
        try:
            listener = cls._listener(config, gen, offer)
            holder = Holder(
                store, listener, Admit(config.allow_uids, config.allow_gids), source.handle
            )
            if offer is not None:
                adopt(offer, gen.inherited, holder.adopt)
            await gen.ready()  # a takeover's commit point: the running holder stops here
        except BaseException:
            # Nothing committed: what this process holds goes, the running holder resumes.
            close_all(fd for entry in store.take_all() for fd in entry.fds)
            if listener is not None:
                listener.close()
            await source.close()  # the generation first: see _takeover's docstring
            if offer is not None:
                await offer.abort()
            raise
        if offer is not None:
            await offer.bye()
            if not is_abstract(config.path):
                try:
                    os.chmod(config.path, config.mode)  # this holder's admission may differ
                except OSError as exc:
                    logger.warning("cannot set the mode of %s: %s", config.path, exc)
        await holder.start()
        return cls(config, holder, source, None if offer is None else offer.pid)

    @staticmethod
    def _listener(config: HolderConfig, gen: Generation, offer: Offer | None) -> socket.socket:
        inherited = gen.inherited.source == "predecessor"
        if offer is None and inherited:
            raise FdHolderError(
                f"a process (pid {gen.predecessor_pid}) serves the takeover socket "
                f"{takeover_path(config.path)!r} but no fd holder answers at "
                f"{config.path!r}: stop it, or choose another --socket",
                code="busy",
            )
        if offer is not None and not inherited:
            raise FdHolderError(
                f"the holder at {config.path!r} (pid {offer.pid}) offered its store, but "
                f"nothing serves its takeover socket {takeover_path(config.path)!r}",
            )
        return gen.take_socket(
            LISTENER,
            create=lambda: listen(config.path, socket.SOCK_STREAM, config.mode, config.backlog),
            family=socket.AF_UNIX,
            type=socket.SOCK_STREAM,
        )

    def describe(self) -> str:
        """The holder's startup line."""
        store = self.holder.store
        origin = (
            f"took over {describe(list(store))} from pid {self.predecessor}"
            if self.predecessor is not None
            else "started empty"
        )
        return (
            f"serving {self.config.path!r} (pid {os.getpid()}): {origin}; at most "
            f"{store.max_entries} entries and {store.max_fds} fds; admits "
            f"{self.holder.admit}"
        )

    async def serve(self) -> int:
        """Serve until a signal (drop the store) or a successor (exit); the exit status."""
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[str] = loop.create_future()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, _resolve, stop, sig.name)
        try:
            logger.info("%s", self.describe())
            await _notify(
                ready=True,
                status=f"holding {len(self.holder.store)} entries",
                mainpid=None if self.predecessor is None else os.getpid(),
            )
            ends: set[asyncio.Future[Any]] = {stop, self.source.handed_over}
            await asyncio.wait(ends, return_when="FIRST_COMPLETED")
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        if not stop.done():
            await self._exit_handed_over()
            return 0
        await self._drop(stop.result())
        return 0

    async def _exit_handed_over(self) -> None:
        # The successor holds its own copies of everything: close ours, leave the path.
        pid = self.source.handed_over.result()
        entries = await self.holder.close(
            "moved", f"this holder handed its store over to pid {pid}: connect again"
        )
        close_all(fd for entry in entries for fd in entry.fds)
        await self.source.close()
        self.holder.listener.close()

    async def _drop(self, signame: str) -> None:
        await _notify(stopping=True, status="dropping the store")
        in_takeover = self.holder.frozen
        entries = await self.holder.close(
            "stopping", f"the holder is stopping ({signame}): its store is dropped"
        )
        close_all(fd for entry in entries for fd in entry.fds)
        logger.warning("%s: dropped the store, %s; every fd closed", signame, describe(entries))
        await self.source.close()
        if not in_takeover and self._inode is not None and _inode(self.config.path) == self._inode:
            with contextlib.suppress(OSError):
                os.unlink(self.config.path)
        self.holder.listener.close()


def _resolve(future: asyncio.Future[str], value: str) -> None:
    if not future.done():
        future.set_result(value)


async def _notify(
    *,
    ready: bool = False,
    stopping: bool = False,
    status: str | None = None,
    mainpid: int | None = None,
) -> None:
    try:
        await notify_async(ready=ready, stopping=stopping, status=status, mainpid=mainpid)
    except (NotifyError, ValueError) as exc:
        logger.warning("cannot notify the service manager: %s", exc)


async def _main(config: HolderConfig) -> int:
    try:
        daemon = await Daemon.start(config)
    except (AncillaryError, OSError) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    return await daemon.serve()


def run(config: HolderConfig, loop: str = "asyncio") -> int:
    """Run a holder process until it is stopped or replaced; return the exit status.

    Args:
        config: What to serve, and how much.
        loop: ``"asyncio"`` or ``"uvloop"``.
    """
    logging.basicConfig(
        level=logging.INFO, format="fdholder[%(process)d] %(levelname)s: %(message)s"
    )
    try:
        raise_nofile(config.fds_needed)
    except FdHolderError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if loop == "uvloop":
        import uvloop  # noqa: PLC0415 - optional: only when asked for

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_main(config))
