"""Parent side: what is measured (workloads x implementations) and how one cell is run.

One cell = one workload with one implementation: an AF_UNIX socketpair (plus a loopback TCP
listener for the handoff), two forked processes (three for the handoff: the load generator is
the C program for every implementation), each with its own control link. Setup happens
before the children report ``ready``; the clock starts when the parent sends ``go`` and stops
when the receiving side has its last message (``CLOCK_MONOTONIC``, the same clock in every
process). Each child counts its open fds after setup and again at the end.
"""

from __future__ import annotations

import array
import contextlib
import importlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD = HERE / "_build"
FDBENCH = BUILD / "fdbench"
CELL_TIMEOUT = 120.0  # seconds for any one control message; a cell should take ~1 s


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "oneway", "pingpong" or "handoff"
    sock_type: int
    nfds: int
    title: str
    pinned: bool = True  # ping-pong: both sides on one CPU (see run_cell)


@dataclass(frozen=True)
class Impl:
    name: str
    module: str  # "c", "stdlib", "anyio", "naive", "aioancillary"
    loop: str = ""
    variant: str = ""
    label: str = ""
    path: str = ""  # aioancillary: "" the process's hot path (C when built), "py" pure Python

    def applies(self, workload: Workload) -> bool:
        if self.variant == "raw" and workload.sock_type != socket.SOCK_STREAM:
            return False  # boundaries are the kernel's on seqpacket: raw == framed
        if self.variant == "batch" and workload.kind == "pingpong":
            return False  # one message in flight: nothing to batch
        return workload.name != "soak" or self.module == "aioancillary"


WORKLOADS = [
    Workload("stream-1fd", "oneway", socket.SOCK_STREAM, 1, "SOCK_STREAM, 1 fd/msg"),
    Workload("stream-4fd", "oneway", socket.SOCK_STREAM, 4, "SOCK_STREAM, 4 fds/msg"),
    Workload("seqpacket-1fd", "oneway", socket.SOCK_SEQPACKET, 1, "SOCK_SEQPACKET, 1 fd/msg"),
    Workload("seqpacket-4fd", "oneway", socket.SOCK_SEQPACKET, 4, "SOCK_SEQPACKET, 4 fds/msg"),
    Workload("pingpong", "pingpong", socket.SOCK_STREAM, 1, "ping-pong, 1 fd each way"),
    Workload(
        "pingpong-unpinned",
        "pingpong",
        socket.SOCK_STREAM,
        1,
        "ping-pong, 1 fd each way, not pinned",
        pinned=False,
    ),
    Workload("handoff", "handoff", socket.SOCK_STREAM, 1, "TCP accept handoff"),
]
SOAK = Workload("soak", "oneway", socket.SOCK_STREAM, 1, "1M messages, 1 fd/msg")

IMPLS = [
    Impl("c", "c", label="C sendmsg/recvmsg"),
    Impl("stdlib", "stdlib", label="stdlib send_fds/recv_fds (blocking)"),
    Impl("anyio-asyncio", "anyio", "asyncio", label="anyio, asyncio"),
    Impl("anyio-uvloop", "anyio", "uvloop", label="anyio, uvloop"),
    Impl("naive-asyncio", "naive", "asyncio", label="naive add_reader+recvmsg"),
    Impl("naive-uvloop", "naive", "uvloop", label="naive add_reader+recvmsg, uvloop"),
    Impl("aioancillary-asyncio-framed", "aioancillary", "asyncio", "framed", "aioancillary"),
    Impl("aioancillary-asyncio-raw", "aioancillary", "asyncio", "raw", "aioancillary"),
    Impl("aioancillary-asyncio-batch", "aioancillary", "asyncio", "batch", "aioancillary"),
    Impl("aioancillary-uvloop-framed", "aioancillary", "uvloop", "framed", "aioancillary"),
    Impl("aioancillary-uvloop-raw", "aioancillary", "uvloop", "raw", "aioancillary"),
    Impl("aioancillary-uvloop-batch", "aioancillary", "uvloop", "batch", "aioancillary"),
    # The same on the pure-Python path (issue 20: both paths side by side; "-py" rows).
    *(
        Impl(f"aioancillary-{loop}-{variant}-py", "aioancillary", loop, variant, "pure", "py")
        for loop in ("asyncio", "uvloop")
        for variant in ("framed", "raw", "batch")
    ),
]


class CellError(Exception):
    """A cell failed (a child crashed or timed out, or fds went missing)."""


