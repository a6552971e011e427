"""TCP hand-off benchmark: an acceptor process hands short TCP connections to 2 workers.

Servers (each: its processes, started fresh, 2 workers):

* ``shared``: 2 processes accepting on one shared listener (no hand-off; blocking stdlib);
* ``stdlib``: a blocking acceptor (``accept`` + ``socket.send_fds``, round robin) and blocking
  workers (``socket.recv_fds``, serve, close);
* ``docs-asyncio`` / ``docs-uvloop``: the idiom the docs used to show: ``loop.sock_accept`` +
  ``await conn.send_fds`` per connection, round robin; workers iterate an aioancillary
  connection;
* ``toolkit-asyncio`` / ``toolkit-uvloop``: :class:`aioancillary.Acceptor` (least-busy) and
  :class:`aioancillary.Worker`;
* ``reuseport-asyncio`` / ``reuseport-uvloop``: no hand-off: each worker binds its own
  ``SO_REUSEPORT`` listener on the same port (the kernel spreads connections over them by
  hash) and serves it with ``loop.create_server`` and a protocol (issue 20's anchor);
* ``node-cluster``: Node's ``cluster`` module, round robin (the primary hands off), when
  ``node`` is on the PATH.

Every worker does the same per client: read the request, write a 64-byte response, close. The
asyncio workers read at once and, when the request is not there yet, serve the client from
a reader callback (``loop.add_reader``) when it arrives. The client is ``c/tcpload.c`` (epoll;
N connections at concurrency 64).

Measured per server: connections/s, client latency (connect to last response byte) p50/p99,
CPU per connection of the acceptor and of the workers together (utime + stime from
``/proc/PID/stat`` before and after the load, over the connections), and the hand-off latency
of lone connections on an idle server: from the acceptor's ``accept()`` returning to the worker
holding the socket (both read ``CLOCK_MONOTONIC``; the worker sends its reading in the
response, the acceptor reports its own at the end). Servers are interleaved within each
repeat; the table shows medians over repeats with the range beside them.

Run::

    .venv/bin/python benchmarks/handoff_bench.py            # full run (~5 min)
    .venv/bin/python benchmarks/handoff_bench.py --quick    # smoke test (~30 s)
    .venv/bin/python benchmarks/handoff_bench.py --publish  # also benchmarks/results/handoff.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
BUILD = HERE / "_build"
OUT = HERE / "_out"
TCPLOAD = BUILD / "tcpload"
NODE_SCRIPT = HERE / "handoff_node.js"
SERVERS = [
    "shared",
    "stdlib",
    "docs-asyncio",
    "docs-uvloop",
    "toolkit-asyncio",
    "toolkit-uvloop",
    # The toolkit on the pure-Python hot path (issue 20: both paths side by side).
    "toolkit-asyncio-py",
    "toolkit-uvloop-py",
    # No hand-off: every worker accepts on its own SO_REUSEPORT listener (issue 20's anchor).
    "reuseport-asyncio",
    "reuseport-uvloop",
    "node-cluster",
]
LABELS = {
    "shared": "N processes sharing one listener (no hand-off)",
    "stdlib": "blocking stdlib acceptor (`accept` + `socket.send_fds`)",
    "docs-asyncio": "docs idiom, asyncio (`loop.sock_accept` + `await conn.send_fds`)",
    "docs-uvloop": "docs idiom, uvloop",
    "toolkit-asyncio": "**toolkit, asyncio** (`Acceptor` + `Worker`)",
    "toolkit-uvloop": "**toolkit, uvloop**",
    "toolkit-asyncio-py": "toolkit, asyncio, pure-Python hot path (`AIOANCILLARY_NO_EXTENSIONS=1`)",
    "toolkit-uvloop-py": "toolkit, uvloop, pure-Python hot path",
    "reuseport-asyncio": "asyncio workers on SO_REUSEPORT (`loop.create_server`, no hand-off)",
    "reuseport-uvloop": "uvloop workers on SO_REUSEPORT",
    "node-cluster": "Node `cluster` round robin (primary hands off)",
}
WORKERS = 2
RESPONSE_SIZE = 64
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Set by --defer-accept for the server processes.
DEFER_ENV = "HANDOFF_DEFER_ACCEPT"
#: With this set to a directory, acceptors and asyncio workers write cProfile stats there.
PROFILE_ENV = "HANDOFF_PROFILE"


def _profiled(role: str, func: Callable[[], None]) -> None:
    directory = os.environ.get(PROFILE_ENV)
    if not directory:
        func()
        return
    import cProfile  # noqa: PLC0415

    profile = cProfile.Profile(time.process_time)  # CPU time: the machine is shared
    try:
        profile.runcall(func)
    finally:
        profile.dump_stats(os.path.join(directory, f"{role}-{os.getpid()}.pstats"))


# -- what every worker does per client --------------------------------------------------------


def response(stamp: int) -> bytes:
    """64 bytes starting with ``ok <CLOCK_MONOTONIC ns when the worker got the socket>``."""
    return (b"ok %d" % stamp).ljust(RESPONSE_SIZE - 1) + b"\n"


def serve_blocking(conn: socket.socket, stamp: int) -> None:
    conn.recv(256)
    conn.sendall(response(stamp))
    conn.close()


def serve_now(sock: socket.socket, stamp: int) -> bool:
    """Serve a non-blocking client if its request is there; False if it must wait."""
    try:
        sock.recv(256)
    except BlockingIOError:
        return False
    sock.send(response(stamp))  # 64 bytes into an empty socket buffer: taken whole
    return True


def serve_later(sock: socket.socket, stamp: int, finish: Callable[[], None]) -> None:
    """The request is not there yet: serve the client when it is readable (no task)."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()

    def readable() -> None:
        if serve_now(sock, stamp):
            loop.remove_reader(fd)
            finish()

    loop.add_reader(fd, readable)


