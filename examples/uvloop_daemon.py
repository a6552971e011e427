"""A uvloop daemon that parks its fds with a supervisor and gets them back after a restart.

The supervisor runs an "fd store" on a Unix socket (like systemd's ``FileDescriptorStore``):
a daemon sends it the fds it wants to keep across restarts, and asks for them when it starts.
Here the daemon parks two fds: its listening TCP socket on 127.0.0.1 and an in-memory state
file holding a visitor counter. The supervisor keeps its copies while no daemon runs, so:

* the port stays bound during the restart: a client that connects then is not refused, it
  waits in the kernel's accept queue and is answered by the next daemon;
* the state survives the process: the visitor count goes on where the old daemon stopped.

Both processes run on uvloop, selected with ``asyncio.Runner(loop_factory=uvloop.new_event_loop)``
(no event-loop policy). Without uvloop installed the default loop is used, and the script says so.

Run it::

    .venv/bin/python examples/uvloop_daemon.py

It starts the daemons itself (``uvloop_daemon.py --daemon N PATH``) and exits 0 when the six
visitors were counted 1 to 6 across the two daemon lifetimes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Coroutine
from typing import IO, Any

from aioancillary import (
    AncillaryConnection,
    Credentials,
    OwnedFd,
    open_unix_connection,
    start_unix_server,
)

try:
    import uvloop
except ImportError:  # the example still runs, on the default loop
    uvloop = None  # type: ignore[assignment]


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on a fresh uvloop loop (a loop factory, not a policy)."""
    factory: Callable[[], asyncio.AbstractEventLoop] = (
        uvloop.new_event_loop if uvloop is not None else asyncio.new_event_loop
    )
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def say(who: str, text: str) -> None:
    print(f"[{who}] {text}", flush=True)


def same_user(creds: Credentials | None) -> bool:
    """``authorize`` callback: only our own user may park or fetch fds."""
    return creds is not None and creds.uid == os.getuid()


def loop_name() -> str:
    loop = asyncio.get_running_loop()
    return f"{type(loop).__module__}.{type(loop).__name__}"


# -- the daemon -----------------------------------------------------------------------------


def new_state_file() -> IO[bytes]:
    """An anonymous in-memory file (memfd on Linux; a deleted temp file elsewhere)."""
    if hasattr(os, "memfd_create"):
        return open(os.memfd_create("daemon-state"), "r+b", buffering=0)
    return tempfile.TemporaryFile(buffering=0)


async def daemon_main(number: int, path: str) -> int:
    me = f"daemon #{number} pid {os.getpid()}"
    say(me, f"started on {loop_name()}; asking the supervisor for parked fds")
    async with await open_unix_connection(path, authorize=same_user) as supervisor:
        await supervisor.send(b"FETCH")
        with await supervisor.recv() as reply:  # any fd not taken is closed on leaving
            if reply.data == b"FDS" and len(reply.fds) == 2:
                listener_fd, state_fd = reply.take_fds()
                listener = listener_fd.into_socket()
                state = state_fd.into_file("r+b", buffering=0)
                say(
                    me,
                    f"got them back: listening socket as fd {listener.fileno()} (still bound to "
                    f"port {listener.getsockname()[1]}) and the state file as fd {state.fileno()}",
                )
            else:
                listener = socket.create_server(("127.0.0.1", 0))
                state = new_state_file()
                port = listener.getsockname()[1]
                await supervisor.send_fds(f"PARK {port}".encode(), [listener, state])
                (await supervisor.recv()).close()  # "PARKED"
                say(
                    me,
                    f"nothing parked yet: created a listening socket on 127.0.0.1:{port} and a "
                    "state file, and parked copies of both with the supervisor",
                )

        async def visitor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readline()
                count = int.from_bytes(os.pread(state.fileno(), 8, 0) or bytes(8), "little") + 1
                os.pwrite(state.fileno(), count.to_bytes(8, "little"), 0)
                writer.write(f"visitor #{count}, welcomed by daemon #{number}\n".encode())
                await writer.drain()
            finally:
                writer.close()
                await writer.wait_closed()

        with state:
            server = await asyncio.start_server(visitor, sock=listener)  # owns our listener copy
            async with server:
                with await supervisor.recv() as command:  # serve until told to stop
                    say(me, f"supervisor says {command.data.decode()}: closing my copies, exiting")
    return 0


