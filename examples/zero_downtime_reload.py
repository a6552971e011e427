"""Zero-downtime reload: each server generation hands its listening TCP socket to the next.

Generation 1 creates a listening socket on 127.0.0.1 (an ephemeral port) and serves clients.
To upgrade, a new process (generation 2) is started; it connects to the running server's
handoff socket (a Unix socket), receives the *listening* socket with ``send_fds``, starts
accepting on it, and tells the old generation, which then stops accepting, finishes the
connections it already has, and exits. Generation 3 takes over from generation 2 the same way.

The listening socket is never closed, so the port is never unbound: clients that connect during
a handoff wait in the kernel's accept queue and are served by whichever generation accepts them.
Meanwhile several clients connect continuously; the script prints which generation served each
connection and checks that none was refused or dropped.

Run it::

    .venv/bin/python examples/zero_downtime_reload.py

It starts the generations itself (``zero_downtime_reload.py --generation N PATH``) and exits
0 when every connection was served.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time

from aioancillary import (
    AncillaryConnection,
    Credentials,
    open_unix_connection,
    start_unix_server,
)

GENERATIONS = 3
CLIENT_LOOPS = 4  # clients connecting concurrently, each one connection after another
SECONDS_PER_GENERATION = 0.3


def say(who: str, text: str) -> None:
    print(f"[{who}] {text}", flush=True)


def same_user(creds: Credentials | None) -> bool:
    """``authorize`` callback: only our own user may take the listening socket."""
    return creds is not None and creds.uid == os.getuid()


# -- a server generation --------------------------------------------------------------------


class Acceptor:
    """Accepts TCP connections on a listening socket and tracks each one from the start.

    Accepting by hand (``add_reader`` plus non-blocking ``accept``), rather than with
    ``asyncio.start_server``, means a connection belongs to a tracked task from the instant it
    leaves the kernel's queue: when this generation stops, it knows exactly which connections
    it must finish before exiting, and none is dropped in between.
    """

    def __init__(self, listener: socket.socket, gen: int) -> None:
        self.listener = listener
        self.gen = gen
        self.in_flight: set[asyncio.Task[None]] = set()
        self.served = 0
        self.loop = asyncio.get_running_loop()
        listener.setblocking(False)
        self.loop.add_reader(listener.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            task = self.loop.create_task(self._serve(sock))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)

    async def _serve(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)  # the stream owns sock
        try:
            await reader.readline()
            await asyncio.sleep(0.01)  # some work, so that connections are in flight at handoff
            writer.write(f"generation {self.gen} (pid {os.getpid()})\n".encode())
            await writer.drain()
            self.served += 1
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def stop(self) -> None:
        """Stop accepting and close this process's copy of the listening socket."""
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()  # the socket lives on in the successor: the port stays bound

    async def finish(self) -> None:
        while self.in_flight:
            await asyncio.gather(*list(self.in_flight), return_exceptions=True)


async def generation_main(gen: int, handoff_path: str) -> int:
    me = f"gen {gen} pid {os.getpid()}"
    if gen == 1:
        listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        say(me, f"created the listening socket 127.0.0.1:{listener.getsockname()[1]}")
        acceptor = Acceptor(listener, gen)
    else:
        say(me, f"started; asking generation {gen - 1} for the listening socket")
        async with await open_unix_connection(handoff_path, authorize=same_user) as old:
            await old.send(b"takeover")
            with await old.recv() as msg:  # closes the fd if anything below fails
                listener = msg.take_fd().into_socket()
            say(
                me,
                f"received the listening socket as fd {listener.fileno()} "
                f"(inode {os.fstat(listener.fileno()).st_ino}); accepting on it now",
            )
            acceptor = Acceptor(listener, gen)
            await old.send(b"serving")
            async for reply in old:  # the old generation hangs up once it stopped accepting
                reply.close()
    port = listener.getsockname()[1]
    done = asyncio.Event()

    async def on_control(conn: AncillaryConnection) -> None:
        with await conn.recv() as request:
            command = request.data
        if command == b"takeover":
            creds = conn.peercred
            fd = listener.fileno()
            say(
                me,
                f"pid {creds.pid if creds else '?'} takes over: sending it the listening "
                f"socket (fd {fd}, inode {os.fstat(fd).st_ino})",
            )
            await conn.send_fds(b"listener", [listener])
            with await conn.recv():  # "serving": the successor accepts from the same queue
                pass
        acceptor.stop()
        control.close()  # release the handoff path for the successor
        say(me, f"stopped accepting; finishing {len(acceptor.in_flight)} connection(s) in flight")
        done.set()

    control = await start_unix_server(on_control, handoff_path, authorize=same_user)
    print(f"READY {port}", flush=True)  # tells the driver this generation is up
    await done.wait()
    await control.wait_closed()  # the successor sees EOF once on_control has returned
    await acceptor.finish()
    say(me, f"served {acceptor.served} connections; exiting")
    return 0


