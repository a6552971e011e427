"""Memory per connection: aioancillary (both receive paths) against asyncio streams, both loops.

Each row runs in a fresh child process: it creates N connected pairs over ``socketpair()``
in one event loop and measures, per connection (one end of a pair; 2N connections):

* ``idle``: right after the pairs are connected;
* ``after``: after one message each way on every pair (aioancillary: 16 bytes and one fd, the
  fd closed by the receiver; streams: 16 bytes), everything received and closed.

Both as resident memory (``/proc/self/statm``: what the process costs the machine, interpreter
allocator and loop internals included) and as ``tracemalloc``'s traced Python allocations
(a second child, since tracing costs memory of its own). A warm-up of 20 pairs (connected,
one message each way, closed) runs before the baseline, so that caches filled once per
process are not counted. The anchor is ``asyncio.open_connection(sock=...)`` on each end of
a socketpair, in the same run, on the same loop. Target: aioancillary at most 1.5x the
anchor, idle and after traffic, on both loops and both paths.

    .venv/bin/python benchmarks/memory_bench.py              # 2,000 pairs, every row
    .venv/bin/python benchmarks/memory_bench.py --top 12     # + tracemalloc's top lines
    .venv/bin/python benchmarks/memory_bench.py --quick      # 200 pairs
    .venv/bin/python benchmarks/memory_bench.py --loop uvloop --kind aioancillary-py
    .venv/bin/python benchmarks/memory_bench.py --src /tmp/base/src   # another tree's code

The ``-py`` rows run with ``AIOANCILLARY_NO_EXTENSIONS=1`` (the pure-Python hot path); the
``-c`` rows need the extension built (``python -m aioancillary --version``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

LOOPS = ("asyncio", "uvloop")
KINDS = ("streams", "aioancillary-c", "aioancillary-py")
TARGET = 1.5  # x the streams anchor
WARMUP = 20
PAYLOAD = b"x" * 16
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _Pairs:
    """N connected pairs of one kind: open, one message each way, close."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.ends: list[Any] = []
        self.devnull = os.open(os.devnull, os.O_RDONLY)

    async def open(self, n: int) -> None:
        for _ in range(n):
            if self.kind == "streams":
                s1, s2 = socket.socketpair()
                one = await asyncio.open_connection(sock=s1)
                two = await asyncio.open_connection(sock=s2)
                self.ends.append((one, two))
            else:
                from aioancillary import connection_pair  # noqa: PLC0415

                self.ends.append(await connection_pair())

    async def exchange(self) -> None:
        fds = [self.devnull]
        for one, two in self.ends:
            if self.kind == "streams":
                for (_r, writer), (reader, _w) in ((one, two), (two, one)):
                    writer.write(PAYLOAD)
                    await writer.drain()
                    await reader.readexactly(len(PAYLOAD))
            else:
                for sender, receiver in ((one, two), (two, one)):
                    await sender.send_fds(PAYLOAD, fds)
                    (await receiver.recv()).close()

    async def close(self) -> None:
        for pair in self.ends:
            for end in pair:
                writer = end[1] if self.kind == "streams" else end
                writer.close()
                await writer.wait_closed()
        self.ends.clear()


async def _measure(kind: str, metric: str, n: int, top: int) -> dict[str, Any]:
    if kind != "streams":
        from aioancillary._kernel import _accel  # noqa: PLC0415

        want_c = kind.endswith("-c")
        if (_accel.EXTENSION is not None) != want_c:
            raise SystemExit(f"{kind}: wrong hot path in this child ({_accel.PATH})")
    warm = _Pairs(kind)
    await warm.open(WARMUP)
    await warm.exchange()
    await warm.close()
    pairs = _Pairs(kind)
    gc.collect()
    if metric == "trace":
        tracemalloc.start()
        base_snap = tracemalloc.take_snapshot() if top else None

        def now() -> int:
            return tracemalloc.get_traced_memory()[0]
    else:
        now = _rss
    base = now()
    await pairs.open(n)
    gc.collect()
    idle = now()
    idle_top = _top(base_snap, n, top) if metric == "trace" and top else []
    await pairs.exchange()
    gc.collect()
    after = now()
    after_top = _top(base_snap, n, top) if metric == "trace" and top else []
    await pairs.close()
    os.close(pairs.devnull)
    os.close(warm.devnull)
    conns = 2 * n
    return {
        "idle": (idle - base) / conns,
        "after": (after - base) / conns,
        "idle_top": idle_top,
        "after_top": after_top,
    }


