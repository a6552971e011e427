"""Soak: a WorkerPool under nonstop client load, a worker killed every few seconds, a reload
every minute. Not part of the test suite (it runs for minutes); run it by hand:

    .venv/bin/python benchmarks/soak_pool.py                      # 10 minutes, asyncio
    .venv/bin/python benchmarks/soak_pool.py --loop uvloop --minutes 10
    .venv/bin/python benchmarks/soak_pool.py --minutes 1 --kill-every 2 --reload-every 20

The acceptor's process (this one) runs a 2-worker pool on a TCP listener on 127.0.0.1. A
separate client process keeps ``--concurrency`` connections busy: each sends a request id and
expects it back. Every ``--kill-every`` seconds one serving worker gets SIGKILL; every
``--reload-every`` seconds the pool reloads (new workers, the old ones drain).

What it checks, and prints as JSON at the end:

* the acceptor's open fds, RSS and asyncio task count, sampled quiet (no load, every worker
  idle) before and after the run, and under load every 10 s: flat;
* every client's outcome: answered, refused (``ECONNREFUSED``: must be 0, the listener never
  closes), or cut (the connection ended without an answer: its worker was killed holding it);
* the acceptor's ``stats().lost`` against the clients cut. A worker holds each client for
  ``--hold`` ms before answering, so a kill almost always finds its clients unanswered; a
  client answered in the microseconds between the answer and the completion report is counted
  lost by the acceptor but not cut by the client (``lost - cut`` says how many).

Exit status 1 when a check fails (refused clients, an fd or task count that grew, RSS grown by
more than ``--rss-slack`` MiB, cut clients beyond ``lost``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from aioancillary import HandedClient, WorkerPool

HOLD_ENV = "SOAK_HOLD_MS"


async def handle(client: HandedClient) -> None:
    """One request: the client's id, answered after holding the client ``SOAK_HOLD_MS``."""
    loop = asyncio.get_running_loop()
    request = await loop.sock_recv(client.sock, 64)
    await asyncio.sleep(int(os.environ.get(HOLD_ENV, "20")) / 1000)
    await loop.sock_sendall(client.sock, request)


# -- the client process ----------------------------------------------------------------------


async def _one(port: int, ident: int, counts: dict[str, int]) -> None:
    request = f"{ident:016d}".encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        counts["refused"] += 1
        return
    try:
        writer.write(request)
        answer = await reader.read(64)
        counts["answered" if answer == request else "cut"] += 1
    except (ConnectionResetError, BrokenPipeError):
        counts["cut"] += 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def client_main(port: int, seconds: float, concurrency: int) -> None:
    counts = {"answered": 0, "cut": 0, "refused": 0}
    deadline = time.monotonic() + seconds
    next_id = 0

    async def lane() -> None:
        nonlocal next_id
        while time.monotonic() < deadline:
            next_id += 1
            await _one(port, next_id, counts)

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    print(json.dumps(counts), flush=True)


# -- the acceptor process --------------------------------------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _sample() -> dict[str, int]:
    gc.collect()
    return {
        "fds": len(os.listdir("/proc/self/fd")) - 1,
        "rss_kib": _rss_kib(),
        "tasks": len(asyncio.all_tasks()),
    }


async def _quiet(pool: WorkerPool) -> dict[str, int]:
    """A sample with no load, every client finished, every worker slot serving."""

    def settled() -> bool:
        stats = pool.acceptor.stats()
        return (
            not stats.in_flight
            and not pool.retiring
            and len(pool.pids) == pool.size
            and stats.workers == pool.size
        )

    # Polled: the pool has no event for "every slot serving and idle", and this runs twice.
    while not settled():  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    return _sample()


async def _clients(port: int, seconds: float, concurrency: int) -> dict[str, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--client",
        str(port),
        str(seconds),
        str(concurrency),
        stdout=subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the client process failed (status {proc.returncode})")
    counts: dict[str, int] = json.loads(out)
    return counts


async def acceptor_main(args: argparse.Namespace) -> int:
    os.environ[HOLD_ENV] = str(args.hold)
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = listener.getsockname()[1]
    seconds = args.minutes * 60
    async with WorkerPool(
        handle, processes=args.workers, loop=args.loop, shutdown_timeout=10
    ) as pool:
        pool.acceptor.add_listener(listener)
        warm = await _clients(port, args.warmup, args.concurrency)
        before = await _quiet(pool)
        stats0 = pool.acceptor.stats()
        print(f"warm-up {warm}; quiet before: {before}", file=sys.stderr, flush=True)

        load = asyncio.create_task(_clients(port, seconds, args.concurrency))
        samples: list[dict[str, Any]] = []
        kills = reloads = 0
        start = time.monotonic()
        next_kill = start + args.kill_every
        next_reload = start + args.reload_every
        next_sample = start + 10
        rng = random.Random(1)
        while not load.done():
            now = time.monotonic()
            if now >= next_kill:
                next_kill += args.kill_every
                pids = pool.pids
                if pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills += 1
            if now >= next_reload:
                next_reload += args.reload_every
                await pool.reload()
                reloads += 1
            if now >= next_sample:
                next_sample += 10
                stats_now = dataclasses.asdict(pool.acceptor.stats())
                s = {"t": round(now - start), **_sample(), **stats_now}
                samples.append(s)
                print(json.dumps(s), file=sys.stderr, flush=True)
            await asyncio.sleep(0.05)
        counts = load.result()
        after = await _quiet(pool)
        stats = pool.acceptor.stats()

    lost = stats.lost - stats0.lost
    loaded = samples[len(samples) // 6 :]  # past the first minute or so
    report = {
        "loop": args.loop,
        "minutes": args.minutes,
        "kills": kills,
        "reloads": reloads,
        "clients": counts,
        "acceptor_lost": lost,
        "lost_minus_cut": lost - counts["cut"],
        "requeued": stats.requeued - stats0.requeued,
        "quiet_before": before,
        "quiet_after": after,
        "under_load": {
            key: [min(s[key] for s in loaded), max(s[key] for s in loaded)]
            for key in ("fds", "rss_kib", "tasks")
        }
        if loaded
        else {},
    }
    print(json.dumps(report, indent=2))
    failures = []
    if counts["refused"]:
        failures.append(f"{counts['refused']} clients refused")
    if counts["cut"] > lost:
        failures.append(f"{counts['cut']} clients cut, but only {lost} counted lost")
    if after["fds"] > before["fds"] or after["tasks"] > before["tasks"]:
        failures.append(f"fds or tasks grew: {before} -> {after}")
    if after["rss_kib"] - before["rss_kib"] > args.rss_slack * 1024:
        failures.append(f"RSS grew by {after['rss_kib'] - before['rss_kib']} KiB")
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


def main() -> int:
    if sys.argv[1:2] == ["--client"]:
        port, seconds, concurrency = sys.argv[2:5]
        asyncio.run(client_main(int(port), float(seconds), int(concurrency)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--kill-every", type=float, default=3, help="seconds")
    parser.add_argument("--reload-every", type=float, default=60, help="seconds")
    parser.add_argument("--hold", type=int, default=20, help="ms a worker holds each client")
    parser.add_argument("--warmup", type=float, default=20, help="seconds of load first")
    parser.add_argument("--rss-slack", type=float, default=4, help="MiB")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415 - only when asked for

        return uvloop.run(acceptor_main(args))
    return asyncio.run(acceptor_main(args))


if __name__ == "__main__":
    sys.exit(main())
