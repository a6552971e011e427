"""A prefork pool: N worker processes serving an [`Acceptor`][aioancillary.Acceptor]'s clients with
a handler.

Each worker is a fresh interpreter (``python -m aioancillary._handoff._pool_child``, started with
``asyncio.create_subprocess_exec``: never a fork of the running loop) that inherits one end of a
``socketpair`` as its link to the acceptor and runs [`Worker.serve`][aioancillary.Worker.serve] with
the handler, on the loop asked for. A worker that exits is replaced;
[`WorkerPool.shutdown`][aioancillary.WorkerPool.shutdown] stops accepting, lets in-flight clients
finish within a deadline, then ends the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import sys
from types import TracebackType
from typing import Any, Literal, Self

from ._acceptor import Acceptor
from ._dispatch import DispatchName, Picker
from ._worker import ClientHandler

__all__ = ["WorkerPool", "handler_reference", "resolve_handler"]

logger = logging.getLogger("aioancillary")

#: A worker that exits sooner than this after starting is restarted only after a delay that
#: doubles each time (up to ``_MAX_BACKOFF``), so a broken handler does not spin.
_QUICK_EXIT = 1.0
_MAX_BACKOFF = 10.0


def handler_reference(handler: str | ClientHandler) -> dict[str, str]:
    """How a child process finds ``handler``: ``{"ref": "module:qualname"}``, plus ``"path"``
    when it lives in a script run as ``__main__``.

    Raises:
        ValueError: a lambda, a nested function, or a string without ``module:name``.
    """
    if isinstance(handler, str):
        if ":" not in handler:
            raise ValueError(f"handler {handler!r} must be 'module:function'")
        return {"ref": handler}
    module = getattr(handler, "__module__", None)
    qualname = getattr(handler, "__qualname__", "")
    if not module or "<" in qualname:
        raise ValueError(
            f"handler {handler!r} cannot be found by a new process: pass a module-level "
            "async function, or 'module:function'"
        )
    if module != "__main__":
        return {"ref": f"{module}:{qualname}"}
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:  # run as python -m pkg.mod: importable by name
        return {"ref": f"{spec.name}:{qualname}"}
    path = getattr(main, "__file__", None)
    if path is None:
        raise ValueError("handlers defined in an interactive session cannot be sent to workers")
    return {"ref": f"__main__:{qualname}", "path": os.path.abspath(path)}


def resolve_handler(reference: dict[str, str]) -> ClientHandler:
    """The handler named by `handler_reference` (in the child).

    A script's handler is loaded by running the script under the name ``__mp_main__``, as
    ``multiprocessing`` does, so its ``if __name__ == "__main__":`` block does not run.
    """
    module_name, _, qualname = reference["ref"].partition(":")
    if "path" in reference:
        import runpy  # noqa: PLC0415 - only for handlers defined in a script

        namespace = runpy.run_path(reference["path"], run_name="__mp_main__")
        obj: Any = namespace[qualname.split(".")[0]]
        for part in qualname.split(".")[1:]:
            obj = getattr(obj, part)
    else:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"handler {reference['ref']!r} is not callable")
    handler: ClientHandler = obj
    return handler


class _Child:
    __slots__ = ("index", "process", "started", "watcher")

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.started = 0.0


class WorkerPool:
    """Start ``processes`` worker processes that serve clients with ``handler``.

    Create it inside a coroutine. The pool owns an [`Acceptor`][aioancillary.Acceptor] (`acceptor`):
    add listeners to it. Each worker runs ``handler(client)`` for every
    [`HandedClient`][aioancillary.HandedClient] it gets, in its own interpreter, on the event loop
    named by ``loop``. A worker that dies is restarted (what it was serving is lost with it and
    counted in the acceptor's stats).

    Example::

        async with WorkerPool("myapp.handlers:serve_client", processes=4) as pool:
            pool.acceptor.add_listener(socket.create_server(("0.0.0.0", 8080)))
            await pool.serve_forever()       # until cancelled; then a graceful shutdown

    Args:
        handler: ``async def handler(client: HandedClient) -> None``, at module level (a
            function of the running script works too), or ``"module:function"``.
        processes: How many workers (default: the number of CPUs).
        loop: ``"asyncio"`` or ``"uvloop"``: the workers' event loop.
        dispatch: As for [`Acceptor`][aioancillary.Acceptor].
        worker_limit: As for [`Acceptor`][aioancillary.Acceptor].
        env: Extra environment variables for the workers.
        shutdown_timeout: Default deadline of [`shutdown`][aioancillary.WorkerPool.shutdown], in
            seconds.
    """

    def __init__(
        self,
        handler: str | ClientHandler,
        *,
        processes: int | None = None,
        loop: Literal["asyncio", "uvloop"] = "asyncio",
        dispatch: DispatchName | Picker = "least-busy",
        worker_limit: int = 1024,
        env: dict[str, str] | None = None,
        shutdown_timeout: float = 30.0,
    ) -> None:
        if loop not in ("asyncio", "uvloop"):
            raise ValueError(f"loop must be 'asyncio' or 'uvloop', got {loop!r}")
        self._reference = handler_reference(handler)
        if "path" not in self._reference:
            resolve_handler(self._reference)  # fail here, not in every child, if it is wrong
        self._size = processes or os.cpu_count() or 1
        self._loop_name = loop
        self._env = env
        self._shutdown_timeout = shutdown_timeout
        #: The acceptor the workers register with: add listeners to it.
        self.acceptor = Acceptor(dispatch=dispatch, worker_limit=worker_limit)
        self._children: list[_Child] = []
        self._closing = False
        self._restarts = 0

    @property
    def restarts(self) -> int:
        """How many workers were restarted after exiting on their own."""
        return self._restarts

    @property
    def pids(self) -> list[int]:
        """The process ids of the running workers."""
        return [c.process.pid for c in self._children if c.process and c.process.returncode is None]

    async def start(self) -> None:
        """Start the workers (each is registered with the acceptor when this returns)."""
        for index in range(self._size):
            child = _Child(index)
            self._children.append(child)
            await self._spawn(child)

    async def _spawn(self, child: _Child) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            config = {
                "handler": self._reference,
                "loop": self._loop_name,
                "fd": theirs.fileno(),
                "sys_path": sys.path,
            }
            env = None if self._env is None else {**os.environ, **self._env}
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "aioancillary._handoff._pool_child",
                json.dumps(config),
                pass_fds=(theirs.fileno(),),
                env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the child has its own copy
        child.process = process
        child.started = asyncio.get_running_loop().time()
        self.acceptor.add_worker(ours, pid=process.pid)
        child.watcher = asyncio.get_running_loop().create_task(self._watch(child, process))

    async def _watch(self, child: _Child, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        lived = loop.time() - child.started
        logger.warning(
            "worker %d (pid %d) exited with %s after %.1f s; restarting it",
            child.index,
            process.pid,
            _describe(code),
            lived,
        )
        if lived < _QUICK_EXIT:
            delay = min(_MAX_BACKOFF, 0.1 * 2 ** min(self._restarts, 10))
            await asyncio.sleep(delay)
            if self._closing:
                return
        self._restarts += 1
        try:
            await self._spawn(child)
        except Exception:  # e.g. out of fds or processes: the pool goes on with one fewer
            logger.exception("could not restart worker %d", child.index)

    # One deadline shared by several steps (drain, exits, then signals): a caller's
    # asyncio.timeout() could only cut the whole stop short, leaving workers running.
    async def shutdown(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Stop gracefully: stop accepting, let in-flight clients finish, stop the workers.

        New clients are refused from the start (the listeners are closed). Workers get the end
        of their client stream once nothing is in flight, or when the deadline passes, and
        exit when their handlers have returned; workers still running at the deadline are
        terminated (SIGTERM, then SIGKILL).

        Args:
            timeout: Deadline in seconds (default: ``shutdown_timeout``).

        Returns:
            ``True`` if every client finished and every worker exited by itself in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._shutdown_timeout if timeout is None else timeout)
        self._closing = True
        for child in self._children:
            if child.watcher is not None and not child.watcher.done():
                child.watcher.cancel()
        self.acceptor.stop_accepting()
        clean = await self.acceptor.drain(max(0.0, deadline - loop.time()))
        self.acceptor.close()
        processes = [c.process for c in self._children if c.process is not None]
        pending = [p for p in processes if p.returncode is None]
        if pending:
            waits = [loop.create_task(p.wait()) for p in pending]
            _, late = await asyncio.wait(waits, timeout=max(0.0, deadline - loop.time()))
            if late:
                clean = False
                await _terminate([p for p in pending if p.returncode is None])
                await asyncio.wait(waits)
        for process in processes:
            clean = clean and process.returncode == 0
        self.acceptor.abort()  # links of workers that were killed
        await self.acceptor.wait_closed()
        return clean

    async def serve_forever(self) -> None:
        """Serve until cancelled; cancelling shuts the pool down gracefully."""
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            await asyncio.shield(self.shutdown())

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.shutdown(timeout=0)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._closing:
            await self.shutdown()

    def __repr__(self) -> str:
        return f"<WorkerPool processes={self._size} loop={self._loop_name} pids={self.pids}>"


async def _terminate(processes: list[asyncio.subprocess.Process], grace: float = 2.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        waits = [asyncio.ensure_future(p.wait()) for p in processes]
        _, late = await asyncio.wait(waits, timeout=wait)
        for task in late:
            task.cancel()
        processes = [p for p in processes if p.returncode is None]
        if not processes:
            return


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"
