"""Helpers of the fd holder tests: holder processes, their logs and fd counts, raw peers.

:class:`HolderProcess` runs ``python -m aioancillary fdholder`` as a real process; a thread
collects its log lines (stderr) so that tests wait for what it says, never for a fixed time.
The holder's open fds are counted from ``/proc/PID/fd`` (the tests run as root, or as the
holder's own user): every test checks the holder's count as well as its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aioancillary import AncillaryMessage, OwnedFd, recv_fds, send_fds
from aioancillary._core._framing import FrameDecoder, frame_header
from aioancillary._fdholder._wire import decode, encode

#: Generous (holder processes start on a machine loaded by other test runs), and below the
#: suite's per-test timeout so that a wait that fails says what it waited for.
WAIT = 30.0
HERE = Path(__file__).resolve().parent
APPS = HERE / "fdholder_apps"


def fd_count_of(pid: int) -> int:
    """Open fds of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def loop_name() -> str:
    """The kind of the running loop: ``asyncio`` or ``uvloop``."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


class HolderProcess:
    """A holder process and what it logged."""

    def __init__(
        self, path: str | Path, loop: str, *options: str, env: dict[str, str] | None = None
    ):
        self.path = str(path)
        environment = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        environment.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aioancillary", "fdholder", "--socket", self.path,
             "--loop", loop, *options],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.lines.append("<exit>")
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fd_count(self) -> int:
        return fd_count_of(self.pid)

    def _find(self, text: str, start: int) -> str | None:
        for line in self.lines[start:]:
            if text in line:
                return line
        return None

    def wait_log(self, text: str, timeout: float = WAIT) -> str:
        """The first log line containing ``text`` (waiting for it)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while (line := self._find(text, 0)) is None:
                if "<exit>" in self.lines:
                    raise AssertionError(
                        f"the holder exited without logging {text!r}: {self.lines}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the holder did not log {text!r}: {self.lines}")
                self._changed.wait(left)
        return line

    async def log(self, text: str, timeout: float = WAIT) -> str:
        """:meth:`wait_log` without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while (line := self._find(text, 0)) is None:
            if "<exit>" in self.lines:
                raise AssertionError(f"the holder exited without logging {text!r}: {self.lines}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the holder did not log {text!r}: {self.lines}")
            await asyncio.sleep(0.01)
        return line

    def serving(self) -> HolderProcess:
        self.wait_log("serving")
        return self

    async def serving_async(self) -> HolderProcess:
        await self.log("serving")
        return self

    def returncode(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout)

    async def exited(self, timeout: float = WAIT) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the holder {self.pid} did not exit: {self.lines}")
            await asyncio.sleep(0.01)
        return self.proc.returncode

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.returncode()

    def stop(self) -> None:
        """End the holder as an operator would (SIGTERM: it drops its store and cleans up);
        SIGKILL only if that does not work."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(WAIT)
        self._reader.join(WAIT)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@contextlib.contextmanager
def holders() -> Iterator[list[HolderProcess]]:
    """Holder processes a test starts; each is killed (if still running) and reaped after."""
    started: list[HolderProcess] = []
    try:
        yield started
    finally:
        for holder in started:
            holder.stop()


@contextlib.contextmanager
def shared_directory() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="aioancillary-fdholder-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


async def start_holder(
    path: str | Path, started: list[HolderProcess], *options: str
) -> HolderProcess:
    """A holder on the running loop's kind, serving (added to ``started``, see holders())."""
    holder = HolderProcess(path, loop_name(), *options)
    started.append(holder)
    return await holder.serving_async()


async def fds_are(holder: HolderProcess, expected: int) -> None:
    """Wait until the holder has ``expected`` fds open (it closes a connection only once it
    has read the end of it: counts settle, they are not instant)."""
    deadline = time.monotonic() + WAIT
    while (count := holder.fd_count()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"holder {holder.pid} has {count} fds, not {expected}")
        await asyncio.sleep(0.01)


def inode(fd: int | OwnedFd | socket.socket) -> tuple[int, int]:
    """What identifies the open file behind ``fd``."""
    st = os.fstat(fd if isinstance(fd, int) else fd.fileno())
    return st.st_dev, st.st_ino


class Pipe:
    """A pipe whose write end goes to the holder: :meth:`at_eof` turns true exactly when no
    copy of the write end is left open, ours (until :meth:`close_writer`) or the holder's."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def close_writer(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def at_eof(self) -> bool:
        return at_eof(self.r)

    def __enter__(self) -> Pipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_writer()
        os.close(self.r)


def at_eof(fd: int) -> bool:
    """True once no process holds the write end of the pipe ``fd`` reads (non-blocking)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1) == b""
    except BlockingIOError:
        return False


class RawPeer:
    """A hand-driven holder client on a blocking socket: any bytes, any fds, framed."""

    def __init__(self, path: str, *, hello: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.decoder = FrameDecoder(max_frame_size=16 << 20)
        self.pending: list[AncillaryMessage] = []
        try:
            self.sock.connect(path)
            if hello:
                self.send(encode("hello", versions=[1]))
                body = self.answer()
                assert body["op"] == "hello", body
        except BaseException:
            self.close()
            raise

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        send_fds(self.sock, frame_header(len(fds or ()), len(data)) + data, fds or [])

    def request(self, op: str, fds: list[int] | None = None, **fields: Any) -> dict[str, Any]:
        self.send(encode(op, **fields), fds)
        return self.answer()

    def message(self) -> AncillaryMessage | None:
        """The next message, or None at end of stream."""
        while not self.pending:
            with recv_fds(self.sock, 1 << 20, 253) as chunk:
                if not chunk.data:
                    self.decoder.eof()
                    return None
                self.pending += self.decoder.feed(chunk.data, chunk.take_fds())
        return self.pending.pop(0)

    def answer(self) -> dict[str, Any]:
        msg = self.message()
        assert msg is not None, "the holder closed the connection"
        with msg:
            assert msg.fd_count == 0, msg
            body = decode(msg.data)
        assert body is not None, msg
        return body

    def at_eof(self) -> bool:
        return self.message() is None

    def close(self) -> None:
        for msg in self.pending:
            msg.close()
        self.decoder.close()
        self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_as(uid: int, gid: int, code: Any, *args: Any) -> dict[str, Any]:
    """Fork; in the child drop to ``uid``/``gid`` (setgroups, setgid, setuid) and return
    ``code(*args)``'s result (or its exception, as a string) through a pipe. The child's own
    open-fd count must be the same after ``code`` as before.

    The child runs blocking code only and leaves with ``os._exit``: it never touches an event
    loop or a thread of the parent.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            before = len(os.listdir("/proc/self/fd"))
            try:
                result = {"ok": code(*args)}
            except BaseException as exc:  # reported to the parent
                result = {"error": type(exc).__name__, "message": str(exc),
                          "trace": traceback.format_exc()}  # fmt: skip
            result["fds"] = [before, len(os.listdir("/proc/self/fd"))]
            os.write(w, json.dumps(result).encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as reader:
            data = reader.read()
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    report: dict[str, Any] = json.loads(data)
    before, after = report.pop("fds")
    assert after == before, f"the child ended with {after} fds open, not {before}: {report}"
    return report
