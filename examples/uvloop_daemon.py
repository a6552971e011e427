"""A uvloop daemon run the systemd way: socket-activated, fd store, reload without downtime.

The script plays two parts. The *manager* (a stand-in for systemd) starts the daemon with the
real ``systemd-socket-activate`` (``-l 127.0.0.1:PORT --fdname=web``), runs a notification
socket (``NOTIFY_SOCKET``) that keeps an fd store, and sends ``SIGHUP`` to reload and
``SIGTERM`` to stop, while visitors connect without pause. The *daemon*:

* adopts the listening socket by name (``start_generation`` falls back to ``listen_fds``
  when no older generation runs) and creates a state file (a memfd with a visitor counter);
* parks the state file in the manager's fd store (``notify(fdstore=..., fdname="state")``)
  and says ``READY=1``;
* on ``SIGHUP`` says ``RELOADING=1`` and starts its successor, which takes the listening
  socket and the state file from it by name, says ``MAINPID=`` and ``READY=1``; the old one
  stops accepting, finishes its visitors and exits. No visitor is refused meanwhile. The
  visitors are served by ``ConnectionServer``, which tracks each from ``accept()`` on and
  drains with a deadline, leaving the listening socket open for the successor.

Both run on uvloop, selected with ``asyncio.Runner(loop_factory=uvloop.new_event_loop)``
(no event-loop policy); without uvloop the default loop is used and the script says so.
Without ``systemd-socket-activate`` the manager passes the socket itself, the same way.

Run it::

    .venv/bin/python examples/uvloop_daemon.py

It exits 0 when the visitors were counted 1 to N, without a gap, by two daemon processes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Coroutine
from typing import Any

from aioancillary import ConnectionServer, OwnedFd, notify_async, recv_fds, start_generation

try:
    import uvloop
except ImportError:  # the example still runs, on the default loop
    uvloop = None  # type: ignore[assignment]

VISITORS_PER_PHASE = 6


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on a fresh uvloop loop (a loop factory, not a policy)."""
    factory: Callable[[], asyncio.AbstractEventLoop] = (
        uvloop.new_event_loop if uvloop is not None else asyncio.new_event_loop
    )
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def say(who: str, text: str) -> None:
    print(f"[{who}] {text}", flush=True)


def loop_name() -> str:
    loop = asyncio.get_running_loop()
    return f"{type(loop).__module__}.{type(loop).__name__}"


# -- the daemon -----------------------------------------------------------------------------


async def daemon_main(handoff_path: str) -> int:
    me = f"daemon pid {os.getpid()}"
    loop = asyncio.get_running_loop()
    gen = await start_generation(handoff_path)
    say(me, f"on {loop_name()}; got {gen.inherited.names()} from {gen.inherited.source}")
    listener = gen.take_socket("web")  # socket-activated: never bound here
    state = gen.take_fd("state", create=lambda: OwnedFd(os.memfd_create("visitors")))

    async def visitor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        count = int.from_bytes(os.pread(state.fileno(), 8, 0) or bytes(8), "little") + 1
        os.pwrite(state.fileno(), count.to_bytes(8, "little"), 0)
        writer.write(f"visitor #{count}, welcomed by pid {os.getpid()}\n".encode())
        await writer.drain()  # the server closes the writer when this returns

    # Every visitor is tracked from the instant it is accepted (a persistent reader, not
    # loop.sock_accept): none is forgotten when this daemon stops accepting.
    server = ConnectionServer(visitor)
    server.add_listener(listener, name="web")
    await gen.ready()
    if gen.predecessor_pid is None:
        # Park the state with the manager: a restart would get it back in LISTEN_FDS.
        await notify_async(fdstore=[state], fdname="state", fdpoll=False)
        await notify_async(ready=True, status="serving")
    else:
        await notify_async(mainpid=os.getpid(), ready=True, status="serving (reloaded)")
    say(me, f"serving on 127.0.0.1:{listener.getsockname()[1]}")

    stop = asyncio.Event()
    successor: list[asyncio.subprocess.Process] = []

    async def reload() -> None:
        await notify_async(reloading=True)
        say(me, "SIGHUP: starting my successor")
        successor.append(
            await asyncio.create_subprocess_exec(sys.executable, __file__, "--daemon", handoff_path)
        )

    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    handed = loop.create_task(gen.handed_over())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait([handed, stopped], return_when=asyncio.FIRST_COMPLETED)
    handed.cancel()
    stopped.cancel()
    if stop.is_set():
        await notify_async(stopping=True)
    server.stop_accepting()  # the listener stays open: the successor (if any) accepts on it
    say(me, f"stopped accepting; finishing {server.active} visitor(s)")
    cut = await server.drain(timeout=5.0)
    listener.close()  # this process's copy: the successor keeps the port open
    if cut:
        say(me, f"cut {cut} visitor(s) at the deadline")
    state.close()
    await gen.close()
    say(me, "exiting")
    return 0


