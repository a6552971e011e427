"""The holder restarts without losing anything: a second holder started on the same socket
takes the whole store over (through the generation handoff) and the first exits; a
successor that dies at any step of the takeover leaves everything with the first, which
serves on and can be taken over later.

Holders run on the test's loop kind. Clients keep talking to whichever holder serves while
the takeover happens, and none of their requests fails. Fd identity is checked by inode;
fd counts by ``/proc/PID/fd`` of each holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from helpers.fdholder import APPS, WAIT, fds_are, holders, inode, loop_name, start_holder

from aioancillary import FdHolderClient

pytestmark = pytest.mark.timeout(240)

#: How the holders describe the store the tests park.
ALL = "4 entries (6 fds): 'pipe', 'web', 'trio', 'later'"


class Store:
    """What a test parks in a holder: a pipe's write end, a TCP listener, three memfds, and
    an entry that expires in five minutes."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.memfds = [os.memfd_create(f"m{i}") for i in range(3)]
        self.expiring = os.memfd_create("expiring")

    @property
    def originals(self) -> dict[str, list[tuple[int, int]]]:
        return {
            "pipe": [inode(self.w)],
            "web": [inode(self.listener)],
            "trio": [inode(fd) for fd in self.memfds],
            "later": [inode(self.expiring)],
        }

    async def park(self, client: FdHolderClient) -> None:
        await client.store("pipe", self.w)
        await client.store("web", self.listener)
        await client.store("trio", self.memfds)
        await client.store("later", self.expiring, timeout=300)

    async def check(self, client: FdHolderClient) -> None:
        entries = {e.name: e for e in await client.list() if e.name in self.originals}
        assert {name: e.fd_count for name, e in entries.items()} == {
            "later": 1,
            "pipe": 1,
            "trio": 3,
            "web": 1,
        }
        assert entries["web"].expires_in is None
        expires = entries["later"].expires_in
        assert expires is not None
        assert 200 < expires <= 300
        for name, expected in self.originals.items():
            got = await client.retrieve(name)
            try:
                assert [inode(fd) for fd in got] == expected, name
            finally:
                for fd in got:
                    fd.close()

    def close(self) -> None:
        for fd in (self.r, self.w, *self.memfds, self.expiring):
            os.close(fd)
        self.listener.close()


