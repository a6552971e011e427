"""``aioancillary serve`` against gunicorn with uvicorn workers and ``uvicorn --workers``.

``aioancillary serve`` runs twice: as it does by default (the runner accepts and hands each
connection to the least busy worker) and with ``--accept workers`` (every worker accepts on
the shared listener, as gunicorn's do). The same tiny ASGI application (``serve_app.py``) on
every server, with httptools and uvloop on every side and 2 workers, loaded by a C client
(``c/httpload.c``, 64 connections):

* **keep-alive**: every connection sends its requests one after the other;
* **new connection per request** (``Connection: close``);
* **HUP under load**: SIGHUP to the server's main process twice during a run (a reload:
  new workers replace the old ones), both modes; every failed request is counted, nothing
  is retried.

With keep-alive, where each connection stays with the worker that got it, the report also
says how evenly the connections were spread: the busiest worker's share of the 64 (read from
``/proc`` once the warm-up is over; half is an even split). The kernel spreads them over
workers that accept for themselves as they happen to wake; the runner gives each to the least
busy worker.

Requests/s and latency percentiles come from the client; CPU per request is the CPU time
(user + system, ``/proc/PID/stat``) of the server's whole process tree (main process and
workers) over the measured window, divided by the requests answered in it. Servers are
interleaved repeat by repeat, so that load from elsewhere on the machine spreads over all of
them; the table shows medians over the repeats, and each server's ratio to gunicorn+uvicorn
measured in the same repeat.

Usage (from the repository root, with the ``bench`` dependency group installed)::

    .venv/bin/python benchmarks/serve_bench.py                # 5 repeats, 5 s per cell
    .venv/bin/python benchmarks/serve_bench.py --quick        # a smoke run, about a minute
    .venv/bin/python benchmarks/serve_bench.py --publish      # writes benchmarks/results/serve.md

Without ``--publish`` the report goes to ``benchmarks/_out/serve.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / "_build"
CLIENT = BUILD / "httpload"
TICK = os.sysconf("SC_CLK_TCK")
PY = sys.executable
BASE = "gunicorn+uvicorn"


def servers(workers: int, port: int) -> dict[str, list[str]]:
    """Each server's command line (cwd: benchmarks/, so that ``serve_app`` imports)."""
    bind = f"127.0.0.1:{port}"
    return {
        "aioancillary": [
            PY, "-m", "aioancillary", "serve", "serve_app:app", "--workers", str(workers),
            "--loop", "uvloop", "--http", "httptools", "--bind", bind, "--log-level", "warning",
        ],
        "aioancillary --accept workers": [
            PY, "-m", "aioancillary", "serve", "serve_app:app", "--workers", str(workers),
            "--loop", "uvloop", "--http", "httptools", "--bind", bind, "--log-level", "warning",
            "--accept", "workers",
        ],
        BASE: [
            PY, "-W", "ignore::DeprecationWarning", "-m", "gunicorn", "--workers", str(workers),
            "--worker-class", "uvicorn.workers.UvicornWorker", "--bind", bind,
            "--log-level", "warning", "serve_app:app",
        ],
        "uvicorn": [
            PY, "-m", "uvicorn", "serve_app:app", "--workers", str(workers), "--loop", "uvloop",
            "--http", "httptools", "--no-access-log", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning",
        ],
    }  # fmt: skip


