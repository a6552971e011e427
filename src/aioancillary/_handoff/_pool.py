"""A prefork pool: N worker processes serving an [`Acceptor`][aioancillary.Acceptor]'s clients.

Each worker is a fresh interpreter (``python -m aioancillary._handoff._pool_child``, started with
``asyncio.create_subprocess_exec``: never a fork of the running loop) that inherits one end of
a ``socketpair`` as its link to the acceptor and the write end of a "ready" pipe. It runs a
handler for every client, or a ``main`` of yours ([`PoolWorker`][aioancillary.PoolWorker]), on the
loop asked for. The pool registers a worker with the acceptor once it says it is ready, so a worker
that fails to start never holds a client.

A worker that exits is replaced in its slot, after a delay that grows only while that slot's
workers keep dying young (`RestartBackoff`). [`WorkerPool.reload`][aioancillary.WorkerPool.reload]
replaces every worker without refusing a client: the new ones start and register, then the old
ones are retired ([`Acceptor.retire_worker`][aioancillary.Acceptor.retire_worker]) and finish
what they hold. [`add_worker`][aioancillary.WorkerPool.add_worker] and
[`remove_worker`][aioancillary.WorkerPool.remove_worker] grow and shrink the pool by one.
[`shutdown`][aioancillary.WorkerPool.shutdown] stops accepting, ends every worker's client stream
and waits for the workers to finish, within a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self

from .._core._errors import WorkerStartError
from ._acceptor import Acceptor
from ._dispatch import DispatchName, Picker
from ._pool_process import ChildProcess, RestartBackoff, Slot, describe, spawn, terminate
from ._pool_worker import WorkerMain, callable_reference, resolve_reference
from ._worker import ClientHandler

__all__ = ["RestartBackoff", "WorkerPool"]

logger = logging.getLogger("aioancillary")

# Module attributes so that the tests can run the backoff without waiting real seconds.
_clock = time.monotonic
_sleep = asyncio.sleep


class WorkerPool:
    """Start ``processes`` worker processes that serve an [`Acceptor`][aioancillary.Acceptor]'s
    clients.

    Create it inside a coroutine. The pool owns an [`Acceptor`][aioancillary.Acceptor]
    (`acceptor`): add listeners to it. Each worker runs, in its
    own interpreter on the event loop named by ``loop``, either ``handler(client)`` for every
    [`HandedClient`][aioancillary.HandedClient] it gets, or your ``main(pool_worker)``
    ([`PoolWorker`][aioancillary.PoolWorker]), which sets up what it needs, connects and serves. A
    worker that dies is restarted (what it was serving is lost with it and counted in the acceptor's
    stats).

    Example::

        async with WorkerPool("myapp.handlers:serve_client", processes=4) as pool:
            pool.acceptor.add_listener(socket.create_server(("0.0.0.0", 8080)))
            await pool.serve_forever()       # until cancelled; then a graceful shutdown

    Args:
        handler: ``async def handler(client: HandedClient) -> None``, at module level (a
            function of the running script works too), or ``"module:function"``.
        main: Instead of a handler: ``async def main(pool_worker: PoolWorker) -> None``, the
            whole life of a worker process (same rules as ``handler``).
        args: A JSON-serialisable dict handed to ``main`` as
            `PoolWorker.args`.
        processes: How many workers (default: the number of CPUs).
        loop: ``"asyncio"`` or ``"uvloop"``: the workers' event loop.
        dispatch: As for [`Acceptor`][aioancillary.Acceptor].
        worker_limit: As for [`Acceptor`][aioancillary.Acceptor].
        env: Extra environment variables for the workers.
        share: Sockets every worker inherits, at the same fd numbers (each worker takes its
            copies with [`PoolWorker.take_shared`][aioancillary.PoolWorker.take_shared]): e.g.
            listening sockets the workers accept on themselves instead of the acceptor. The
            pool does not own them: keep them open while workers start.
        shutdown_timeout: Default deadline of [`shutdown`][aioancillary.WorkerPool.shutdown], and
            how long a retired worker ([`reload`][aioancillary.WorkerPool.reload],
            [`remove_worker`][aioancillary.WorkerPool.remove_worker]) may take to finish, in
            seconds.
        ready_timeout: How long a new worker may take to become ready (import, set up,
            connect), in seconds; one that takes longer is killed.

    Raises:
        TypeError: neither or both of ``handler`` and ``main``; ``args`` not serialisable.
        ValueError: a handler or main that a new process cannot find, a bad ``loop``.
    """

    def __init__(
        self,
        handler: str | ClientHandler | None = None,
        *,
        main: str | WorkerMain | None = None,
        args: Mapping[str, Any] | None = None,
        processes: int | None = None,
        loop: Literal["asyncio", "uvloop"] = "asyncio",
        dispatch: DispatchName | Picker = "least-busy",
        worker_limit: int = 1024,
        env: dict[str, str] | None = None,
        share: Sequence[socket.socket] = (),
        shutdown_timeout: float = 30.0,
        ready_timeout: float = 60.0,
    ) -> None:
        if loop not in ("asyncio", "uvloop"):
            raise ValueError(f"loop must be 'asyncio' or 'uvloop', got {loop!r}")
        if (handler is None) == (main is None):
            raise TypeError("WorkerPool needs a handler or main=, not both")
        if handler is not None:
            reference = callable_reference(handler)
            self._target: dict[str, Any] = {"handler": reference}
        else:
            assert main is not None
            reference = callable_reference(main, "main")
            self._target = {"main": reference}
        if "path" not in reference:
            resolve_reference(reference)  # fail here, not in every child, if it is wrong
        self._args = json.loads(json.dumps(dict(args or {})))  # TypeError if not JSON
        self._size = processes or os.cpu_count() or 1
        self._loop_name = loop
        self._env = env
        self._share = list(share)
        self._shutdown_timeout = shutdown_timeout
        self._ready_timeout = ready_timeout
        #: The acceptor the workers register with: add listeners to it.
        self.acceptor = Acceptor(dispatch=dispatch, worker_limit=worker_limit)
        self._slots: list[Slot] = []
        self._children: set[ChildProcess] = set()  # every process started and not yet reaped
        self._lock = asyncio.Lock()  # one change of the worker set at a time
        self._closing = False
        self._restarts = 0

    @property
    def restarts(self) -> int:
        """How many workers were restarted after exiting on their own."""
        return self._restarts

    @property
    def pids(self) -> list[int]:
        """The process ids of the serving workers, in slot order."""
        return [
            slot.child.pid
            for slot in self._slots
            if slot.child is not None and slot.child.process.returncode is None
        ]

    @property
    def retiring(self) -> list[int]:
        """The process ids of retired workers still finishing their clients."""
        return sorted(c.pid for c in self._children if c.retired and c.process.returncode is None)

    @property
    def size(self) -> int:
        """How many workers the pool keeps ([`add_worker`][aioancillary.WorkerPool.add_worker],
        [`remove_worker`][aioancillary.WorkerPool.remove_worker])."""
        return self._size

    # -- starting workers ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers; each is ready and registered with the acceptor when this returns.

        Raises:
            WorkerStartError: a worker exited (or hung) before it was ready; none is left
                running.
        """
        async with self._lock:
            slots = [Slot(index) for index in range(self._size)]
            children = await self._start_children(slots)
            for slot, child in zip(slots, children, strict=True):
                self._adopt(slot, child)
            self._slots = slots

    async def reload(self) -> None:
        """Replace every worker with a fresh process (new code), refusing and losing no client.

        New workers start, one per slot; once every one of them is ready and registered, the
        old ones are retired: they get no more clients, finish what they hold and exit (within
        ``shutdown_timeout``, then they are terminated). Returns when the new workers serve;
        [`retiring`][aioancillary.WorkerPool.retiring] lists the old ones still finishing.

        Raises:
            WorkerStartError: a new worker failed to start; the others were stopped and the
                old workers serve on.
        """
        async with self._lock:
            self._check_open()
            slots = list(self._slots)
            children = await self._start_children(slots)
            for slot, child in zip(slots, children, strict=True):
                old = slot.child
                self._adopt(slot, child)
                if old is not None:
                    self._retire(old)
            logger.info("reloaded: workers %s replace %s", self.pids, self.retiring)

    async def add_worker(self) -> int:
        """Start one more worker; returns its pid once it is ready and registered.

        Raises:
            WorkerStartError: it failed to start (the pool keeps its size).
        """
        async with self._lock:
            self._check_open()
            used = {slot.index for slot in self._slots}
            slot = Slot(min(set(range(len(used) + 1)) - used))
            (child,) = await self._start_children([slot])
            self._adopt(slot, child)
            self._slots.append(slot)
            self._slots.sort(key=lambda s: s.index)
            self._size += 1
            return child.pid

    async def remove_worker(self) -> int:
        """Retire the worker of the highest slot: it finishes its clients and exits.

        Returns:
            Its pid.

        Raises:
            ValueError: it is the last worker.
        """
        async with self._lock:
            self._check_open()
            if len(self._slots) <= 1:
                raise ValueError("a pool keeps at least one worker")
            slot = self._slots.pop()
            self._size -= 1
            child, slot.child = slot.child, None
            if child is None:
                return 0
            self._retire(child)
            return child.pid

    def _check_open(self) -> None:
        if self._closing:
            raise RuntimeError("the pool is shutting down")

    async def _start_children(self, slots: list[Slot]) -> list[ChildProcess]:
        """Start a worker for each slot; register them all once all are ready, or none."""
        children: list[ChildProcess] = []
        try:
            for slot in slots:
                children.append(await self._spawn(slot))
            results = await asyncio.gather(
                *(self._until_ready(child) for child in children), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        except BaseException:
            await self._discard(children)
            raise
        dead = [child for child in children if child.process.returncode is not None]
        if dead:
            await self._discard(children)
            code = dead[0].process.returncode
            raise WorkerStartError(
                f"worker {dead[0].slot.index} (pid {dead[0].pid}) exited with "
                f"{describe(code or 0)} right after it was ready",
                code,
            )
        for child in children:
            self._register(child)
        return children

    async def _spawn(self, slot: Slot) -> ChildProcess:
        config = {**self._target, "args": self._args, "loop": self._loop_name}
        env = None if self._env is None else {**os.environ, **self._env}
        child = await spawn(slot, config, env, [sock.fileno() for sock in self._share])
        child.started = _clock()
        self._children.add(child)
        child.watcher = asyncio.get_running_loop().create_task(self._watch(child))
        return child

    async def _until_ready(self, child: ChildProcess) -> None:
        await child.until_ready(self._ready_timeout)

    def _register(self, child: ChildProcess) -> bool:
        """Hand the child's link to the acceptor; ``False`` if it died since it was ready."""
        sock, child.sock = child.sock, None
        if sock is None:  # its watcher saw it exit and closed the link
            return False
        child.link = self.acceptor.add_worker(sock, pid=child.pid)
        return True

    def _adopt(self, slot: Slot, child: ChildProcess) -> None:
        slot.child = child
        child.supervised = True

    async def _discard(self, children: list[ChildProcess]) -> None:
        """Stop children that never became ready (they hold no client)."""
        for child in children:
            if child.sock is not None:
                child.sock.close()
                child.sock = None
        await terminate([c.process for c in children], 0.5)

    # -- workers leaving ----------------------------------------------------------------------

    def _retire(self, child: ChildProcess) -> None:
        """Stop a worker gracefully: no more clients; it finishes its own and exits."""
        child.retired = True
        if child.link is not None:
            with contextlib.suppress(ValueError):  # it left already
                self.acceptor.retire_worker(child.link)
        elif child.sock is not None:
            child.sock.close()
            child.sock = None
        child.reaper = asyncio.get_running_loop().create_task(self._reap(child))

    async def _reap(self, child: ChildProcess) -> None:
        try:
            async with asyncio.timeout(self._shutdown_timeout):
                await child.process.wait()
        except TimeoutError:
            logger.warning(
                "retired worker %d (pid %d) still running after %g s; terminating it",
                child.slot.index,
                child.pid,
                self._shutdown_timeout,
            )
            await terminate([child.process])

    async def _watch(self, child: ChildProcess) -> None:
        code = await child.process.wait()
        self._children.discard(child)
        if child.sock is not None and child.ready_fd is None:
            child.sock.close()  # never registered, not starting any more
            child.sock = None
        slot = child.slot
        if self._closing or child.retired or not child.supervised or slot.child is not child:
            return
        delay = slot.backoff.delay(_clock() - child.started)
        logger.warning(
            "worker %d (pid %d) exited with %s after %.1f s; restarting it%s",
            slot.index,
            child.pid,
            describe(code),
            _clock() - child.started,
            f" in {delay:g} s" if delay else "",
        )
        if delay:
            await _sleep(delay)
        await self._restart(slot, child)

    async def _restart(self, slot: Slot, old: ChildProcess) -> None:
        async with self._lock:
            if self._closing or slot.child is not old or slot not in self._slots:
                return  # shut down, reloaded or removed meanwhile
            try:
                child = await self._spawn(slot)
            except Exception:  # e.g. out of fds or processes: the pool goes on with one fewer
                logger.exception("could not restart worker %d", slot.index)
                return
            self._adopt(slot, child)  # if it fails to start, its own watcher restarts it
            self._restarts += 1
            try:
                await self._until_ready(child)
            except WorkerStartError as exc:
                logger.error("%s", exc)
                if child.process.returncode is None:
                    await terminate([child.process], 0.5)  # hung: its watcher restarts it
                return
            self._register(child)

    # -- stopping -----------------------------------------------------------------------------

    # One deadline shared by several steps (drain, exits, then signals): a caller's
    # asyncio.timeout() could only cut the whole stop short, leaving workers running.
    async def shutdown(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Stop gracefully: stop accepting, let the workers finish their clients, stop them.

        The listeners are closed at once (clients already in their backlogs are handed over
        first; new ones are refused by the kernel). Every worker gets the end of its client
        stream right away, finishes what it holds and exits; workers still running at the
        deadline are terminated (SIGTERM, then SIGKILL).

        Args:
            timeout: Deadline in seconds (default: ``shutdown_timeout``).

        Returns:
            ``True`` if every worker finished its clients and exited by itself in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._shutdown_timeout if timeout is None else timeout)
        self._closing = True
        current = asyncio.current_task()
        tasks = [t for c in self._children for t in (c.watcher, c.reaper) if t is not None]
        tasks = [t for t in tasks if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        self.acceptor.stop_accepting()
        self.acceptor.close()  # every worker's client stream ends: they finish and exit
        for child in self._children:
            if child.sock is not None:  # never registered: the end of its link stops it
                child.sock.close()
                child.sock = None
        children = list(self._children)
        pending = [c.process for c in children if c.process.returncode is None]
        clean = True
        if pending:
            waits = [loop.create_task(p.wait()) for p in pending]
            _, late = await asyncio.wait(waits, timeout=max(0.0, deadline - loop.time()))
            if late:
                clean = False
                await terminate([p for p in pending if p.returncode is None])
                await asyncio.wait(waits)
        for child in children:
            if child.link is not None:
                clean = clean and child.process.returncode == 0
        if tasks:
            await asyncio.wait(tasks)
        self._children.clear()
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