# -- worker processes --------------------------------------------------------------------------


def worker_main(kind: str, fd: int, loop_name: str) -> None:
    sock = socket.socket(fileno=fd)
    if kind == "reuseport":
        # ``fd``: the server's placeholder, bound and not listening (it holds the port and
        # gets no connections); this worker's own listener joins the port's reuseport group.
        port = sock.getsockname()[1]
        sock.close()
        sock = socket.create_server(("127.0.0.1", port), backlog=1024, reuse_port=True)
        _defer_accept(sock)
    print("ready", flush=True)
    if kind == "shared":
        while True:
            conn, _addr = sock.accept()
            serve_blocking(conn, time.monotonic_ns())
    if kind == "stdlib":
        while True:
            _data, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
            if not fds:
                return
            serve_blocking(socket.socket(fileno=fds[0]), time.monotonic_ns())
    factory = asyncio.new_event_loop
    if loop_name == "uvloop":
        import uvloop  # noqa: PLC0415 - only in the uvloop cells

        factory = uvloop.new_event_loop
    main = {"docs": _docs_worker, "reuseport": _reuseport_worker}.get(kind, _toolkit_worker)

    def run() -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main(sock))

    _profiled(f"{kind}-{loop_name}-worker", run)


async def _docs_worker(sock: socket.socket) -> None:
    from aioancillary import open_unix_connection  # noqa: PLC0415

    async with await open_unix_connection(sock=sock) as conn:
        async for msg in conn:
            with msg:
                client = msg.take_fd().into_socket()
            stamp = time.monotonic_ns()
            client.setblocking(False)
            if serve_now(client, stamp):
                client.close()
            else:
                serve_later(client, stamp, client.close)


async def _toolkit_worker(sock: socket.socket) -> None:
    from aioancillary import Worker  # noqa: PLC0415

    async with await Worker.connect(sock=sock) as worker:
        async for client in worker:
            stamp = time.monotonic_ns()
            if serve_now(client.sock, stamp):
                client.done()
            else:
                serve_later(client.sock, stamp, client.done)


