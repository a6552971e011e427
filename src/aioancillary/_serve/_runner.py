"""``python -m aioancillary serve``: the runner process that operators drive with signals.

The runner owns the listening sockets and an [`Acceptor`][aioancillary.Acceptor] (least-busy
dispatch) in its own process, and a [`WorkerPool`][aioancillary.WorkerPool] of fresh interpreters
that serve the application (`._worker`). With ``--accept workers`` the workers accept on their
copies of the listeners themselves, and the acceptor only keeps their links. Signals:

* ``HUP``: reload. New workers import the application afresh (new code) and start; once all
  are ready the old ones are retired: they get no more clients, finish what they hold and
  exit. The listeners never close, so no client is refused; a failed reload (the new code
  does not import, its startup fails) leaves the old workers serving.
* ``TERM``, ``INT``: graceful stop within ``--graceful-timeout``; exit status 0.
* ``TTIN``, ``TTOU``: one worker more, one fewer (never fewer than one).

Under systemd it takes its listeners from ``LISTEN_FDS`` (by name, or by address), and sends
``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=`` and the watchdog pings itself.

Exit status: 0 after a stop by signal; 1 when a listener cannot be opened; 3 when the
workers' application startup failed; 4 when the application cannot be imported; 2 for a
usage error (argparse).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from .._core._errors import NotifyError, WorkerStartError
from .._handoff._pool import WorkerPool
from .._lifecycle._notify import notify_async, watchdog_interval
from ._listeners import BindError, Listener, open_listeners
from ._options import ServeOptions
from ._worker import LOAD_FAILED, STARTUP_FAILED, configure_logging

__all__ = ["run"]

logger = logging.getLogger("aioancillary.serve")

BIND_FAILED = 1
#: The worker main every runner's pool runs.
WORKER_MAIN = "aioancillary._serve._worker:main"


def run(options: ServeOptions) -> int:
    """Run the server until a TERM or INT; returns the exit status."""
    configure_logging(options.log_level)
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if options.loop == "uvloop":
        import uvloop  # noqa: PLC0415 - optional dependency, only when asked for

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(Runner(options).run())


class Runner:
    """The runner's main coroutine and its signal handlers."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self._stop = asyncio.Event()
        self._signals = 0
        self._pool: WorkerPool | None = None
        self._listeners: list[Listener] = []
        self._reload_wanted = False
        self._reloading: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        options = self.options
        try:
            self._listeners = open_listeners(
                options.binds,
                backlog=options.backlog,
                defer_accept=options.defer_accept,
            )
        except BindError as exc:
            logger.error("%s", exc)
            return BIND_FAILED
        try:
            return await self._serve()
        finally:
            for listener in self._listeners:
                listener.sock.close()  # the acceptor's (closed already), or ours (--accept workers)
                listener.remove_path()

    async def _serve(self) -> int:
        options = self.options
        by_workers = options.accept == "workers"
        pool = WorkerPool(
            main=WORKER_MAIN,
            args=options.to_json(),
            processes=options.workers,
            loop=options.loop,
            shutdown_timeout=options.graceful_timeout,
            # --accept workers: each worker accepts on its copies of the listeners, and the
            # acceptor only keeps the workers' links (their start, retirement and stop).
            share=[listener.sock for listener in self._listeners] if by_workers else (),
        )
        self._pool = pool
        if not by_workers:
            for listener in self._listeners:
                pool.acceptor.add_listener(listener.sock, name=listener.name)
        for listener in self._listeners:
            logger.info("listening on %s", listener.describe())
        logger.info("starting %d worker(s)", options.workers)
        loop = asyncio.get_running_loop()
        handlers = {
            signal.SIGTERM: self._on_stop,
            signal.SIGINT: self._on_stop,
            signal.SIGHUP: self._on_reload,
            signal.SIGTTIN: self._on_more,
            signal.SIGTTOU: self._on_fewer,
        }
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler, sig)
        # Read (and unset) before any worker starts: the watchdog is the runner's business, a
        # worker that inherited WATCHDOG_USEC would think it its own (sd_watchdog_enabled(3)).
        interval = watchdog_interval(unset_environment=True)
        watchdog = loop.create_task(self._watchdog(interval))
        try:
            try:
                await pool.start()
            except WorkerStartError as exc:
                logger.error("%s", exc)
                await pool.shutdown(timeout=0)
                return _start_status(exc)
            except BaseException:
                await pool.shutdown(timeout=0)
                raise
            logger.info(
                "serving %s (%s) with workers %s", options.app, options.interface, pool.pids
            )
            await self._notify(ready=True, status=self._status())
            await self._stop.wait()
            logger.info(
                "stopping: workers finish their requests (%g s at most)", options.graceful_timeout
            )
            await self._notify(stopping=True, status="stopping")
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if by_workers:
                # (After the reloads and resizes: no worker starts from here on.) The workers
                # stop accepting next; once the last copy of a listener is closed, new
                # connections are refused instead of waiting in a backlog nobody reads.
                for listener in self._listeners:
                    listener.sock.close()
            clean = await pool.shutdown()
        finally:
            watchdog.cancel()
            for sig in handlers:
                loop.remove_signal_handler(sig)
        if clean:
            logger.info("stopped")
        else:
            logger.warning("stopped; some workers had to be terminated at the deadline")
        return 0

    # -- signals ------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_stop(self, sig: int) -> None:
        self._signals += 1
        if self._stop.is_set():
            logger.info("%s: already stopping", signal.Signals(sig).name)
            return
        logger.info("%s: graceful stop", signal.Signals(sig).name)
        self._stop.set()

    def _on_reload(self, sig: int) -> None:
        if self._stop.is_set():
            return
        if self._reloading is not None and not self._reloading.done():
            self._reload_wanted = True  # once more after this one: it may predate the new code
            return
        self._reloading = self._spawn(self._reload())

    async def _reload(self) -> None:
        pool = self._pool
        assert pool is not None
        while True:
            self._reload_wanted = False
            logger.info("HUP: reloading: starting %d new worker(s)", pool.size)
            await self._notify(reloading=True, status="reloading")
            try:
                await pool.reload()
            except WorkerStartError as exc:
                logger.error("reload failed, the old workers serve on: %s", exc)
                await self._notify(ready=True, status=f"reload failed; {self._status()}")
            else:
                logger.info("reloaded: workers %s; %s retiring", pool.pids, pool.retiring)
                await self._notify(ready=True, status=self._status())
            if not self._reload_wanted:
                return

    def _on_more(self, sig: int) -> None:
        if not self._stop.is_set():
            self._spawn(self._resize(+1))

    def _on_fewer(self, sig: int) -> None:
        if not self._stop.is_set():
            self._spawn(self._resize(-1))

    async def _resize(self, step: int) -> None:
        pool = self._pool
        assert pool is not None
        try:
            if step > 0:
                pid = await pool.add_worker()
                logger.info("TTIN: worker %d added; %d worker(s)", pid, pool.size)
            else:
                pid = await pool.remove_worker()
                logger.info("TTOU: worker %d retiring; %d worker(s)", pid, pool.size)
        except WorkerStartError as exc:
            logger.error("TTIN: the new worker failed to start: %s", exc)
        except ValueError as exc:
            logger.warning("TTOU: %s", exc)
        await self._notify(status=self._status())

    # -- systemd --------------------------------------------------------------------------------

    def _status(self) -> str:
        pool = self._pool
        assert pool is not None
        names = ", ".join(listener.name for listener in self._listeners)
        return f"serving on {names} with {pool.size} worker(s): {pool.pids}"

    async def _notify(self, **fields: object) -> None:
        try:
            async with asyncio.timeout(5.0):
                await notify_async(**fields)  # type: ignore[arg-type]
        except (NotifyError, TimeoutError) as exc:
            logger.warning("could not notify the service manager: %s", exc)

    async def _watchdog(self, interval: float | None) -> None:
        if interval is None:
            return
        while True:
            await self._notify(watchdog=True)
            await asyncio.sleep(interval / 2)


def _start_status(exc: WorkerStartError) -> int:
    if exc.exit_status == LOAD_FAILED:
        return LOAD_FAILED
    return STARTUP_FAILED