# -- the supervisor -------------------------------------------------------------------------


class FdStore:
    """The supervisor's side: keeps parked fds and hands duplicates back on request."""

    def __init__(self) -> None:
        self.parked: tuple[OwnedFd, ...] = ()
        self.port = 0
        self.daemon: AncillaryConnection | None = None
        self.ready = asyncio.Event()

    async def serve(self, conn: AncillaryConnection) -> None:
        """Handler of one daemon connection (``start_unix_server`` closes it on return)."""
        self.daemon = conn
        async for msg in conn:  # ends when the daemon hangs up
            with msg:
                if msg.data == b"FETCH" and self.parked:
                    # send_fds borrows: the kernel sends its own references and the store
                    # keeps its copies, so a crash of this daemon loses nothing either.
                    await conn.send_fds(b"FDS", self.parked)
                    self.ready.set()
                elif msg.data == b"FETCH":
                    await conn.send(b"EMPTY")
                elif msg.data.startswith(b"PARK ") and len(msg.fds) == 2:
                    self.parked = msg.take_fds()  # the store owns them now
                    self.port = int(msg.data.split()[1])
                    await conn.send(b"PARKED")
                    self.ready.set()
        self.daemon = None

    def close(self) -> None:
        for fd in self.parked:
            fd.close()
        self.parked = ()


async def visit(port: int, who: str = "") -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if who:
        say(who, "  ...connected at once (the kernel queued it); waiting for the answer")
    try:
        writer.write(b"hello\n")
        await writer.drain()
        return (await reader.readline()).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


async def supervisor_main() -> int:
    me = f"supervisor pid {os.getpid()}"
    if uvloop is None:
        say(me, "uvloop is not installed: running on the default asyncio loop instead")
    say(me, f"running on {loop_name()}")
    store = FdStore()
    answers: list[str] = []
    codes: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fdstore.sock")
        async with await start_unix_server(store.serve, path, authorize=same_user) as server:
            try:
                for number in (1, 2):
                    store.ready.clear()
                    daemon = await asyncio.create_subprocess_exec(
                        sys.executable, __file__, "--daemon", str(number), path
                    )
                    if number == 2:
                        # No daemon has the socket yet, but the store's copy keeps it
                        # listening: the kernel queues this connection until daemon #2 accepts.
                        say(me, "a visitor connects while the new daemon is still starting")
                        answers.append(await visit(store.port, me))
                        say(me, f"visitor got: {answers[-1]}")
                    await asyncio.wait_for(store.ready.wait(), timeout=15)
                    for _ in range(3 if number == 1 else 2):
                        answers.append(await visit(store.port))
                        say(me, f"visitor got: {answers[-1]}")
                    assert store.daemon is not None
                    await store.daemon.send(b"STOP")
                    codes.append(await asyncio.wait_for(daemon.wait(), timeout=15))
                    say(
                        me,
                        f"daemon #{number} exited ({codes[-1]}); the store still holds the "
                        f"listening socket (fd {store.parked[0].fileno()}) and the state file "
                        f"(fd {store.parked[1].fileno()})",
                    )
            finally:
                server.close()
                store.close()
    say(me, "closed the parked fds; done")
    expected = [f"visitor #{n}" for n in range(1, 7)]
    if [a.split(",")[0] for a in answers] == expected and codes == [0, 0]:
        print(
            "\nOK: 6 visitors counted 1 to 6 by two daemon processes; the listening socket and "
            "the state file outlived the first daemon because the supervisor held them."
        )
        return 0
    print(f"\nFAILED: answers={answers!r} exit codes={codes}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--daemon"]:
        sys.exit(run(daemon_main(int(sys.argv[2]), sys.argv[3])))
    sys.exit(run(supervisor_main()))