@dataclass
class CellResult:
    workload: str
    impl: str
    n: int
    seconds: float
    rate: float  # messages (round trips, connections) per second at the receiving side
    leaked_rx: int
    leaked_tx: int
    p50_us: float | None = None
    p99_us: float | None = None
    cpu_rx: float = 0.0  # CPU time / wall time of the receiving side in the timed region
    cpu_tx: float = 0.0  # the same for the sending side(s), load generator excluded
    rss_rx: list[int] = field(default_factory=list)
    rss_tx: list[int] = field(default_factory=list)


def build_c(cc: str = "cc") -> None:
    """Compile the C reference into ``_build/`` (gitignored)."""
    BUILD.mkdir(exist_ok=True)
    src = HERE / "c" / "fdbench.c"
    cmd = [cc, "-O2", "-Wall", "-o", str(FDBENCH), str(src)]
    subprocess.run(cmd, check=True)


def percentile(sorted_values: array.array[int] | list[int], q: float) -> int:
    """Nearest-rank percentile of already sorted values."""
    idx = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[idx]


class _Link:
    """The parent's end of one child's control link."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.buf = b""
        sock.settimeout(CELL_TIMEOUT)

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                raise CellError(f"{self.name}: no word in {CELL_TIMEOUT:.0f} s") from None
            if not chunk:
                raise CellError(f"{self.name}: exited before reporting (see its stderr)")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        event: dict[str, Any] = json.loads(line)
        return event

    def expect(self, name: str) -> dict[str, Any]:
        event = self.read()
        if event.get("event") != name:
            raise CellError(f"{self.name}: expected {name!r}, got {event!r}")
        return event

    def send(self, word: str) -> None:
        self.sock.sendall(word.encode() + b"\n")


@dataclass
class _Child:
    role: str
    impl: Impl
    active: bool  # the receiving side: its "done" stops the clock
    go: bool  # starts the traffic when told
    sock: socket.socket | None
    listener: socket.socket | None = None
    link: _Link | None = None
    pid: int = 0
    popen: subprocess.Popen[bytes] | None = None
    counted: bool = True  # the load generator's fds are not part of the measurement


def _roles(
    workload: Workload,
    impl: Impl,
    a: socket.socket,
    b: socket.socket,
    listener: socket.socket | None,
) -> list[_Child]:
    c_impl = IMPLS[0]
    if workload.kind == "pingpong":
        return [_Child("pong", impl, False, False, a), _Child("ping", impl, True, True, b)]
    if workload.kind == "handoff":
        return [
            _Child("recv", impl, True, False, b),
            _Child("accept", impl, False, False, a, listener),
            _Child("connect", c_impl, False, True, None, listener, counted=False),
        ]
    return [_Child("recv", impl, True, False, b), _Child("send", impl, False, True, a)]


def _c_args(child: _Child, ctrl: socket.socket, n: int, nfds: int, latfile: str) -> list[str]:
    sock = str(child.sock.fileno()) if child.sock is not None else "-"
    arg = {"send": str(nfds), "recv": str(nfds), "ping": latfile, "pong": "0"}.get(child.role)
    if arg is None:
        assert child.listener is not None
        arg = str(child.listener.fileno())
    return [str(FDBENCH), child.role, sock, str(ctrl.fileno()), str(n), arg]


def _child_main(child: _Child, ctrl: socket.socket, others: list[socket.socket], **job: Any) -> int:
    # In the forked child: drop every socket of the cell that is not this role's, so that the
    # peer's end lives in exactly one process.
    for sock in others:
        sock.close()
    try:
        from _common import Control, Job  # noqa: PLC0415 - after fork, in the child

        module = importlib.import_module(f"impl_{child.impl.module}")
        assert child.sock is not None
        role = module.ROLES[child.role]
        role(Job(child.role, Control(ctrl), child.sock, listener=child.listener, **job))
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _start(
    child: _Child,
    cell_socks: list[socket.socket],
    *,
    n: int,
    nfds: int,
    latfile: str,
    rss_every: int,
    profile: str,
) -> None:
    parent_end, child_end = socket.socketpair()
    child.link = _Link(parent_end, f"{child.impl.name}/{child.role}")
    if child.impl.module == "c":
        fds = [child_end.fileno()] + [s.fileno() for s in (child.sock, child.listener) if s]
        args = _c_args(child, child_end, n, nfds, latfile)
        child.popen = subprocess.Popen(args, pass_fds=fds)
    else:
        keep = {id(s) for s in (child.sock, child.listener, child_end) if s is not None}
        others = [s for s in [*cell_socks, parent_end] if id(s) not in keep]
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child_main(
                    child,
                    child_end,
                    others,
                    n=n,
                    nfds=nfds,
                    loop=child.impl.loop,
                    variant=child.impl.variant,
                    path=child.impl.path,
                    latfile=latfile if child.role == "ping" else "",
                    rss_every=rss_every,
                    profile=f"{profile}-{'rx' if child.active else 'tx'}.pstats" if profile else "",
                )
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        child.pid = pid
    child_end.close()
    cell_socks.append(parent_end)


def _reap(children: list[_Child], kill: bool) -> list[str]:
    failures = []
    for child in children:
        if kill:
            with contextlib.suppress(ProcessLookupError):
                if child.popen is not None:
                    child.popen.kill()
                elif child.pid:
                    os.kill(child.pid, signal.SIGKILL)
        if child.popen is not None:
            code = child.popen.wait()
        elif child.pid:
            code = os.waitstatus_to_exitcode(os.waitpid(child.pid, 0)[1])
        else:
            continue
        if code != 0 and not kill:
            failures.append(f"{child.impl.name}/{child.role} exited with {code}")
    return failures


def run_cell(
    workload: Workload,
    impl: Impl,
    n: int,
    *,
    tmpdir: Path,
    rss_every: int = 0,
    profile: str = "",
    pin: bool = True,
) -> CellResult:
    """Run one cell with ``n`` messages and return what was measured.

    With ``pin``, both sides of a ping-pong run on one CPU: on a VM, waking a process on an
    idle vCPU costs tens of µs that vary with the host, which would drown the software's part.

    Raises:
        CellError: a child failed or timed out, or the receiver got the wrong number of fds.
    """
    a, b = socket.socketpair(socket.AF_UNIX, workload.sock_type)
    listener = None
    if workload.kind == "handoff":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(socket.SOMAXCONN)
    cell_socks = [s for s in (a, b, listener) if s is not None]
    children = _roles(workload, impl, a, b, listener)
    latfile = str(tmpdir / f"lat-{os.getpid()}-{time.monotonic_ns()}.bin")
    ok = False
    affinity = os.sched_getaffinity(0)
    try:
        if pin and workload.pinned and workload.kind == "pingpong":
            os.sched_setaffinity(0, {min(affinity)})  # inherited by the children
        for child in children:
            _start(
                child,
                cell_socks,
                n=n,
                nfds=workload.nfds,
                latfile=latfile,
                rss_every=rss_every,
                profile=profile,
            )
        os.sched_setaffinity(0, affinity)
        for sock in (a, b, listener):
            if sock is not None:
                sock.close()  # the children hold the only copies now
        ready = {child.role: child.link.expect("ready") for child in children if child.link}
        t0 = time.monotonic_ns()
        for child in children:
            if child.go and child.link:
                child.link.send("go")
        (active,) = [c for c in children if c.active]
        assert active.link is not None
        done = active.link.expect("done")
        final = {active.role: done}
        for child in children:
            if not child.active and child.link:
                child.link.expect("sent")
                child.link.send("finish")
                final[child.role] = child.link.expect("done")
        ok = True
    finally:
        os.sched_setaffinity(0, affinity)
        failures = _reap(children, kill=not ok)
        for sock in cell_socks:
            sock.close()
    if failures:
        raise CellError("; ".join(failures))
    expected_fds = n * workload.nfds
    if done["messages"] != n or done["fds_received"] != expected_fds:
        raise CellError(
            f"received {done['messages']} messages / {done['fds_received']} fds, "
            f"expected {n} / {expected_fds}"
        )
    counted = {c.role for c in children if c.counted}
    tx_roles = [r for r in counted if r != active.role]
    seconds = (done["t_end"] - t0) / 1e9

    def delta(role: str, key: str) -> Any:
        return final[role][key] - ready[role][key]

    result = CellResult(
        workload=workload.name,
        impl=impl.name,
        n=n,
        seconds=seconds,
        rate=n / seconds,
        leaked_rx=delta(active.role, "fds"),
        leaked_tx=sum(delta(r, "fds") for r in tx_roles),
        cpu_rx=delta(active.role, "cpu") / seconds,
        cpu_tx=sum(delta(r, "cpu") for r in tx_roles) / seconds,
        rss_rx=done.get("rss", []),
        rss_tx=next((final[r]["rss"] for r in tx_roles if final[r].get("rss")), []),
    )
    if workload.kind == "pingpong":
        lat = array.array("q")
        with open(latfile, "rb") as f:
            lat.frombytes(f.read())
        os.unlink(latfile)
        values = sorted(lat)
        result.p50_us = percentile(values, 0.50) / 1000
        result.p99_us = percentile(values, 0.99) / 1000
    return result