# -- the driver: starts generations, runs clients, checks -------------------------------------


async def relay_output(proc: asyncio.subprocess.Process, ready: asyncio.Future[int]) -> None:
    """Print a generation's narration; resolve ``ready`` with its port on the READY line."""
    assert proc.stdout is not None
    async for raw in proc.stdout:
        line = raw.decode().rstrip("\n")
        if line.startswith("READY ") and not ready.done():
            ready.set_result(int(line.split()[1]))
        else:
            print(line, flush=True)
    if not ready.done():
        ready.set_exception(RuntimeError("a generation exited before it was ready"))


async def start_generation(
    gen: int, handoff_path: str, relays: list[asyncio.Task[None]]
) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--generation",
        str(gen),
        handoff_path,
        stdout=asyncio.subprocess.PIPE,
    )
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    relays.append(asyncio.create_task(relay_output(proc, ready)))
    port = await asyncio.wait_for(ready, timeout=15)
    return proc, port


async def client_loop(port: int, log: list[str], failures: list[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:  # ConnectionRefusedError: the port was not listening
            failures.append(f"connect failed: {exc!r}")
            continue
        try:
            writer.write(b"hello\n")
            await writer.drain()
            answer = (await reader.readline()).decode().strip()
            if answer:
                log.append(answer)
            else:
                failures.append("connection closed without an answer")
        except OSError as exc:
            failures.append(f"connection dropped: {exc!r}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def runs(log: list[str]) -> list[tuple[int, int, str]]:
    """Group consecutive connections served by the same generation: (first, last, who)."""
    out: list[tuple[int, int, str]] = []
    for i, who in enumerate(log, start=1):
        if out and out[-1][2] == who:
            out[-1] = (out[-1][0], i, who)
        else:
            out.append((i, i, who))
    return out


async def driver_main() -> int:
    started = time.perf_counter()
    log: list[str] = []
    failures: list[str] = []
    relays: list[asyncio.Task[None]] = []
    procs: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "handoff.sock")
        try:
            proc, port = await start_generation(1, path, relays)
            procs.append(proc)
            say("driver", f"{CLIENT_LOOPS} clients now connect to 127.0.0.1:{port} nonstop")
            stop = asyncio.Event()
            clients = [
                asyncio.create_task(client_loop(port, log, failures, stop))
                for _ in range(CLIENT_LOOPS)
            ]
            for gen in range(2, GENERATIONS + 1):
                await asyncio.sleep(SECONDS_PER_GENERATION)
                say("driver", f"starting generation {gen} ({len(log)} connections served so far)")
                proc, _port = await start_generation(gen, path, relays)
                procs.append(proc)
            await asyncio.sleep(SECONDS_PER_GENERATION)
            stop.set()
            await asyncio.gather(*clients)
            say("driver", f"clients stopped; asking generation {GENERATIONS} to exit")
            async with await open_unix_connection(path, authorize=same_user) as conn:
                await conn.send(b"quit")
                async for msg in conn:  # wait until it hangs up
                    msg.close()
        finally:
            for proc in procs:
                if proc.returncode is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), timeout=10)
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await asyncio.gather(*relays, return_exceptions=True)
    codes = [proc.returncode for proc in procs]

    print(f"\n{len(log)} connections, in the order they completed, by who served them:")
    for first, last, who in runs(log):
        span = f"#{first}" if first == last else f"#{first}-#{last}"
        print(f"  {span:>11}  {who}")
    generations = sorted({who.split()[1] for who in log})
    elapsed = time.perf_counter() - started
    if not failures and codes == [0] * GENERATIONS and len(generations) == GENERATIONS:
        print(
            f"\nOK: {len(log)} connections in {elapsed:.1f} s across {GENERATIONS} server "
            "processes, none refused or dropped: the listening socket was handed over, never "
            "closed."
        )
        return 0
    print(f"\nFAILED: {len(failures)} failure(s) {failures[:5]}, exit codes {codes}")
    return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--generation"]:
        sys.exit(asyncio.run(generation_main(int(sys.argv[2]), sys.argv[3])))
    sys.exit(asyncio.run(driver_main()))