def _top(base: tracemalloc.Snapshot | None, n: int, top: int) -> list[tuple[str, float]]:
    assert base is not None
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    stats = snap.compare_to(base, "lineno")[:top]
    return [(str(s.traceback[0]), s.size_diff / (2 * n)) for s in stats]


def _child(loop_name: str, kind: str, metric: str, n: int, top: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # 2 fds per pair
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if loop_name == "uvloop":
        import uvloop  # noqa: PLC0415 - bench-only dependency

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(_measure(kind, metric, n, top))
    print(json.dumps(result))


def _run_child(
    loop_name: str, kind: str, metric: str, n: int, top: int, *, src: str
) -> dict[str, Any]:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env.pop("AIOANCILLARY_NO_EXTENSIONS", None)
    if kind.endswith("-py"):
        env["AIOANCILLARY_NO_EXTENSIONS"] = "1"
    cmd = [sys.executable, __file__, "--child", loop_name, kind, metric, str(n), str(top)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{loop_name} {kind} {metric}: {out.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _kib(value: float) -> str:
    return f"{value / 1024:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="connected pairs per row")
    parser.add_argument("--quick", action="store_true", help="200 pairs")
    parser.add_argument("--loop", action="append", choices=LOOPS, help="(repeatable)")
    parser.add_argument("--kind", action="append", choices=KINDS[1:], help="(repeatable)")
    parser.add_argument("--top", type=int, default=0, help="tracemalloc's top lines per row")
    parser.add_argument("--src", default="", help="import aioancillary from this src/ (a baseline)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        loop_name, kind, metric, n, top = args.child
        _child(loop_name, kind, metric, int(n), int(top))
        return 0
    n = 200 if args.quick else args.pairs

    print(
        f"Memory per connection, {n:,} socketpair pairs ({2 * n:,} connections) per row; "
        "KiB per connection (one end of a pair)\n"
    )
    print(
        "| loop | kind | RSS idle | RSS after 1 msg | traced idle | traced after 1 msg "
        f"| RSS ratio to streams (idle / after) | ≤ {TARGET}x |"
    )
    print("|---|---|---|---|---|---|---|---|")
    tops: list[str] = []
    for loop_name in args.loop or LOOPS:
        anchor: dict[str, Any] | None = None
        for kind in ("streams", *(args.kind or KINDS[1:])):
            rss = _run_child(loop_name, kind, "rss", n, 0, src=args.src)
            trace = _run_child(loop_name, kind, "trace", n, args.top, src=args.src)
            if kind == "streams":
                anchor = rss
                ratio, verdict = "1.00 / 1.00", ""
            else:
                assert anchor is not None
                r_idle, r_after = rss["idle"] / anchor["idle"], rss["after"] / anchor["after"]
                ratio = f"{r_idle:.2f} / {r_after:.2f}"
                met = max(r_idle, r_after) <= TARGET
                verdict = "met" if met else "not met"
            print(
                f"| {loop_name} | {kind} | {_kib(rss['idle'])} | {_kib(rss['after'])} | "
                f"{_kib(trace['idle'])} | {_kib(trace['after'])} | {ratio} | {verdict} |",
                flush=True,
            )
            if args.top:
                for phase in ("idle", "after"):
                    tops.append(f"\n{loop_name} {kind}, {phase} (bytes per connection):")
                    tops += [f"  {size:8.1f}  {where}" for where, size in trace[f"{phase}_top"]]
    if tops:
        print("\n".join(tops))
    return 0  # a child that fails raises: exit status 1


if __name__ == "__main__":
    sys.exit(main())