def build_client(cc: str) -> None:
    BUILD.mkdir(exist_ok=True)
    source = HERE / "c" / "httpload.c"
    if CLIENT.exists() and CLIENT.stat().st_mtime >= source.stat().st_mtime:
        return
    subprocess.run([cc, "-O2", "-Wall", "-o", str(CLIENT), str(source)], check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def connections_per_worker(server_pid: int, port: int, workers: int) -> list[int]:
    """How many established client connections to ``port`` each worker holds, busiest first.

    Read from ``/proc``: the inodes of the established TCP sockets whose local port is
    ``port``, then which process has an fd on each. The main process is left out (it holds
    none once a hand-off is done); the ``workers`` busiest of its descendants are kept, so a
    worker that got no connection counts as 0.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    counts = []
    for pid in tree(server_pid)[1:]:
        held = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    held += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
        counts.append(held)
    return (sorted(counts, reverse=True) + [0] * workers)[:workers]


def get(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@contextlib.contextmanager
def running(name: str, command: list[str], port: int, workers: int) -> Iterator[int]:
    """Start a server, wait until all its workers answer; stop it (TERM) afterwards."""
    log = open(BUILD / f"{name.replace('+', '-')}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(command, cwd=HERE, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while len(tree(proc.pid)) < workers + 1 or not get(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; see {log.name}")
            time.sleep(0.1)
        time.sleep(1.0)  # every worker up and idle
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            for pid in tree(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        log.close()


@dataclass
class Cell:
    server: str
    mode: str
    repeat: int
    rps: float
    p50_us: float
    p99_us: float
    cpu_us: float  # server CPU per request
    client_cpu: float  # the client's CPU share of the window (1.0 = one core)
    failed: int
    failures: dict[str, int] = field(default_factory=dict)
    #: keep-alive: each worker's connections during the window, busiest first
    split: list[int] = field(default_factory=list)


def load(
    server_pid: int, port: int, *, mode: str, conns: int, warmup: float, seconds: float,
    hups: list[float] | None = None, workers: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """One client run; the server tree's CPU over the window; HUPs at the given offsets; with
    ``workers``, how the connections are spread over them (once the warm-up is over: with
    keep-alive every connection is open and placed by then)."""
    client = subprocess.Popen(
        [str(CLIENT), "127.0.0.1", str(port), "--mode", mode, "--conns", str(conns),
         "--warmup", str(warmup), "--seconds", str(seconds)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "start"
    pids = tree(server_pid)
    cpu0, client0, t0 = cpu_seconds(pids), cpu_seconds([client.pid]), time.monotonic()
    for offset in hups or []:
        time.sleep(max(0.0, t0 + offset - time.monotonic()))
        os.kill(server_pid, signal.SIGHUP)
    split = connections_per_worker(server_pid, port, workers) if workers else []
    assert client.stdout.readline().strip() == "end"
    pids = sorted(set(pids) | set(tree(server_pid)))
    cpu1, client1, t1 = cpu_seconds(pids), cpu_seconds([client.pid]), time.monotonic()
    result: dict[str, Any] = json.loads(client.stdout.readline())
    client.wait()
    result["server_cpu"] = cpu1 - cpu0
    result["client_cpu"] = (client1 - client0) / (t1 - t0)
    result["split"] = split
    return result


def cell(server: str, mode: str, repeat: int, result: dict[str, Any]) -> Cell:
    requests = max(1, result["requests"])
    return Cell(
        server=server,
        mode=mode,
        repeat=repeat,
        rps=result["rps"],
        p50_us=result["p50_us"],
        p99_us=result["p99_us"],
        cpu_us=result["server_cpu"] / requests * 1e6,
        client_cpu=result["client_cpu"],
        failed=result["failed"],
        failures=result["failures"],
        split=result.get("split", []),
    )


def measure(args: argparse.Namespace) -> list[Cell]:
    cells: list[Cell] = []
    names = [n for n in servers(args.workers, 0) if not args.only or n in args.only]
    for repeat in range(args.repeat):
        for name in names:
            port = free_port()
            command = servers(args.workers, port)[name]
            with running(name, command, port, args.workers) as pid:
                for mode in ("keepalive", "close"):
                    result = load(
                        pid, port, mode=mode, conns=args.conns, warmup=args.warmup,
                        seconds=args.seconds,
                        workers=args.workers if mode == "keepalive" else 0,
                    )  # fmt: skip
                    cells.append(cell(name, mode, repeat, result))
                    progress(cells[-1])
    if args.hup_seconds:
        offsets = [args.hup_seconds * 0.25, args.hup_seconds * 0.6]
        for name in names:
            for mode in ("keepalive", "close"):
                port = free_port()
                command = servers(args.workers, port)[name]
                with running(name, command, port, args.workers) as pid:
                    result = load(
                        pid, port, mode=mode, conns=args.conns, warmup=0.5,
                        seconds=args.hup_seconds, hups=offsets,
                    )  # fmt: skip
                    cells.append(cell(name, f"hup-{mode}", 0, result))
                    progress(cells[-1])
    return cells


def progress(c: Cell) -> None:
    print(
        f"  {c.server:18} {c.mode:15} #{c.repeat}: {c.rps:9.0f} req/s  p99 {c.p99_us:8.0f} µs  "
        f"{c.cpu_us:6.1f} µs CPU/req  client {c.client_cpu:4.0%}  failed {c.failed} "
        + (f"split {'/'.join(map(str, c.split))} " if c.split else "")
        + f"{ {k: v for k, v in c.failures.items() if v} or '' }",
        file=sys.stderr,
        flush=True,
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def balance(cells: list[Cell]) -> str:
    """The busiest worker's share of the keep-alive connections: the median over the repeats,
    and the most uneven split seen."""
    splits = [c.split for c in cells if sum(c.split)]
    if not splits:
        return "not measured"
    worst = max(splits, key=lambda split: split[0] / sum(split))
    share = median([split[0] / sum(split) for split in splits])
    return f"{share:.0%} ({'/'.join(map(str, worst))})"


def report(cells: list[Cell], args: argparse.Namespace) -> str:
    names = list(dict.fromkeys(c.server for c in cells))
    rows = []

    def pick(server: str, mode: str) -> list[Cell]:
        return [c for c in cells if c.server == server and c.mode == mode]

    def ratio(server: str, mode: str, attr: str) -> float:
        pairs = []
        for c in pick(server, mode):
            base = [b for b in pick(BASE, mode) if b.repeat == c.repeat]
            if base and getattr(base[0], attr):
                pairs.append(getattr(c, attr) / getattr(base[0], attr))
        return median(pairs)

    for name in names:
        row = [name]
        for mode in ("keepalive", "close"):
            got = pick(name, mode)
            rps = median([c.rps for c in got])
            cpu = median([c.cpu_us for c in got])
            row += [
                f"{rps:,.0f} ({ratio(name, mode, 'rps'):.2f}x)",
                f"{median([c.p99_us for c in got]):,.0f}",
                f"{cpu:.1f} ({ratio(name, mode, 'cpu_us'):.2f}x)",
            ]
        row.append(balance(pick(name, "keepalive")))
        hups = [
            str(sum(c.failed for c in pick(name, f"hup-{mode}"))) for mode in ("keepalive", "close")
        ]
        row.append(" / ".join(hups) if any(pick(name, "hup-keepalive")) else "not run")
        rows.append(row)
    head = [
        "server",
        "keep-alive req/s",
        "p99 µs",
        "CPU µs/req",
        "new conn. req/s",
        "p99 µs",
        "CPU µs/req",
        "keep-alive connections on the busiest worker: median (most uneven split)",
        "failed across 2 HUPs (keep-alive / new conn.)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    versions = {}
    for module in ("aioancillary", "gunicorn", "uvicorn", "httptools", "uvloop"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version  # noqa: PLC0415

            versions[module] = version(module)
    load = args.load_average
    before = getattr(args, "load_average_before", None)
    meta = (
        f"{args.repeat} repeats (medians; ratios to {BASE} in the same repeat), "
        f"{args.seconds:g} s per cell after {args.warmup:g} s of warm-up, {args.conns} "
        f"connections, {args.workers} workers; HUP runs: {args.hup_seconds:g} s, SIGHUP at "
        f"25 % and 60 %. CPython {platform.python_version()}, {os.cpu_count()} CPUs, "
        + (f"load average {before:.1f} before the run, " if before is not None else "load average ")
        + f"{load:.1f} at its end (its own processes included); "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    # The load at the end counts the benchmark's own client, runner and workers (they keep both
    # CPUs busy): only the load before the run says whether other work shared the machine.
    busy = before if before is not None else load - 2 * (os.cpu_count() or 1)
    if busy > (os.cpu_count() or 1) * 0.5:
        meta += (
            "\n\n**The machine was busy with other work during this run** (load average "
            f"{busy:.1f} on {os.cpu_count()} CPUs): requests/s and CPU per request moved by "
            "tens of per cent between repeats, so only the failure counts are firm. Compare "
            "instruction counts instead (`serve_callgrind.py`), or rerun on a quiet machine."
        )
    return "\n".join(lines) + "\n\n" + meta + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--conns", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hup-seconds", type=float, default=10.0, help="0: no HUP runs")
    parser.add_argument("--only", action="append", help="a server name (repeatable)")
    parser.add_argument("--quick", action="store_true", help="1 repeat of 2 s, HUP runs of 5 s")
    parser.add_argument("--publish", action="store_true", help="write benchmarks/results/")
    parser.add_argument("--cc", default="cc")
    parser.add_argument(
        "--replot", action="store_true", help="rewrite serve.md from serve.json, measure nothing"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.seconds, args.warmup, args.hup_seconds = 1, 2.0, 0.5, 5.0
    out = HERE / ("results" if args.publish else "_out")
    if args.replot:
        saved = json.loads((out / "serve.json").read_text())
        vars(args).update(saved["args"])
        cells = [Cell(**c) for c in saved["cells"]]
    else:
        build_client(args.cc)
        args.load_average_before = os.getloadavg()[0]
        cells = measure(args)
        args.load_average = os.getloadavg()[0]
    text = report(cells, args)
    print(text)
    out.mkdir(exist_ok=True)
    (out / "serve.md").write_text("# Serve benchmark\n\n" + text)
    keep = (
        "repeat",
        "seconds",
        "warmup",
        "conns",
        "workers",
        "hup_seconds",
        "load_average",
        "load_average_before",
    )
    saved = {"args": {k: getattr(args, k) for k in keep}, "cells": [c.__dict__ for c in cells]}
    (out / "serve.json").write_text(json.dumps(saved, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
