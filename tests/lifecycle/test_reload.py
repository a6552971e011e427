"""Reload handoff end to end: start_generation() / Generation, generation after generation.

Process tests run tests/helpers/lifecycle_apps/reload_app.py generations on the test's own loop
kind (asyncio or uvloop) while client tasks connect over 127.0.0.1 TCP without pause, and check
that no client is refused or cut, and that each generation exits with the fd count it started
with. In-process tests check the Generation API: inherit by name, unclaimed fds, duplicate
names, a third generation while the first drains, more fds than one message carries. The
running generation's side under bad peers is in test_reload_offer.py, the successor's side
under bad predecessors in test_reload_fetch.py, the states in test_reload_state.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import is_open, nofile_at_least, wait_until, within
from helpers.reload import closing, first_generation, listener

from aioancillary import AncillaryConnection, PeerRejectedError, start_unix_server
from aioancillary._lifecycle._reload import HandoffBusyError, HandoffError, start_generation
from aioancillary._lifecycle._systemd import FdNameError

APP = Path(__file__).resolve().parents[1] / "helpers" / "lifecycle_apps" / "reload_app.py"
PAYLOAD = "x" * 2000


def loop_name() -> str:
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


# -- child generations ------------------------------------------------------------------------


class Child:
    """A reload_app.py process and the JSON events it prints."""

    def __init__(self, proc: asyncio.subprocess.Process, label: str) -> None:
        self.proc = proc
        self.label = label
        self.events: list[dict[str, Any]] = []

    async def _next(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await within(self.proc.stdout.readline())
        if not line:
            raise AssertionError(f"{self.label} exited; its events: {self.events}")
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event

    async def event(self, name: str) -> dict[str, Any]:
        """The first event called ``name`` (read on until it comes)."""
        for event in self.events:
            if event["event"] == name:
                return event
        while (event := await self._next())["event"] != name:
            pass
        return event

    async def log_containing(self, text: str) -> str:
        """The first warning the child logged that contains ``text``."""
        for event in self.events:
            if event["event"] == "log" and text in event["message"]:
                return str(event["message"])
        while not ((event := await self._next())["event"] == "log" and text in event["message"]):
            pass
        return str(event["message"])

    async def returncode(self) -> int:
        return await within(self.proc.wait())


@contextlib.asynccontextmanager
async def generations(path: Path) -> AsyncIterator[list[Child]]:
    """Children started with :func:`spawn`; each is waited for, or killed, on exit."""
    children: list[Child] = []
    try:
        yield children
    finally:
        for child in children:
            if child.proc.returncode is None:
                child.proc.kill()
            await child.proc.wait()


async def spawn(children: list[Child], path: Path, label: str, *options: str) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(APP),
        str(path),
        loop_name(),
        label,
        *options,
        stdout=asyncio.subprocess.PIPE,
    )
    child = Child(proc, label)
    children.append(child)
    return child


class Clients:
    """Client tasks that connect to 127.0.0.1:port back to back until stopped."""

    def __init__(self, port: int, count: int = 4) -> None:
        self.port = port
        self.answers: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._run(i)) for i in range(count)]

    async def _run(self, n: int) -> None:
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError as exc:
                self.failures.append(f"client {n}: refused: {exc!r}")
                continue
            try:
                writer.write(b"hello\n")
                answer = (await reader.readline()).decode()
                if answer.endswith(f" {PAYLOAD}\n"):
                    self.answers[answer.split()[0]] += 1
                else:
                    self.failures.append(f"client {n}: cut answer {answer[:40]!r}")
            except OSError as exc:
                self.failures.append(f"client {n}: dropped: {exc!r}")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def served_more(self, label: str, more: int) -> None:
        target = self.answers[label] + more
        await wait_until(lambda: self.answers[label] >= target or bool(self.failures), 15)
        assert not self.failures, self.failures

    async def stop(self) -> None:
        self._stop.set()
        await within(asyncio.gather(*self._tasks), 15)


def assert_no_fd_leak(exit_event: dict[str, Any]) -> None:
    assert exit_event["fds_after"] == exit_event["fds_before"], exit_event


async def switch_to(
    children: list[Child], path: Path, label: str, old: Child, clients: Clients
) -> tuple[Child, dict[str, Any], dict[str, Any]]:
    """Start generation ``label``; return it, its "serving" event and the old one's "exit"
    event once the old one has exited and the new one has served 10 clients."""
    new = await spawn(children, path, label)
    serving = await new.event("serving")
    old_exit = await old.event("exit")
    assert await old.returncode() == 0
    await clients.served_more(label, 10)
    return new, serving, old_exit


async def terminate(child: Child) -> dict[str, Any]:
    """SIGTERM: the generation stops accepting, finishes its clients, reports and exits 0."""
    child.proc.send_signal(signal.SIGTERM)
    exit_event = await child.event("exit")
    assert await child.returncode() == 0
    return exit_event


async def test_generation_switch_under_load_refuses_and_drops_nothing(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    async with generations(path) as children:
        g1 = await spawn(children, path, "g1")
        first = await g1.event("serving")
        assert (first["generation"], first["from"]) == (1, "none")
        clients = Clients(first["port"])
        try:
            await clients.served_more("g1", 20)
            g2, second, g1_exit = await switch_to(children, path, "g2", g1, clients)
            assert (await g2.event("got-fds"))["names"] == ["web", "state"]
            # The same listening socket, and the state file carried the generation count.
            assert second["inode"] == first["inode"]
            assert (second["generation"], second["from"]) == (2, "predecessor")
        finally:
            await clients.stop()
        g2_exit = await terminate(g2)
    assert clients.failures == []  # 0 refused, 0 dropped: every answer arrived whole
    assert g1_exit["handed_over"] is True
    assert g1_exit["cancelled"] == 0  # every in-flight connection finished in time
    assert g1_exit["served"] + g2_exit["served"] == sum(clients.answers.values())
    assert_no_fd_leak(g1_exit)
    assert_no_fd_leak(g2_exit)


async def test_successor_crashing_mid_handoff_leaves_the_old_one_serving(
    tmp_path: Path,
) -> None:
    path = tmp_path / "handoff.sock"
    async with generations(path) as children:
        g1 = await spawn(children, path, "g1")
        first = await g1.event("serving")
        clients = Clients(first["port"])
        try:
            await clients.served_more("g1", 10)
            crasher = await spawn(children, path, "g2", "--crash-after-fds")
            await crasher.event("got-fds")
            assert await crasher.returncode() == 3  # died holding copies of every fd
            await g1.log_containing("failed, still serving")
            await clients.served_more("g1", 20)  # the port stayed up
            g3, third, g1_exit = await switch_to(children, path, "g3", g1, clients)
            assert third["inode"] == first["inode"]
            assert third["generation"] == 2  # the crashed one never took the state file
        finally:
            await clients.stop()
        g3_exit = await terminate(g3)
    assert clients.failures == []
    assert_no_fd_leak(g1_exit)
    assert_no_fd_leak(g3_exit)


async def test_successor_never_ready_times_out_and_the_old_one_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    async with generations(path) as children:
        # Only the stalled successor meets the short deadline; g3 later gets 30 s.
        g1 = await spawn(children, path, "g1", "--first-ready-timeout", "0.5")
        first = await g1.event("serving")
        clients = Clients(first["port"])
        try:
            await clients.served_more("g1", 10)
            stalled = await spawn(children, path, "g2", "--never-ready")
            await stalled.event("serving-unready")  # it even accepts, but never says ready
            message = await g1.log_containing("failed, still serving")
            assert "no answer within 0.5 s while waiting for the successor to be ready" in message
            assert_no_fd_leak(await terminate(stalled))  # it finishes what it accepted
            await clients.served_more("g1", 10)
            g3, third, g1_exit = await switch_to(children, path, "g3", g1, clients)
            # The stalled one did write the shared state file (the same open file everywhere).
            assert third["generation"] == 3
        finally:
            await clients.stop()
        g3_exit = await terminate(g3)
    assert clients.failures == []
    assert_no_fd_leak(g1_exit)
    assert_no_fd_leak(g3_exit)


async def test_old_generation_that_never_answers_times_the_successor_out(
    tmp_path: Path,
) -> None:
    path = tmp_path / "handoff.sock"

    async def mute(conn: AncillaryConnection) -> None:
        async for msg in conn:  # reads the hello, answers nothing, until the peer leaves
            msg.close()

    async with await start_unix_server(mute, path), generations(path) as children:
        successor = await spawn(children, path, "g2", "--timeout", "0.3")
        failed = await successor.event("failed")
        assert await successor.returncode() == 2
    assert failed["error"] == "HandoffTimeoutError"
    # However slow this machine, the fetch can only end at its deadline: nobody answers. (On
    # a loaded machine the deadline may pass while still connecting: the same error.)
    assert "within 0.3 s" in failed["message"] or "took over 0.3 s" in failed["message"]
    assert failed["message"].endswith("nothing was taken")


# -- in-process: the Generation API -----------------------------------------------------------


async def test_inherit_by_name_and_hand_over(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    g1_web = g1._offering.fds("web")[0]
    async with closing(g1):
        g2 = await within(start_generation(path))
        async with closing(g2):
            assert g2.inherited.source == "predecessor"
            assert g2.predecessor_pid == os.getpid()
            web = g2.take_socket("web", create=listener)  # inherited: create is not called
            assert os.fstat(web.fileno()).st_ino == os.fstat(g1_web.fileno()).st_ino
            assert not os.get_inheritable(web.fileno())
            state = g2.take_fd("state")
            assert not g1.is_handed_over()
            await within(g2.ready())
            await within(g1.handed_over())
            assert g1.is_handed_over()
            assert g2.offered == ["web", "state"]
            web.close()
            state.close()
        # g2 closed before g1: a handed-over generation's close() leaves the path alone
    assert not path.exists()


async def test_unclaimed_inherited_fds_are_closed_at_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    async with closing(g1):
        g2 = await within(start_generation(path))
        async with closing(g2):
            state_num = g2.inherited._items[1][1].fileno()
            with g2.take_socket("web"):
                with caplog.at_level(logging.WARNING, "aioancillary"):
                    await within(g2.ready())
                assert not is_open(state_num)  # nobody took "state": it was closed
                assert "nobody took: ['state']" in caplog.text
                assert g2.offered == ["web"]


async def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    gen = await within(start_generation(tmp_path / "h.sock", systemd=False))
    async with closing(gen):
        with gen.take_socket("web", create=listener) as web:
            with pytest.raises(ValueError, match="'web' is already offered"):
                gen.offer("web", web)
            with pytest.raises(ValueError, match="already offered"):
                gen.take_socket("web", create=listener)
            with pytest.raises(ValueError, match="without ':'"):
                gen.offer("a:b", web)
            r, w = os.pipe()
            gen.offer("pipe", [r, w])  # several fds under one name: one call
            os.close(r)
            os.close(w)
            assert gen.offered == ["web", "pipe"]
            with pytest.raises(FdNameError, match="no fd named 'other'"):
                gen.take_fd("other")


async def test_upgrade_is_refused_while_the_predecessor_drains(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    g2 = await within(start_generation(path))
    async with closing(g2, g1):
        g2.take_socket("web").close()
        g2.take_fd("state").close()
        await within(g2.ready())
        await within(g1.handed_over())  # g1 now drains: it has not closed yet
        with pytest.raises(HandoffBusyError, match=r"predecessor \(pid \d+\) is still finishing"):
            await within(start_generation(path))
        await within(g1.close())
        await within(g2.predecessor_exited())
        g3 = await within(start_generation(path))
        async with closing(g3):
            assert g3.inherited.names() == ["web", "state"]
            g3.inherited.close()


async def test_authorize_refusal_moves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path, authorize=lambda creds: False)
    async with closing(g1):
        with pytest.raises(HandoffError, match="refused this process, or it exited"):
            await within(start_generation(path))
        assert not g1.is_handed_over()
    g1b = await first_generation(path)
    async with closing(g1b):
        with pytest.raises(PeerRejectedError):
            await within(start_generation(path, authorize=lambda creds: False))


async def test_more_fds_than_one_message_carries(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    with nofile_at_least(4096):
        g1 = await within(start_generation(path, systemd=False))
        async with closing(g1):
            pipes = [os.pipe() for _ in range(150)]
            inodes = []
            for i, (r, w) in enumerate(pipes):
                g1.offer(f"p{i}", [r, w])  # 300 fds: two messages
                inodes.append(os.fstat(r).st_ino)
                os.close(r)
                os.close(w)
            await within(g1.ready())
            g2 = await within(start_generation(path))
            async with closing(g2):
                assert len(g2.inherited) == 300
                for i, inode in enumerate(inodes):
                    r_end, w_end = g2.inherited.take_fds(f"p{i}")
                    assert os.fstat(r_end.fileno()).st_ino == inode
                    r_end.close()
                    w_end.close()


async def test_first_generation_binds_the_handoff_path_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    path.touch()
    blocked = await within(start_generation(path, systemd=False))
    async with closing(blocked):
        with pytest.raises(FileExistsError):  # a regular file there: never replaced
            await within(blocked.ready())
    path.unlink()
    gen = await first_generation(path)
    async with closing(gen):
        assert path.stat().st_mode & 0o777 == 0o600
    assert not path.exists()
