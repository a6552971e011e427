"""Parking a listening socket in the fd holder across a service restart, without systemd.

Real processes: the holder, service v1 (serves, parks its listener, exits), a client that
connects while no service runs, and service v2 (takes the listener back and serves that
client). The port never closes, so the client is queued instead of refused; v2 serves it on
the same socket (same inode) as v1. Every process's fd count is checked: each service's at
its start and end, the holder's from /proc.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from helpers.fdholder import APPS, WAIT, HolderProcess, holders, loop_name

from aioancillary import FdHolderClient

pytestmark = pytest.mark.timeout(180)


async def service(holder: HolderProcess, version: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(APPS / "service.py"), holder.path, loop_name(), version,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def event(proc: asyncio.subprocess.Process, name: str) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
        assert line, f"the service exited before {name!r}"
        found: dict[str, Any] = json.loads(line)
        if found["event"] == name:
            return found


async def ask(port: int, question: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{question}\n".encode())
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), WAIT)).decode()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_parked_listener_queues_clients_while_no_service_runs(tmp_path: Path) -> None:
    with holders() as started:
        holder = HolderProcess(tmp_path / "holder.sock", loop_name())
        started.append(holder)
        await holder.serving_async()
        async with await FdHolderClient.connect(holder.path) as watcher:
            base = holder.fd_count()  # with this client connected

            v1 = await service(holder, "v1")
            serving = await event(v1, "serving")
            port = serving["port"]
            assert (await ask(port, "one")).startswith(f"v1 (pid {v1.pid}) answers one")
            done = await event(v1, "exit")
            assert done["fds_after"] == done["fds_before"]
            assert await asyncio.wait_for(v1.wait(), WAIT) == 0
            assert [(e.name, e.fd_count) for e in await watcher.list()] == [("web", 1)]
            await wait_until(lambda: holder.fd_count() == base + 1, WAIT)  # v1's conn gone

            # No service runs: the connection is queued on the parked socket, not refused.
            waiting = asyncio.ensure_future(ask(port, "two"))
            await asyncio.sleep(0)
            assert not waiting.done()

            v2 = await service(holder, "v2")
            again = await event(v2, "serving")
            assert (again["port"], again["inode"]) == (port, serving["inode"])
            reply = await asyncio.wait_for(waiting, WAIT)
            assert reply.startswith(f"v2 (pid {v2.pid}) answers two")
            done = await event(v2, "exit")
            assert done["fds_after"] == done["fds_before"]
            assert await asyncio.wait_for(v2.wait(), WAIT) == 0
            assert await watcher.list() == []
            await wait_until(lambda: holder.fd_count() == base, WAIT)