class _Respond(asyncio.Protocol):
    """Per client: read the request, write the 64-byte response, close (as every worker)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.stamp = time.monotonic_ns()
        # uvloop's TCPTransport is not an asyncio.Transport subclass: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(response(self.stamp))
        self.transport.close()


async def _reuseport_worker(sock: socket.socket) -> None:
    server = await asyncio.get_running_loop().create_server(_Respond, sock=sock, backlog=1024)
    async with server:
        await server.serve_forever()


def _defer_accept(listener: socket.socket) -> None:
    if os.environ.get(DEFER_ENV):
        # accept() returns a client only once its first bytes are in (tcp(7)).
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)


# -- server processes (the acceptor side) -----------------------------------------------------


class Server:
    """Runs in the server process: starts the workers, then accepts (or lets them accept)."""

    def __init__(self, kind: str, stamps: bool) -> None:
        self.kind, _, self.loop_name = kind.partition("-")
        self.stamps: list[int] | None = [] if stamps else None
        if self.kind == "reuseport":
            # Bound, never listening: it reserves a port for the workers' SO_REUSEPORT
            # listeners and receives no connection itself.
            self.listener = socket.socket()
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self.listener.bind(("127.0.0.1", 0))
        else:
            self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
            _defer_accept(self.listener)
        self.port = self.listener.getsockname()[1]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.links: list[socket.socket] = []

    def start_workers(self) -> None:
        for _ in range(WORKERS):
            if self.kind in ("shared", "reuseport"):
                theirs = self.listener
            else:
                ours, theirs = socket.socketpair()
                self.links.append(ours)
            args = [sys.executable, __file__, "worker", self.kind, str(theirs.fileno())]
            proc = subprocess.Popen(
                [*args, self.loop_name or "-"], pass_fds=[theirs.fileno()], stdout=subprocess.PIPE
            )
            self.procs.append(proc)
            if theirs is not self.listener:
                theirs.close()
        for proc in self.procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready"

    def ready(self) -> None:
        acceptor = None if self.kind in ("shared", "reuseport") else os.getpid()
        info = {"port": self.port, "acceptor": acceptor, "workers": [p.pid for p in self.procs]}
        print(json.dumps(info), flush=True)

    def command(self, line: str) -> bool:
        """A line from the harness: ``stamps`` (report accept times); EOF ends the server."""
        if line.strip() == "stamps":
            print(json.dumps(self.stamps or []), flush=True)
            return True
        return False

    def stop(self) -> None:
        for link in self.links:
            link.close()
        for proc in self.procs:
            if os.environ.get(PROFILE_ENV):
                # asyncio workers end when their link closes: let them write a profile
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            proc.kill()
            proc.wait()


def server_main(kind: str, stamps: bool) -> None:
    server = Server(kind, stamps)
    server.start_workers()
    try:
        if server.kind in ("shared", "stdlib", "reuseport"):
            _blocking_server(server)
        else:
            factory = asyncio.new_event_loop
            if server.loop_name == "uvloop":
                import uvloop  # noqa: PLC0415

                factory = uvloop.new_event_loop

            def run() -> None:
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(_async_server(server))

            _profiled(f"{kind}-acceptor", run)
    finally:
        server.stop()


def _blocking_server(server: Server) -> None:
    if server.kind == "stdlib":
        import threading  # noqa: PLC0415

        threading.Thread(target=_stdlib_acceptor, args=(server,), daemon=True).start()
    server.ready()
    for line in sys.stdin:
        server.command(line)


def _stdlib_acceptor(server: Server) -> None:
    # The 20-line blocking acceptor: accept, send the fd to the next worker, close ours.
    stamps = server.stamps
    links = server.links
    i = 0
    while True:
        conn, _addr = server.listener.accept()
        if stamps is not None:
            stamps.append(time.monotonic_ns())
        socket.send_fds(links[i % len(links)], [b"c"], [conn.fileno()])
        conn.close()
        i += 1


async def _async_server(server: Server) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_stdin() -> None:
        line = sys.stdin.readline()
        if not server.command(line) and not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    if server.kind == "docs":
        task = asyncio.ensure_future(_docs_acceptor(server))
    else:
        task = asyncio.ensure_future(_toolkit_acceptor(server))
    await asyncio.sleep(0.05)  # the acceptor is set up
    server.ready()
    await done
    loop.remove_reader(sys.stdin.fileno())
    task.cancel()


async def _docs_acceptor(server: Server) -> None:
    from aioancillary import open_unix_connection  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    conns = [await open_unix_connection(sock=link) for link in server.links]
    server.links = []
    listener = server.listener
    listener.setblocking(False)
    stamps = server.stamps
    i = 0
    try:
        while True:
            client, _addr = await loop.sock_accept(listener)
            if stamps is not None:
                stamps.append(time.monotonic_ns())
            with client:
                await conns[i % len(conns)].send_fds(b"client", [client])
            i += 1
    finally:
        for conn in conns:
            conn.abort()


async def _toolkit_acceptor(server: Server) -> None:
    from aioancillary import Acceptor  # noqa: PLC0415
    from aioancillary._kernel import _accel  # noqa: PLC0415

    acceptor = Acceptor()
    for link, proc in zip(server.links, server.procs, strict=True):
        acceptor.add_worker(link, pid=proc.pid)
    server.links = []
    acceptor.add_listener(server.listener)
    stamps = server.stamps
    if stamps is not None:
        listener = acceptor._listeners.items[0]
        accept = listener.accept

        def stamped() -> tuple[int, Any]:
            result: tuple[int, Any] = accept()
            stamps.append(time.monotonic_ns())
            return result

        listener.accept = stamped
        c_burst = _accel.accept_into
        if c_burst is not None:
            # The C path accepts in the burst itself: one stamp per client, taken when the
            # burst returns (within the same wake-up as the accept).
            def stamped_burst(fd: int, limit: int, into: list[Any], prefix: bytes | None) -> Any:
                before = len(into)
                failure = c_burst(fd, limit, into, prefix)
                now = time.monotonic_ns()
                stamps.extend([now] * (len(into) - before))
                return failure

            _accel.accept_into = stamped_burst
    try:
        await asyncio.get_running_loop().create_future()
    finally:
        acceptor.abort()


# -- the harness ----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (``/proc/PID/stat``, fields 14 and 15)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(kind: str, stamps: bool) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    if kind == "node-cluster":
        args = ["node", str(NODE_SCRIPT), str(free_port())]
    else:
        served = kind.removesuffix("-py")
        args = [sys.executable, __file__, "serve", served, *(["--stamps"] if stamps else [])]
    env = None
    if kind.endswith("-py"):  # the server and its workers on the pure-Python hot path
        env = {**os.environ, "AIOANCILLARY_NO_EXTENSIONS": "1"}
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"server {kind} did not start (exit {proc.returncode})")
    return proc, json.loads(line)


def stop_server(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tcpload(port: int, n: int, conc: int, gap_us: int = 0, stamps: bool = False) -> dict[str, Any]:
    args = [str(TCPLOAD), str(port), str(n), str(conc), str(gap_us)]
    if stamps:
        args.append("--stamps")
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    if out.returncode not in (0, 3) or not out.stdout:
        raise RuntimeError(f"tcpload failed ({out.returncode}): {out.stderr.strip()}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def measure_load(kind: str, n: int, conc: int, warmup: int) -> dict[str, Any]:
    proc, info = start_server(kind, stamps=False)
    try:
        tcpload(info["port"], warmup, conc)
        time.sleep(0.05)
        pids = info["workers"] + ([info["acceptor"]] if info["acceptor"] else [])
        before = {pid: cpu_seconds(pid) for pid in pids}
        load = tcpload(info["port"], n, conc)
        after = {pid: cpu_seconds(pid) for pid in pids}
    finally:
        stop_server(proc)
    done: int = max(1, load["connections"])

    def per_conn(group: list[int]) -> float:
        return sum(after[p] - before[p] for p in group) / done * 1e6

    acceptor = info["acceptor"]
    return {
        "rate": load["rate"],
        "errors": load["errors"],
        "p50_us": load["p50_us"],
        "p99_us": load["p99_us"],
        "acceptor_us": per_conn([acceptor]) if acceptor else None,
        "workers_us": per_conn(info["workers"]),
        "server_us": per_conn([acceptor, *info["workers"]] if acceptor else info["workers"]),
    }


def measure_lone(kind: str, count: int) -> dict[str, Any] | None:
    if kind in ("shared", "node-cluster") or kind.startswith("reuseport-"):
        return None  # no hand-off to time (shared, reuseport), or no hook in Node's primary
    proc, info = start_server(kind, stamps=True)
    try:
        tcpload(info["port"], 20, 1)  # warm up
        lone = tcpload(info["port"], count, 1, gap_us=2000, stamps=True)
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write("stamps\n")
        proc.stdin.flush()
        accepted = json.loads(proc.stdout.readline())[20:]
    finally:
        stop_server(proc)
    got = lone["stamps"]
    if len(got) != len(accepted):
        raise RuntimeError(f"{kind}: {len(accepted)} accept stamps for {len(got)} responses")
    lat = sorted((w - a) / 1000 for a, w in zip(accepted, got, strict=True))
    return {"p50_us": _pct(lat, 0.5), "p99_us": _pct(lat, 0.99)}


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, max(0, int(q * len(values) + 0.999999) - 1))]


def build(cc: str) -> None:
    BUILD.mkdir(exist_ok=True)
    subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(TCPLOAD), str(HERE / "c" / "tcpload.c")], check=True
    )


def machine_notes() -> list[str]:
    load = os.getloadavg()
    top = subprocess.run(
        ["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")[:5]
    return [
        f"{platform.node()}: {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}",
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; busiest processes: "
        + ", ".join(" ".join(t.split()) for t in top if t.strip()),
    ]


def _fmt(values: list[float], unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "-"
    med = statistics.median(values) / scale
    if len(values) == 1:
        return f"{med:.{digits}f}{unit}"
    lo, hi = min(values) / scale, max(values) / scale
    return f"{med:.{digits}f}{unit} ({lo:.{digits}f}-{hi:.{digits}f})"


def report(
    results: dict[str, list[dict[str, Any]]],
    lone: dict[str, list[dict[str, Any]]],
    args: argparse.Namespace,
    notes: list[str],
) -> str:
    lines = [
        "# TCP hand-off benchmark",
        "",
        f"`{' '.join(['benchmarks/handoff_bench.py', *sys.argv[1:]])}`: {args.n} connections"
        f" per run at concurrency {args.concurrency}, {WORKERS} workers, 127.0.0.1; "
        f"{args.repeat} interleaved repeat(s); median (min-max) over repeats. Hand-off latency:"
        f" {args.lone} lone connections 2 ms apart on an idle server, accept() returning in the"
        " acceptor to the worker holding the socket."
        + (" Every listener has TCP_DEFER_ACCEPT." if args.defer_accept else ""),
        "",
        *[f"- {note}" for note in notes],
        "",
        "| server | conn/s | acceptor µs/conn | workers µs/conn | server CPU µs/conn | p50 µs |"
        " p99 µs | hand-off p50 µs | hand-off p99 µs |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for kind, runs in results.items():

        def col(key: str, runs: list[dict[str, Any]] = runs) -> list[float]:
            return [r[key] for r in runs if r.get(key) is not None]

        hand = lone.get(kind, [])
        lines.append(
            f"| {LABELS[kind]} | {_fmt(col('rate'), 'k', 1000)} | {_fmt(col('acceptor_us'))} | "
            f"{_fmt(col('workers_us'))} | {_fmt(col('server_us'))} | "
            f"{_fmt(col('p50_us'), digits=0)} | "
            f"{_fmt(col('p99_us'), digits=0)} | "
            f"{_fmt([h['p50_us'] for h in hand], digits=0)} | "
            f"{_fmt([h['p99_us'] for h in hand], digits=0)} |"
        )
    errors = sum(r["errors"] for runs in results.values() for r in runs)
    lines += ["", f"Client errors (refused, reset or cut short): {errors}.", "", "## Targets", ""]
    lines += targets(results)
    return "\n".join(lines) + "\n"


def targets(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    def med(kind: str, key: str) -> float | None:
        values = [r[key] for r in results.get(kind, []) if r.get(key) is not None]
        return statistics.median(values) if values else None

    out = []
    for loop in ("asyncio", "uvloop", "asyncio-py", "uvloop-py"):
        kind = f"toolkit-{loop}"
        if kind not in results:
            continue
        checks: list[tuple[str, float | None, float | None, Callable[[float, float], bool]]] = [
            (
                "acceptor CPU/conn ≤ stdlib acceptor's",
                med(kind, "acceptor_us"),
                med("stdlib", "acceptor_us"),
                lambda a, b: a <= b,
            ),
            (
                "workers CPU/conn ≤ stdlib workers'",
                med(kind, "workers_us"),
                med("stdlib", "workers_us"),
                lambda a, b: a <= b,
            ),
            ("conn/s ≥ 1.0x stdlib", med(kind, "rate"), med("stdlib", "rate"), lambda a, b: a >= b),
            (
                "conn/s ≥ 0.9x shared listener",
                med(kind, "rate"),
                med("shared", "rate"),
                lambda a, b: a >= 0.9 * b,
            ),
            (
                "p99 ≤ shared listener's",
                med(kind, "p99_us"),
                med("shared", "p99_us"),
                lambda a, b: a <= b,
            ),
            # Issue 20: against uvloop workers accepting on SO_REUSEPORT (no hand-off).
            (
                "conn/s ≥ uvloop SO_REUSEPORT",
                med(kind, "rate"),
                med("reuseport-uvloop", "rate"),
                lambda a, b: a >= b,
            ),
            (
                "server CPU/conn (acceptor + workers) ≤ 1.25x uvloop SO_REUSEPORT's",
                med(kind, "server_us"),
                med("reuseport-uvloop", "server_us"),
                lambda a, b: a <= 1.25 * b,
            ),
            (
                "p99 ≤ uvloop SO_REUSEPORT's",
                med(kind, "p99_us"),
                med("reuseport-uvloop", "p99_us"),
                lambda a, b: a <= b,
            ),
        ]
        for name, ours, ref, ok in checks:
            if ours is None or ref is None:
                continue
            verdict = "met" if ok(ours, ref) else "**not met**"
            out.append(f"- {loop}: {name}: {ours:.1f} vs {ref:.1f}: {verdict}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small, one repeat")
    parser.add_argument("--publish", action="store_true", help="write benchmarks/results/")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("-n", type=int, default=20000, help="connections per run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--lone", type=int, default=200, help="lone connections for hand-off")
    parser.add_argument("--only", action="append", help="servers to run (repeatable)")
    parser.add_argument("--cc", default="cc")
    parser.add_argument(
        "--defer-accept",
        action="store_true",
        help="TCP_DEFER_ACCEPT on every listener (Node has no such option: not run)",
    )
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.n, args.lone = 1, 400, 20
    servers = [s for s in SERVERS if not args.only or s in args.only]
    if args.quick and not args.only:  # a smoke test: the pure-Python rows run the same code
        servers = [s for s in servers if not s.endswith("-py")]
    if args.defer_accept:
        os.environ[DEFER_ENV] = "1"
        servers = [s for s in servers if s != "node-cluster"]
    if shutil.which("node") is None and "node-cluster" in servers:
        servers.remove("node-cluster")
        print("node not found: skipping the Node cluster reference", file=sys.stderr)
    build(args.cc)
    notes = machine_notes()
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in servers}
    lone: dict[str, list[dict[str, Any]]] = {kind: [] for kind in servers}
    warmup = min(2000, args.n // 4)
    for repeat in range(args.repeat):
        order = servers[repeat % len(servers) :] + servers[: repeat % len(servers)]
        for kind in order:
            result = measure_load(kind, args.n, args.concurrency, warmup)
            results[kind].append(result)
            hand = measure_lone(kind, args.lone)
            if hand is not None:
                lone[kind].append(hand)
            print(
                f"[{repeat + 1}/{args.repeat}] {kind}: {json.dumps(result)} lone={hand}",
                file=sys.stderr,
                flush=True,
            )
    notes.append("after the run: " + machine_notes()[1])
    text = report(results, lone, args, notes)
    print(text)
    OUT.mkdir(exist_ok=True)
    (OUT / ".gitignore").write_text("*\n")
    name = "handoff-defer-accept" if args.defer_accept else "handoff"
    (OUT / f"{name}.md").write_text(text)
    (OUT / f"{name}.json").write_text(json.dumps({"load": results, "lone": lone}, indent=1))
    if args.publish:
        (HERE / "results" / f"{name}.md").write_text(text)
    failed = any(r["errors"] for runs in results.values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1:2] == ["serve"]:
        server_main(sys.argv[2], "--stamps" in sys.argv)
    else:
        sys.exit(main())