# -- the manager (a stand-in for systemd) -----------------------------------------------------


class Manager:
    """Reads sd_notify datagrams; keeps the fd store; tracks the service's main pid."""

    def __init__(self, sock: socket.socket, main_pid: int) -> None:
        self.sock = sock
        self.main_pid = main_pid
        self.store: dict[str, tuple[OwnedFd, ...]] = {}
        self.seen: list[str] = []
        self.changed = asyncio.Event()
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_datagram)

    def _on_datagram(self) -> None:
        while True:
            try:
                msg = recv_fds(self.sock, 4096, 16)
            except BlockingIOError:
                return
            with msg:  # fds not put in the store are closed
                text, nfds = msg.data.decode(), len(msg.fds)
                say("manager", f"notified: {text!r} with {nfds} fd(s)")
                fields = dict(line.split("=", 1) for line in msg.data.decode().splitlines())
                self.seen.append(" ".join(sorted(fields)))
                if fields.get("FDSTORE") == "1":
                    name = fields.get("FDNAME", "stored")
                    for old in self.store.pop(name, ()):
                        old.close()
                    self.store[name] = msg.take_fds()
                if "MAINPID" in fields:
                    self.main_pid = int(fields["MAINPID"])
            self.changed.set()

    async def wait_for(self, key: str) -> None:
        while not any(key in seen.split() for seen in self.seen):
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), timeout=15)
        self.seen = [seen for seen in self.seen if key not in seen.split()]

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        for fds in self.store.values():
            for fd in fds:
                fd.close()


async def start_daemon(port: int, handoff: str, notify_path: str) -> asyncio.subprocess.Process:
    """Start the daemon socket-activated on 127.0.0.1:port, once the socket listens."""
    daemon = [sys.executable, __file__, "--daemon", handoff]
    tool = shutil.which("systemd-socket-activate")
    if tool is not None:
        proc = await asyncio.create_subprocess_exec(
            tool, f"--listen=127.0.0.1:{port}", "--fdname=web",
            f"--setenv=NOTIFY_SOCKET={notify_path}", *daemon,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), timeout=15)
        say("manager", f"systemd-socket-activate: {line.decode().strip()}")
        asyncio.get_running_loop().create_task(relay(proc.stderr))
        return proc
    say("manager", "systemd-socket-activate not found: passing the socket the same way myself")
    with socket.create_server(("127.0.0.1", port)) as sock:
        return await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--activated", str(sock.fileno()), *daemon[2:],
            pass_fds=[sock.fileno()], env={**os.environ, "NOTIFY_SOCKET": notify_path},
        )  # fmt: skip


async def relay(stream: asyncio.StreamReader) -> None:
    async for line in stream:
        sys.stderr.write(line.decode())


def exec_activated(fd: int, handoff: str) -> None:
    """What systemd-socket-activate does: the socket at fd 3, LISTEN_* set, exec the daemon."""
    os.dup2(fd, 3)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="web")
    os.execv(sys.executable, [sys.executable, __file__, "--daemon", handoff])


