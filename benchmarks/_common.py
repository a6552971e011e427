"""What every benchmark child process shares: the job, the control link, fd and RSS counters.

A child is forked by ``run.py`` for one role of one cell. It talks to the parent over its own
control socket, one JSON object per line (the C program speaks the same protocol):

* child → parent ``{"event": "ready", "fds": N}`` once set up (the "before" fd count);
* parent → child ``go`` — only roles that start the traffic wait for it; the parent reads its
  clock just before sending it;
* an *active* role (receiver, ping-pong initiator, handoff worker) reports
  ``{"event": "done", "t_end": ns, "messages": ..., "fds_received": ..., "fds": N}`` as soon as
  its last message is in (``t_end`` on ``CLOCK_MONOTONIC``, as the parent's clock);
* a *passive* role (sender, echo side, acceptor) reports ``{"event": "sent"}``, waits for
  ``finish`` (sent once the active side has everything, so nothing of this side is still
  queued) and reports ``{"event": "done", "fds": N}``.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: 16 bytes, the same in every implementation and every message.
PAYLOAD = b"fdbench-message\x00"
MSG_SIZE = len(PAYLOAD)

_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def count_fds() -> int:
    """Open fds of this process (``/proc/self/fd``, minus the listing's own fd)."""
    return len(os.listdir("/proc/self/fd")) - 1


def cpu_seconds() -> float:
    """CPU time (user + system) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_kib() -> int:
    """Resident set size of this process, in KiB."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE_KIB


def open_devnull() -> int:
    """The fd every sender sends (the same one in every message)."""
    return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)


class Control:
    """The child's end of the control link."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    def _send(self, **fields: Any) -> None:
        self.sock.sendall(json.dumps(fields).encode() + b"\n")

    def _take_line(self) -> bytes | None:
        line, sep, rest = self._buf.partition(b"\n")
        if not sep:
            return None
        self._buf = rest
        return line

    def _check(self, line: bytes, word: str) -> None:
        if line.decode() != word:
            raise RuntimeError(f"expected {word!r} on the control link, got {line!r}")

    def expect(self, word: str) -> None:
        """Block until the parent sends ``word``."""
        while (line := self._take_line()) is None:
            chunk = self.sock.recv(256)
            if not chunk:
                raise RuntimeError("the parent closed the control link")
            self._buf += chunk
        self._check(line, word)

    async def expect_async(self, word: str) -> None:
        """Wait for ``word`` without blocking the running loop (its queues may still drain)."""
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        try:
            while (line := self._take_line()) is None:
                chunk = await loop.sock_recv(self.sock, 256)
                if not chunk:
                    raise RuntimeError("the parent closed the control link")
                self._buf += chunk
        finally:
            self.sock.setblocking(True)
        self._check(line, word)

    def ready(self) -> None:
        """Report the "before" fd count; call it right after setup."""
        self._send(event="ready", fds=count_fds(), cpu=cpu_seconds())

    def done_active(self, messages: int, fds_received: int, t_end: int = 0, **extra: Any) -> None:
        """Report the end of the timed region (call right after the last message, or pass
        ``t_end`` taken then)."""
        t_end = t_end or time.monotonic_ns()
        self._send(
            event="done",
            t_end=t_end,
            messages=messages,
            fds_received=fds_received,
            fds=count_fds(),
            cpu=cpu_seconds(),
            **extra,
        )

    def sent(self) -> None:
        """Passive side: everything was handed to the socket or library."""
        self._send(event="sent")

    def done_passive(self, **extra: Any) -> None:
        """Passive side, after ``finish``: report the "after" fd count."""
        self._send(event="done", fds=count_fds(), cpu=cpu_seconds(), **extra)

    async def finish_async(self, **extra: Any) -> None:
        """Passive side of an asyncio implementation: sent, finish, done."""
        self.sent()
        await self.expect_async("finish")
        self.done_passive(**extra)

    def finish(self, **extra: Any) -> None:
        """Passive side of a blocking implementation: sent, finish, done."""
        self.sent()
        self.expect("finish")
        self.done_passive(**extra)


@dataclass
class Job:
    """One role of one benchmark cell, as seen by the child that runs it."""

    role: str  # send, recv, ping, pong, accept
    ctrl: Control
    sock: socket.socket
    n: int  # messages (round trips for ping/pong, connections for accept)
    nfds: int  # fds per message
    loop: str = ""  # "asyncio" or "uvloop" for asyncio-based implementations
    variant: str = ""  # aioancillary: "framed", "raw" or "batch"
    path: str = ""  # aioancillary: "py" for the pure-Python hot path
    latfile: str = ""  # ping: where to write the int64 ns latencies
    listener: socket.socket | None = None  # accept: the listening TCP socket
    rss_every: int = 0  # soak: sample RSS every this many messages (0: never)
    profile: str = ""  # recv: write cProfile stats of the timed region here


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event-loop factory for ``asyncio.Runner(loop_factory=...)`` (no policies)."""
    if name == "uvloop":
        import uvloop  # noqa: PLC0415 - bench-only dependency, imported where used

        return uvloop.new_event_loop
    if name == "asyncio":
        return asyncio.new_event_loop
    raise ValueError(f"unknown loop {name!r}")


def run_async(job: Job, main: Callable[[Job], Any]) -> None:
    """Run ``main(job)`` on the job's loop."""
    with asyncio.Runner(loop_factory=loop_factory(job.loop)) as runner:
        runner.run(main(job))


async def accept(listener: socket.socket) -> socket.socket:
    """Accept on a non-blocking listener: try at once, wait through the loop only on EAGAIN.

    Every asyncio-based acceptor uses this, so the handoff compares fd passing rather than
    ``loop.sock_accept`` implementations (uvloop's costs about twice asyncio's per call).
    """
    try:
        conn, _addr = listener.accept()
    except BlockingIOError:
        conn, _addr = await asyncio.get_running_loop().sock_accept(listener)
    return conn


def write_latencies(path: str, latencies: array.array[int]) -> None:
    """Write round-trip latencies (int64 ns) where the parent reads them."""
    with open(path, "wb") as f:
        latencies.tofile(f)


def fds_of(ancdata: list[tuple[int, int, bytes]]) -> array.array[int]:
    """The fd numbers of the SCM_RIGHTS records in ``ancdata`` (partial trailing int dropped)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return fds
