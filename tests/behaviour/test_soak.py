"""Soak: one million messages, each with an fd, through one connection; fds and RSS stay flat.

Excluded from the default run (``-m "not soak"`` in addopts). Run it, with its figures shown:

    .venv/bin/python -m pytest -m soak tests/test_soak.py -s

Set ``AIOANCILLARY_SOAK_MESSAGES`` to change the count (default 1,000,000).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time

import pytest
from helpers import open_fd_count

from aioancillary import connection_pair

MESSAGES = int(os.environ.get("AIOANCILLARY_SOAK_MESSAGES", "1000000"))
WARMUP = min(100_000, MESSAGES // 10)
RSS_SLACK = 8 * 1024 * 1024  # allocator noise; a leak of one object per message is far more


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_a_million_messages_with_fds(request: pytest.FixtureRequest) -> None:
    loop_name = request.node.callspec.id  # "asyncio" or "uvloop"
    a, b = await connection_pair()
    r, w = os.pipe()
    ino = os.fstat(r).st_ino
    marks: dict[str, tuple[int, int, float]] = {}

    def mark(name: str) -> None:
        gc.collect()
        marks[name] = (rss_bytes(), open_fd_count(), time.perf_counter())

    async def send() -> None:
        payload = b"m" * 32
        for _ in range(MESSAGES):
            await a.send_fds(payload, [r])

    async def receive() -> int:
        seen = 0
        while seen < MESSAGES:
            for msg in await b.recv_batch():
                with msg:
                    if seen % 4096 == 0:  # spot checks; every message is counted below
                        assert os.fstat(msg.fds[0].fileno()).st_ino == ino
                    assert len(msg.fds) == 1
                seen += 1
                if seen == WARMUP:
                    mark("warm")
        return seen

    try:
        mark("start")
        sender = asyncio.ensure_future(send())
        seen = await receive()
        await sender
        mark("end")
    finally:
        for conn in (a, b):
            conn.close()
            await conn.wait_closed()
        os.close(r)
        os.close(w)

    rss_warm, fds_warm, t_warm = marks["warm"]
    rss_end, fds_end, t_end = marks["end"]
    rate = (MESSAGES - WARMUP) / (t_end - t_warm)
    print(
        f"\nsoak[{loop_name}]: {seen} messages with 1 fd each; "
        f"RSS start {marks['start'][0] / 2**20:.1f} MiB, "
        f"after {WARMUP} {rss_warm / 2**20:.1f} MiB, "
        f"end {rss_end / 2**20:.1f} MiB (growth after warm-up {(rss_end - rss_warm) / 2**10:+.0f} "
        f"KiB); open fds {marks['start'][1]} -> {fds_warm} (mid-run) -> {fds_end}; "
        f"{rate:,.0f} msgs/s"
    )
    assert seen == MESSAGES
    assert fds_end == marks["start"][1]  # mid-run, the queues hold fds (bounded by budgets)
    assert rss_end - rss_warm < RSS_SLACK
