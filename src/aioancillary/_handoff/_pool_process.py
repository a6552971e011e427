"""The processes of a [`WorkerPool`][aioancillary.WorkerPool]: starting one, waiting until it
is ready, stopping it, and when to restart a slot's next one (`RestartBackoff`).

A worker process is ``python -m aioancillary._handoff._pool_child CONFIG``: a fresh interpreter
(never a fork of the running loop) that inherits one end of a ``socketpair`` (its link to the
acceptor) and the write end of a pipe on which it writes one byte once it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from typing import Any

from .._core._errors import WorkerStartError
from ._dispatch import WorkerInfo
from ._pool_worker import READY

__all__ = ["ChildProcess", "RestartBackoff", "Slot", "describe", "spawn", "terminate"]


class RestartBackoff:
    """When to restart one worker slot's next process (sans-I/O).

    A worker that ran at least ``stable`` seconds is restarted at once and clears its slot's
    record. One that exits sooner (a crash at start-up, a handler that kills the process)
    waits ``first`` seconds, doubled for each such exit in a row in the same slot, up to
    ``most``: a broken worker does not spin, and a slot's old failures are forgotten as soon
    as one of its workers runs stably. Other slots are not affected.
    """

    __slots__ = ("failures", "first", "most", "stable")

    def __init__(self, first: float = 0.1, most: float = 10.0, stable: float = 10.0) -> None:
        self.first = first
        self.most = most
        self.stable = stable
        #: Quick exits in a row in this slot.
        self.failures = 0

    def delay(self, lived: float) -> float:
        """Seconds to wait before restarting a worker that exited after ``lived`` seconds."""
        if lived >= self.stable:
            self.failures = 0
            return 0.0
        self.failures += 1
        return min(self.most, self.first * 2.0 ** min(self.failures - 1, 60))


class Slot:
    __slots__ = ("backoff", "child", "index")

    def __init__(self, index: int) -> None:
        self.index = index
        self.child: ChildProcess | None = None
        self.backoff = RestartBackoff()


class ChildProcess:
    """One worker process: a slot's current one, one starting, or one retiring."""

    __slots__ = (
        "link",
        "process",
        "ready_fd",
        "reaper",
        "retired",
        "slot",
        "sock",
        "started",
        "supervised",
        "watcher",
    )

    def __init__(
        self, slot: Slot, process: asyncio.subprocess.Process, sock: socket.socket, ready_fd: int
    ) -> None:
        self.slot = slot
        self.process = process
        self.sock: socket.socket | None = sock  # ours until the acceptor owns it (registered)
        self.ready_fd: int | None = ready_fd
        self.link: WorkerInfo | None = None
        self.started = 0.0  # the pool's clock when it started
        self.supervised = False  # restarted when it exits (a slot's current worker)
        self.retired = False
        self.watcher: asyncio.Task[None] | None = None
        self.reaper: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    async def until_ready(self, timeout: float) -> None:  # noqa: ASYNC109 - a deadline to report
        """Wait for the ready byte; raise `WorkerStartError` if it never comes (the process
        exited first, or ``timeout`` passed: the caller stops it then)."""
        loop = asyncio.get_running_loop()
        fd = self.ready_fd
        assert fd is not None
        said: asyncio.Future[bytes] = loop.create_future()

        def readable() -> None:
            try:
                data = os.read(fd, 1)
            except OSError:
                data = b""
            if not said.done():
                said.set_result(data)

        loop.add_reader(fd, readable)
        try:
            async with asyncio.timeout(timeout):
                data = await said
        except TimeoutError:
            raise WorkerStartError(
                f"worker {self.slot.index} (pid {self.pid}) was not ready after {timeout:g} s "
                "(ready_timeout); it was stopped"
            ) from None
        finally:
            loop.remove_reader(fd)
            os.close(fd)
            self.ready_fd = None
        if data != READY:  # the pipe's end: the process exited (or closed it) first
            code = await self.process.wait()
            raise WorkerStartError(
                f"worker {self.slot.index} (pid {self.pid}) exited with {describe(code)} "
                "before it was ready; its error is above, on stderr",
                code,
            )


async def spawn(
    slot: Slot, config: dict[str, Any], env: dict[str, str] | None, shared: list[int]
) -> ChildProcess:
    """Start the worker process of ``slot`` (``config``: what ``_pool_child`` reads), with
    copies of the fds ``shared`` at the same numbers."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ready_r, ready_w = os.pipe()
    try:
        config = {
            **config,
            "index": slot.index,
            "fd": theirs.fileno(),
            "ready": ready_w,
            "sys_path": sys.path,
            "shared": shared,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aioancillary._handoff._pool_child",
            json.dumps(config),
            pass_fds=(theirs.fileno(), ready_w, *shared),
            env=env,
        )
    except BaseException:
        ours.close()
        os.close(ready_r)
        raise
    finally:
        theirs.close()  # the child has its own copies
        os.close(ready_w)
    return ChildProcess(slot, process, ours, ready_r)


async def terminate(processes: list[asyncio.subprocess.Process], grace: float = 2.0) -> None:
    processes = [p for p in processes if p.returncode is None]
    if not processes:
        return
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


def describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"