class Clients:
    """Clients that talk to the holder without pause: fresh connections, and one that
    stays connected across the takeover. Counts answers per holder pid."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.answers: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._fresh(n)) for n in range(2)]
        self._tasks.append(asyncio.ensure_future(self._long_lived()))

    async def _ask(self, client: FdHolderClient) -> None:
        names = [e.name for e in await client.list()]
        assert "pipe" in names, names
        (copy,) = await client.retrieve("pipe")
        copy.close()
        self.answers[client.holder_pid] += 1

    async def _fresh(self, n: int) -> None:
        while not self._stop.is_set():
            try:
                async with await FdHolderClient.connect(self.path) as client:
                    await self._ask(client)
            except Exception as exc:
                self.failures.append(f"fresh client {n}: {exc!r}")

    async def _long_lived(self) -> None:
        async with await FdHolderClient.connect(self.path) as client:
            while not self._stop.is_set():
                try:
                    await self._ask(client)
                except Exception as exc:
                    self.failures.append(f"long-lived client: {exc!r}")
                await asyncio.sleep(0.005)

    async def served_by(self, pid: int, count: int) -> None:
        await wait_until(lambda: self.answers[pid] >= count or bool(self.failures), WAIT)
        assert not self.failures, self.failures

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), WAIT)
        assert not self.failures, self.failures


async def test_a_new_holder_takes_the_whole_store_over_and_the_first_exits(
    tmp_path: Path,
) -> None:
    path = tmp_path / "holder.sock"
    parked = Store()
    try:
        with holders() as started:
            first = await start_holder(path, started)
            async with await FdHolderClient.connect(path) as client:
                await parked.park(client)
            clients = Clients(str(path))
            try:
                await clients.served_by(first.pid, 20)
                second = await start_holder(path, started)
                line = await first.log("; exiting")
                assert f"handed {ALL} over to pid {second.pid}; exiting" in line
                assert await first.exited() == 0
                took = await second.log("took over")
                assert f"took over {ALL} from pid {first.pid}" in took
                await clients.served_by(second.pid, 20)
            finally:
                await clients.stop()
            async with await FdHolderClient.connect(path) as client:
                assert client.holder_pid == second.pid
                await parked.check(client)
                # Each fd is in the new holder exactly once: dropping the entries closes 6.
                with_entries = second.fd_count()
                for name in ("pipe", "web", "trio", "later"):
                    await client.delete(name)
                await fds_are(second, with_entries - 6)
            # The takeover socket is the new holder's now: a third one takes over from it.
            third = await start_holder(path, started)
            assert await second.exited() == 0
            async with await FdHolderClient.connect(path) as client:
                assert client.holder_pid == third.pid
                assert await client.list() == []
    finally:
        parked.close()


async def test_a_parked_listener_stays_bound_across_the_takeover(tmp_path: Path) -> None:
    path = tmp_path / "holder.sock"
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        with holders() as started:
            first = await start_holder(path, started)
            async with await FdHolderClient.connect(path) as client:
                await client.store("web", listener)
            listener.close()  # the holder's copy is the only one now
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # queued
            second = await start_holder(path, started)
            assert await first.exited() == 0
            async with await FdHolderClient.connect(path) as client:
                assert client.holder_pid == second.pid
                (web,) = await client.retrieve("web", delete=True)
            with web.into_socket() as taken:
                taken.setblocking(True)
                conn, _ = taken.accept()  # the connection made while the store moved
                with conn:
                    conn.sendall(b"served after the takeover\n")
            assert await reader.readline() == b"served after the takeover\n"
            writer.close()
            await writer.wait_closed()
    finally:
        listener.close()


async def run_successor(path: Path, step: str, stdin: Any = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(APPS / "successor.py"), str(path), loop_name(), step,
        stdin=stdin, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def read_event(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
    assert line, "the successor exited without reporting"
    event: dict[str, Any] = json.loads(line)
    return event


@pytest.mark.parametrize("step", ["offer", "fds", "ready", "nonsense"])
async def test_a_successor_that_dies_mid_takeover_leaves_everything_with_the_first(
    tmp_path: Path, step: str
) -> None:
    path = tmp_path / "holder.sock"
    parked = Store()
    try:
        with holders() as started:
            first = await start_holder(path, started)
            async with await FdHolderClient.connect(path) as client:
                await parked.park(client)
                base = first.fd_count()
                successor = await run_successor(path, step)
                event = await read_event(successor)
                assert event["step"] == step
                assert event["entries"] == ["pipe", "web", "trio", "later"]
                if step != "offer":
                    assert event["fds"] == 6  # it held copies of everything when it died
                assert await asyncio.wait_for(successor.wait(), WAIT) == 3
                line = await first.log("did not complete")
                assert (
                    f"the takeover by pid {successor.pid} did not complete; still serving 4" in line
                )
                # The first holder serves on with everything; the same connection works.
                await parked.check(client)
                await client.store("after", parked.r)
                await fds_are(first, base + 1)  # the offer's duplicates are gone
            # Its takeover socket works again: a real successor takes everything over.
            second = await start_holder(path, started)
            assert await first.exited() == 0
            async with await FdHolderClient.connect(path) as client:
                assert client.holder_pid == second.pid
                await parked.check(client)
                assert "after" in [e.name for e in await client.list()]
    finally:
        parked.close()


async def test_clients_arriving_during_a_failed_takeover_wait_and_are_served(
    tmp_path: Path,
) -> None:
    path = tmp_path / "holder.sock"
    with holders() as started:
        first = await start_holder(path, started)
        async with await FdHolderClient.connect(path) as early:
            await early.store("x", 0)
            successor = await run_successor(path, "wait", stdin=asyncio.subprocess.PIPE)
            try:
                assert (await read_event(successor))["step"] == "waiting"  # the holder is frozen
                # A request on an open connection, and a new client: both wait...
                pending = asyncio.ensure_future(early.list())
                newcomer = asyncio.ensure_future(_list_anew(str(path)))
                await asyncio.sleep(0)
                assert not pending.done()
                assert not newcomer.done()
            finally:
                assert successor.stdin is not None
                successor.stdin.write(b"die\n")
                await successor.stdin.drain()
                successor.stdin.close()
                assert await asyncio.wait_for(successor.wait(), WAIT) == 3
            # ... and are answered by the first holder once the takeover failed.
            assert [e.name for e in await asyncio.wait_for(pending, WAIT)] == ["x"]
            assert await asyncio.wait_for(newcomer, WAIT) == (first.pid, ["x"])
        with contextlib.suppress(ProcessLookupError):
            successor.kill()


async def _list_anew(path: str) -> tuple[int, list[str]]:
    async with await FdHolderClient.connect(path) as client:
        return client.holder_pid, [e.name for e in await client.list()]


async def test_sigterm_during_a_takeover_drops_the_store_and_exits(tmp_path: Path) -> None:
    path = tmp_path / "holder.sock"
    with holders() as started:
        first = await start_holder(path, started)
        async with await FdHolderClient.connect(path) as client:
            await client.store("x", 0)
        successor = await run_successor(path, "wait", stdin=asyncio.subprocess.PIPE)
        try:
            assert (await read_event(successor))["step"] == "waiting"  # the holder is frozen
            first.proc.terminate()
            assert await first.exited() == 0
            line = await first.log("SIGTERM: dropped the store")
            assert "1 entry (1 fds): 'x'" in line
            assert not (tmp_path / "holder.sock.takeover").exists()
            # It did not take the end of the takeover request for a failed takeover to
            # recover from (reopening its takeover socket, serving again) while stopping.
            assert not [text for text in first.lines if "did not complete" in text]
        finally:
            assert successor.stdin is not None
            successor.stdin.write(b"die\n")
            await successor.stdin.drain()
            successor.stdin.close()
            assert await asyncio.wait_for(successor.wait(), WAIT) == 3
