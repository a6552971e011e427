"""``python -m aioancillary serve`` as a real child process, with its stderr and its service
manager notifications (a ``NOTIFY_SOCKET`` the test binds) collected as they come."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def gone(pid: int) -> bool:
    """The process no longer exists (reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class Runner:
    """A running ``serve`` runner. Use :func:`start_runner`."""

    def __init__(self, proc: asyncio.subprocess.Process, notify: socket.socket) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.notifications: list[dict[str, str]] = []
        self._notify = notify
        self._tasks = [
            asyncio.ensure_future(self._read_stderr()),
            asyncio.ensure_future(self._read_notify()),
        ]
        self.pids_seen: set[int] = set()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            self.lines.append(text)
            if os.environ.get("SERVE_TEST_ECHO"):
                print(text, file=sys.stderr)

    async def _read_notify(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self._notify, 65536)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.notifications.append(fields)
            status = fields.get("STATUS", "")
            if match := re.search(r"\[([\d, ]+)\]", status):
                self.pids_seen.update(int(p) for p in match.group(1).split(","))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def port(self) -> int:
        for line in self.lines:
            if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                return int(match.group(1))
        raise AssertionError(f"no port in the log: {self.lines}")

    def workers(self) -> list[int]:
        """The worker pids of the last STATUS notification that lists them."""
        for fields in reversed(self.notifications):
            if match := re.search(r"\[([\d, ]+)\]", fields.get("STATUS", "")):
                return [int(p) for p in match.group(1).split(",")]
        return []

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.returncode is not None and not predicate():
                await asyncio.sleep(0.2)  # the last lines
                if predicate():
                    return
                raise AssertionError(
                    f"the runner exited ({self.proc.returncode}):\n" + "\n".join(self.lines)
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"condition not met in {timeout} s:\n" + "\n".join(self.lines[-40:])
                )
            await asyncio.sleep(0.02)

    async def wait_log(self, pattern: str, start: int = 0, timeout: float = 60.0) -> str:
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.lines[start:] if re.search(pattern, line)]
            return bool(found)

        await self.wait_for(seen, timeout)
        return found[0]

    async def wait_notify(self, key: str, start: int = 0, timeout: float = 60.0) -> dict[str, str]:
        await self.wait_for(lambda: any(key in n for n in self.notifications[start:]), timeout)
        return next(n for n in self.notifications[start:] if key in n)

    async def ready(self) -> None:
        """Wait for READY=1 (the workers serve)."""
        await self.wait_notify("READY")

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 60.0) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._tasks[0], timeout)
        return code

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._notify.close()


async def start_runner(
    tmp_path: Path,
    app: str,
    *args: str,
    env: dict[str, str] | None = None,
    command: Sequence[str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Runner:
    """Start the runner (cwd: tests/, so that ``helpers.*`` imports in its workers)."""
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.setblocking(False)
    full_env = {**os.environ, "NOTIFY_SOCKET": notify_path, **(env or {})}
    argv = [sys.executable, "-m", "aioancillary", "serve", app, *args]
    proc = await asyncio.create_subprocess_exec(
        *(command or ()),
        *argv,
        cwd=TESTS,
        env=full_env,
        stderr=asyncio.subprocess.PIPE,
        pass_fds=pass_fds,
    )
    return Runner(proc, notify)
