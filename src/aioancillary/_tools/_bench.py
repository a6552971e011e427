"""``python -m aioancillary bench``: a quick benchmark that runs from the installed package.

Each cell is one workload with one implementation, run by two fresh processes over an
``AF_UNIX`` socketpair: 16-byte messages, each carrying one fd (``/dev/null``) that the
receiver closes. The reference is the stdlib's blocking ``socket.send_fds`` /
``socket.recv_fds`` in the same run; aioancillary runs on asyncio and, when it is installed,
on uvloop. The repository's ``benchmarks/`` harness measures much more (a C reference, anyio,
4 fds, hand-off, a soak); this module needs nothing but the package.

Workloads:

* ``stream-1fd``: one-way throughput on ``SOCK_STREAM`` (aioancillary framed, ``async for``);
* ``seqpacket-1fd``: one-way throughput on ``SOCK_SEQPACKET``;
* ``ping-pong``: round trips, each way one message with one fd; both processes on one CPU
  (Linux), so that the figure is the software's path and not a cross-CPU wake-up.

The clock is ``CLOCK_MONOTONIC``, shared by every process: a throughput cell runs from the
sender's start to the receiver's last message.

Run as a module (``python -m aioancillary._tools._bench ROLE IMPL FD N [CPU]``) it is one side of a
cell, started by `run_cell`.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

PAYLOAD = b"aioancillary-16b"
WORKLOADS = ("stream-1fd", "seqpacket-1fd", "ping-pong")
REFERENCE = "stdlib"
#: A side that has not finished after this long is stuck: it kills itself (SIGALRM).
CHILD_TIMEOUT = 120

_Report = dict[str, Any]


class BenchError(RuntimeError):
    """A cell failed: a side crashed, timed out or reported the wrong count."""


@dataclass(frozen=True)
class Cell:
    """One workload with one implementation (``stdlib``, ``asyncio`` or ``uvloop``)."""

    workload: str
    impl: str

    @property
    def label(self) -> str:
        return f"{self.workload} {implementation_name(self.impl)}"


@dataclass(frozen=True)
class Result:
    """One run of a cell: ``n`` messages (round trips for ping-pong) in ``seconds``."""

    cell: Cell
    n: int
    seconds: float
    p50_us: float | None = None

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def implementation_name(impl: str) -> str:
    return "stdlib (blocking)" if impl == REFERENCE else f"aioancillary {impl}"


def make_cells(loops: list[str]) -> list[Cell]:
    return [Cell(w, impl) for w in WORKLOADS for impl in (REFERENCE, *loops)]


def messages_for(workload: str, n: int) -> int:
    """Round trips cost about ten one-way messages: ping-pong runs a tenth of ``n``."""
    return max(1, n // 10) if workload == "ping-pong" else n


# -- the parent: runs cells ---------------------------------------------------------------------


def run_cell(cell: Cell, n: int) -> Result:
    """Run one cell in two child processes and return its result.

    Raises:
        BenchError: a side failed or reported something unexpected.
    """
    count = messages_for(cell.workload, n)
    kind = socket.SOCK_SEQPACKET if cell.workload.startswith("seqpacket") else socket.SOCK_STREAM
    active, passive = ("ping", "pong") if cell.workload == "ping-pong" else ("send", "recv")
    cpu = _one_cpu() if cell.workload == "ping-pong" else None
    left, right = socket.socketpair(socket.AF_UNIX, kind)
    procs: list[subprocess.Popen[str]] = []
    try:
        for role, sock in ((passive, right), (active, left)):
            args = [role, cell.impl, str(sock.fileno()), str(count)]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "aioancillary._tools._bench", *args]
                    + ([str(cpu)] if cpu is not None else []),
                    pass_fds=[sock.fileno()],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        left.close()  # each end now lives in exactly one child
        right.close()
        tx = procs[1]
        for proc in procs:
            _expect(proc, "ready", cell)
        assert tx.stdin is not None
        tx.stdin.write("go\n")
        tx.stdin.flush()
        reports = [_finish(proc, cell) for proc in procs]
    finally:
        left.close()
        right.close()
        for proc in procs:
            if proc.poll() is None:  # only after a failure: stop what is left
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    rx_report, tx_report = reports
    if (rx_report["count"], rx_report["fds"]) != (count, count):
        raise BenchError(
            f"{cell.label}: {rx_report['count']} messages with {rx_report['fds']} fds "
            f"arrived, not {count} with {count}"
        )
    if cell.workload == "ping-pong":
        return Result(cell, count, tx_report["end"] - tx_report["start"], tx_report["p50_us"])
    return Result(cell, count, rx_report["end"] - tx_report["start"])


def _one_cpu() -> int | None:
    affinity = getattr(os, "sched_getaffinity", None)
    return min(affinity(0)) if affinity is not None else None


def _expect(proc: subprocess.Popen[str], word: str, cell: Cell) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != word:
        _fail(proc, cell, f"expected {word!r}, got {line!r}")


def _finish(proc: subprocess.Popen[str], cell: Cell) -> _Report:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.wait(timeout=CHILD_TIMEOUT)
    if proc.returncode != 0 or not line:
        _fail(proc, cell, f"exit status {proc.returncode}")
    report: _Report = json.loads(line)
    return report


def _fail(proc: subprocess.Popen[str], cell: Cell, what: str) -> None:
    if proc.poll() is None:
        proc.kill()
    assert proc.stderr is not None
    err = proc.stderr.read().strip().splitlines()
    raise BenchError(f"{cell.label}: {what}" + (f": {err[-1]}" if err else ""))


# -- the parent: progress, repeats and the table -------------------------------------------------


class Progress:
    """Cells done / total, elapsed and ETA on ``stream``: one line redrawn on a terminal, a
    plain line per cell otherwise (a log file, a CI job)."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()

    def _times(self) -> str:
        elapsed = time.monotonic() - self.started
        if not self.done:
            return f"elapsed {elapsed:.1f} s, ETA unknown"
        eta = elapsed / self.done * (self.total - self.done)
        return f"elapsed {elapsed:.1f} s, ETA {eta:.0f} s"

    def start(self, label: str) -> None:
        if self.tty:
            line = f"[{self.done}/{self.total}] {self._times()}; running {label}"
            self.stream.write(f"\r\x1b[K{line}")
            self.stream.flush()

    def finish_cell(self, label: str, outcome: str) -> None:
        self.done += 1
        line = f"[{self.done}/{self.total}] {label}: {outcome} ({self._times()})"
        self.stream.write(f"\r\x1b[K{line}\n" if self.tty else f"{line}\n")
        self.stream.flush()


