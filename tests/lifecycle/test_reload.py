"""Reload handoff: start_generation() / Generation.

Process tests run tests/helpers/lifecycle_apps/reload_app.py generations on the test's own loop kind
(asyncio or uvloop) while client tasks connect over 127.0.0.1 TCP without pause, and check
that no client is refused or cut, and that each generation exits with the fd count it started
with. In-process tests drive the protocol's edges: timeouts at each step, refusals, garbage,
duplicate names, unclaimed fds, more fds than one message carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import is_open, nofile_at_least, wait_until, within

from aioancillary import (
    AncillaryConnection,
    OwnedFd,
    PeerRejectedError,
    open_unix_connection,
    start_unix_server,
)
from aioancillary._lifecycle._reload import (
    Generation,
    HandoffBusyError,
    HandoffError,
    HandoffTimeoutError,
    start_generation,
)
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
        g1 = await spawn(children, path, "g1", "--ready-timeout", "0.5")
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
    accepted = asyncio.Event()

    async def mute(conn: AncillaryConnection) -> None:
        accepted.set()
        async for msg in conn:  # reads the hello, answers nothing, until the peer leaves
            msg.close()

    async with await start_unix_server(mute, path):
        async with generations(path) as children:
            successor = await spawn(children, path, "g2", "--timeout", "0.3")
            failed = await successor.event("failed")
            assert await successor.returncode() == 2
        assert accepted.is_set()
    assert failed["error"] == "HandoffTimeoutError"
    assert (
        "no answer within 0.3 s while waiting for the running generation's fds"
        in (failed["message"])
    )


# -- in-process: the protocol's edges ---------------------------------------------------------


def listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0))


async def first_generation(path: Path, **kwargs: Any) -> Generation:
    gen = await within(start_generation(path, systemd=False, **kwargs))
    # The generation keeps its own copies for the successor: ours can go at once.
    gen.take_socket("web", create=listener).close()
    gen.take_fd("state", create=lambda: OwnedFd(os.memfd_create("state"))).close()
    await within(gen.ready())
    return gen


@contextlib.asynccontextmanager
async def closing(*gens: Generation) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for gen in gens:
            await within(gen.close())


async def test_inherit_by_name_and_hand_over(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    g1_web = g1._offered["web"][0]
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


async def raw_successor(path: Path) -> tuple[AncillaryConnection, list[Any]]:
    """Connect, say hello, read the fds message; return the connection and (names, fds)."""
    conn = await within(open_unix_connection(path))
    await conn.send(json.dumps({"op": "hello", "version": 1, "pid": os.getpid()}).encode())
    msg = await within(conn.recv())
    body = json.loads(msg.data)
    return conn, [body, msg]


async def test_second_upgrade_is_refused_while_one_is_in_progress(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    async with closing(g1):
        conn, (body, msg) = await raw_successor(path)  # holds the fds, no "ready" yet
        with msg:
            assert body["names"] == ["web", "state"]
            assert len(msg.fds) == 2
        with pytest.raises(HandoffBusyError, match="another successor is taking over right now"):
            await within(start_generation(path))
        conn.close()  # the first successor gives up: g1 serves on, and accepts the next
        await within(conn.wait_closed())
        g2 = await within(_retry_busy(path))
        async with closing(g2):
            g2.take_socket("web").close()
            g2.take_fd("state").close()
            await within(g2.ready())
            await within(g1.handed_over())


async def _retry_busy(path: Path) -> Generation:
    """start_generation until the running one is no longer busy with a failed successor."""
    while True:
        try:
            return await start_generation(path)
        except HandoffBusyError:
            await asyncio.sleep(0.01)  # the failed successor's cleanup has not reached it yet


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


async def test_ready_timeout_aborts_and_the_successor_is_told(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path, ready_timeout=0.2)
    async with closing(g1):
        g2 = await within(start_generation(path))
        async with closing(g2):
            g2.take_socket("web").close()
            # Too slow: by the time it says ready, g1 has aborted and closed the connection.
            await within(_wait_closed_by_peer(g2))
            with pytest.raises(HandoffError, match=r"gave up this handoff .* keeps serving"):
                await within(g2.ready())
        assert not g1.is_handed_over()
        g3 = await within(start_generation(path))  # g1 still offers everything
        async with closing(g3):
            assert g3.inherited.names() == ["web", "state"]
            g3.inherited.close()


async def _wait_closed_by_peer(gen: Generation) -> None:
    conn = gen._predecessor
    assert conn is not None
    await wait_until(lambda: not conn.transport.is_reading())  # its EOF was read


async def test_predecessor_that_fetches_fds_but_never_releases(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    sent = asyncio.Event()

    async def half_old(conn: AncillaryConnection) -> None:
        with await conn.recv():
            pass
        with listener() as sock:
            await conn.send_fds(b'{"op":"fds","names":["web"],"last":true}', [sock])
        sent.set()
        async for msg in conn:  # never answers "ready"; ends when the successor closes
            msg.close()

    async with await start_unix_server(half_old, path):
        gen = await within(start_generation(path, timeout=0.2))
        async with closing(gen):
            gen.take_socket("web").close()
            with pytest.raises(HandoffTimeoutError, match="waiting for the predecessor to release"):
                await within(gen.ready())
        assert sent.is_set()


async def test_hello_never_sent_times_out_then_serves_again(tmp_path: Path) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path, timeout=0.2)
    async with closing(g1):
        silent = await within(open_unix_connection(path))
        async with silent:
            with pytest.raises(Exception, match="closed"):
                await within(silent.recv())  # g1 gave up on it and hung up
        g2 = await within(start_generation(path))
        async with closing(g2):
            assert g2.inherited.names() == ["web", "state"]
            g2.inherited.close()


@pytest.mark.parametrize(
    "garbage",
    [b"not json", b"[1, 2]", b'{"op": "ready"}', b'{"op": "hello", "version": 99}'],
)
async def test_garbage_from_a_successor_leaves_the_old_one_serving(
    tmp_path: Path, garbage: bytes
) -> None:
    path = tmp_path / "handoff.sock"
    g1 = await first_generation(path)
    async with closing(g1):
        conn = await within(open_unix_connection(path))
        async with conn:
            await conn.send(garbage)
            async for msg in conn:  # an "abort" at most, never fds
                with msg:
                    assert json.loads(msg.data)["op"] == "abort"
                    assert msg.fds == ()
        g2 = await within(_retry_busy(path))
        async with closing(g2):
            assert g2.inherited.names() == ["web", "state"]
            g2.inherited.close()


@pytest.mark.parametrize(
    "reply",
    [
        (b'{"op":"fds","names":["a","b"],"last":true}', 1),
        (b'{"op":"fds","names":"web","last":true}', 1),
        (b'{"op":"fds","names":["a:b"],"last":true}', 1),
        (b'{"op":"released"}', 1),
        (b"\xff", 0),
    ],
)
async def test_garbage_from_the_old_one_closes_every_fd(
    tmp_path: Path, reply: tuple[bytes, int]
) -> None:
    path = tmp_path / "handoff.sock"
    data, nfds = reply

    async def bad_old(conn: AncillaryConnection) -> None:
        with await conn.recv():
            pass
        pipes = [os.pipe() for _ in range(nfds)]
        await conn.send_fds(data, [r for r, _ in pipes])
        for r, w in pipes:
            os.close(r)
            os.close(w)
        async for msg in conn:
            msg.close()

    async with await start_unix_server(bad_old, path):
        with pytest.raises(HandoffError, match="protocol error"):
            await within(start_generation(path))


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