async def visit(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"hello\n")
        await writer.drain()
        return (await reader.readline()).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


async def exited(pid: int) -> None:
    """Wait for a process that is not our child (the reloaded daemon) to exit."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)  # readable once the process has exited (pidfd_open(2))
    except ProcessLookupError:
        return  # already gone (and reaped)
    try:
        done = asyncio.Event()
        loop.add_reader(pidfd, done.set)
        try:
            await asyncio.wait_for(done.wait(), timeout=15)
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


async def exit_status(proc: asyncio.subprocess.Process) -> int:
    """The exit status of our child ``proc``, without ``proc.wait()``.

    On the default loop ``wait()`` also waits until the child's stderr pipe is closed, and the
    reloaded daemon (the child's successor) inherited that pipe and keeps it open.
    """
    await exited(proc.pid)
    async with asyncio.timeout(15):
        # The loop's child watcher sets returncode right after the exit, with no event to wait on.
        while proc.returncode is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return proc.returncode


async def manager_main() -> int:
    me = "manager"
    if uvloop is None:
        say(me, "uvloop is not installed: running on the default asyncio loop instead")
    say(me, f"running on {loop_name()}")
    answers: list[str] = []
    failures: list[str] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns,
    ):
        notify_path = os.path.join(tmp, "notify.sock")
        ns.bind(notify_path)
        with socket.create_server(("127.0.0.1", 0)) as probe:
            port = probe.getsockname()[1]
        proc = await start_daemon(port, os.path.join(tmp, "handoff.sock"), notify_path)
        manager = Manager(ns, proc.pid)
        try:
            # The first visitor makes systemd-socket-activate exec the daemon.
            answers.append(await visit(port))
            await manager.wait_for("READY")
            assert "state" in manager.store, "the daemon did not park its state"

            async def visitors(count: int) -> None:
                for _ in range(count):
                    try:
                        answers.append(await visit(port))
                    except OSError as exc:
                        failures.append(repr(exc))

            first_pid = manager.main_pid
            await visitors(VISITORS_PER_PHASE - 1)
            say(me, f"visitors keep coming; SIGHUP to main pid {first_pid} (reload)")
            during = asyncio.ensure_future(visitors(VISITORS_PER_PHASE))
            os.kill(first_pid, signal.SIGHUP)
            await manager.wait_for("RELOADING")
            await manager.wait_for("MAINPID")
            await during
            assert await exit_status(proc) == 0
            say(me, f"daemon pid {first_pid} exited; main pid is now {manager.main_pid}")
            await visitors(VISITORS_PER_PHASE)
            os.kill(manager.main_pid, signal.SIGTERM)
            await manager.wait_for("STOPPING")
            await exited(manager.main_pid)
            (state,) = manager.store["state"]
            stored = int.from_bytes(os.pread(state.fileno(), 8, 0), "little")
        finally:
            manager.close()
            if proc.returncode is None:
                proc.kill()
                await exit_status(proc)
    numbers = [int(a.split(",")[0].removeprefix("visitor #")) for a in answers]
    pids = {a.rsplit(" ", 1)[1] for a in answers}
    total = len(numbers)
    if not failures and numbers == list(range(1, total + 1)) and len(pids) == 2 and stored == total:
        print(
            f"\nOK: {total} visitors counted 1 to {total} by two daemon processes "
            f"(socket-activated, then reloaded on SIGHUP), none refused; the fd store still "
            f"holds the state file, counter {stored}"
        )
        return 0
    print(f"\nFAILED: answers={answers!r} failures={failures}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--daemon"]:
        sys.exit(run(daemon_main(sys.argv[2])))
    if sys.argv[1:2] == ["--activated"]:
        exec_activated(int(sys.argv[2]), sys.argv[3])
    sys.exit(run(manager_main()))