def run_all(
    loops: list[str], n: int, repeat: int, progress: Progress | None = None
) -> tuple[dict[Cell, list[Result]], dict[Cell, str]]:
    """Run every cell ``repeat`` times, interleaved (every cell once, then again), so that
    load from other processes spreads over all implementations."""
    cells = make_cells(loops)
    results: dict[Cell, list[Result]] = {}
    errors: dict[Cell, str] = {}
    for _ in range(repeat):
        for cell in cells:
            if cell in errors:
                continue
            if progress:
                progress.start(cell.label)
            try:
                result = run_cell(cell, n)
            except BenchError as exc:
                errors[cell] = str(exc)
                if progress:
                    progress.finish_cell(cell.label, "FAILED")
                continue
            results.setdefault(cell, []).append(result)
            if progress:
                progress.finish_cell(cell.label, _rate_text(result))
    return results, errors


def _rate_text(result: Result) -> str:
    unit = "round trips/s" if result.cell.workload == "ping-pong" else "msgs/s"
    return f"{result.rate:,.0f} {unit}"


def table(results: dict[Cell, list[Result]], errors: dict[Cell, str], loops: list[str]) -> str:
    """The ratio table: each cell's best repeat against the stdlib's best, per workload."""
    header = ("workload", "implementation", "rate /s", "vs stdlib", "p50 µs")
    rows: list[tuple[str, ...]] = []
    for cell in make_cells(loops):
        if cell in errors:
            rows.append((cell.workload, implementation_name(cell.impl), "FAILED", "", ""))
            continue
        best = max(results[cell], key=lambda r: r.rate)
        reference = results.get(Cell(cell.workload, REFERENCE))
        ratio = ""
        if reference:
            ratio = f"{best.rate / max(r.rate for r in reference):.2f}x"
        p50 = f"{best.p50_us:.1f}" if best.p50_us is not None else "-"
        rows.append(
            (cell.workload, implementation_name(cell.impl), f"{best.rate:,.0f}", ratio, p50)
        )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    left = {0, 1}

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(widths[i]) if i in left else c.rjust(widths[i]) for i, c in enumerate(row)
        ).rstrip()

    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])


def describe(loops: list[str], n: int, repeat: int) -> str:
    from .._core._version import __version__  # noqa: PLC0415 - for the header

    versions = [f"aioancillary {__version__}", f"CPython {platform.python_version()}"]
    if "uvloop" in loops:
        import uvloop  # noqa: PLC0415 - optional

        versions.append(f"uvloop {getattr(uvloop, '__version__', '?')}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "\n".join(
        [
            f"{', '.join(versions)}; {platform.system()} {platform.release()}, {cpus} CPUs",
            "Two processes per cell over an AF_UNIX socketpair, 16-byte messages with 1 fd each:",
            f"{n:,} messages per cell ({messages_for('ping-pong', n):,} round trips for "
            f"ping-pong), best of {repeat}.",
            "vs stdlib: the rate against the stdlib's blocking socket.send_fds/recv_fds, "
            "measured in this run",
            "(higher is faster). A quick look: the repository's benchmarks/ measures more.",
        ]
    )


# -- a child: one side of a cell ----------------------------------------------------------------


def _ready() -> None:
    print("ready", flush=True)


def _wait_go() -> None:
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("the parent did not say go")


def _recv_one_blocking(sock: socket.socket) -> int:
    """One 16-byte message (possibly in several reads on a stream); closes its fds."""
    got = fds_seen = 0
    while got < len(PAYLOAD):
        data, fds, _flags, _addr = socket.recv_fds(sock, len(PAYLOAD) - got, 1)
        if not data:
            raise EOFError("the peer hung up early")
        for fd in fds:
            os.close(fd)
        got += len(data)
        fds_seen += len(fds)
    return fds_seen


def _stdlib_side(role: str, sock: socket.socket, n: int, fd: int) -> _Report:
    send_fds = socket.send_fds
    _ready()
    if role == "recv":
        fds = sum(_recv_one_blocking(sock) for _ in range(n))
        return {"count": n, "fds": fds, "end": time.monotonic()}
    if role == "pong":
        fds = 0
        for _ in range(n):
            fds += _recv_one_blocking(sock)
            send_fds(sock, [PAYLOAD], [fd])
        return {"count": n, "fds": fds}
    _wait_go()
    start = time.monotonic()
    if role == "send":
        for _ in range(n):
            send_fds(sock, [PAYLOAD], [fd])
        return {"start": start}
    latencies = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        send_fds(sock, [PAYLOAD], [fd])
        _recv_one_blocking(sock)
        latencies.append(clock() - t)
    return _ping_report(start, latencies)


def _ping_report(start: float, latencies: list[int]) -> _Report:
    end = time.monotonic()
    return {"start": start, "end": end, "p50_us": statistics.median(latencies) / 1000}


async def _async_side(role: str, sock: socket.socket, n: int, fd: int) -> _Report:
    from .._asyncio._client import open_unix_connection  # noqa: PLC0415 - a child imports what it runs

    conn = await open_unix_connection(sock=sock)
    _ready()
    try:
        if role == "recv":
            count = fds = 0
            async for msg in conn:
                with msg:  # closes the received fd
                    fds += len(msg.fds)
                count += 1
                if count == n:
                    break
            return {"count": count, "fds": fds, "end": time.monotonic()}
        if role == "pong":
            count = fds = 0
            async for msg in conn:
                with msg:  # the received fd goes back, then is closed
                    fds += len(msg.fds)
                    await conn.send_fds(PAYLOAD, msg.fds)
                count += 1
                if count == n:
                    break
            return {"count": count, "fds": fds}
        _wait_go()
        start = time.monotonic()
        if role == "send":
            for _ in range(n):
                await conn.send_fds(PAYLOAD, [fd])
            return {"start": start}
        latencies = []
        clock = time.perf_counter_ns
        for _ in range(n):
            t = clock()
            await conn.send_fds(PAYLOAD, [fd])
            (await conn.recv()).close()
            latencies.append(clock() - t)
        return _ping_report(start, latencies)
    finally:
        conn.close()  # a sender's queue is flushed before the socket closes
        await conn.wait_closed()


def _loop_factory(impl: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if impl == "uvloop":
        import uvloop  # noqa: PLC0415 - optional

        return uvloop.new_event_loop
    if impl != "asyncio":
        raise ValueError(f"unknown implementation {impl!r}")
    return asyncio.new_event_loop


def child(argv: list[str]) -> int:
    """One side of a cell: ``ROLE IMPL FD N [CPU]``; prints ``ready``, then a JSON report."""
    role, impl, fd_text, n_text, *cpu = argv
    signal.alarm(CHILD_TIMEOUT)  # a stuck side dies instead of hanging the run
    if cpu and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(cpu[0])})
    sock = socket.socket(fileno=int(fd_text))
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if impl == REFERENCE:
            with sock:
                report = _stdlib_side(role, sock, int(n_text), devnull)
        else:
            factory = _loop_factory(impl)
            with asyncio.Runner(loop_factory=factory) as runner:
                report = runner.run(_async_side(role, sock, int(n_text), devnull))
    finally:
        os.close(devnull)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(child(sys.argv[1:]))
