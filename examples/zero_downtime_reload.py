"""Zero-downtime reload: each server generation hands its listening TCP socket to the next.

Every server process is a *generation* (``aioancillary.start_generation``). Generation 1 finds
nobody on the handoff socket, so it creates its listening socket on 127.0.0.1 (an ephemeral
port) and serves. Generation 2 starts while 1 serves: it connects to 1's handoff socket, takes
the socket named "web" (the same open socket: same inode, same accept queue), starts accepting,
and declares itself ready; generation 1 then stops accepting, finishes the connections it has,
and exits. Generation 3 takes over from 2 the same way, once 2's predecessor has exited. Each
generation serves with ``aioancillary.ConnectionServer``, which tracks every connection from
``accept()`` on, stops accepting without closing the listener, and drains with a deadline.

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
import signal
import socket
import sys
import tempfile
import time

from aioancillary import ConnectionServer, Generation, HandoffBusyError, start_generation

GENERATIONS = 3
CLIENT_LOOPS = 4  # clients connecting concurrently, each one connection after another
SECONDS_PER_GENERATION = 0.3
DRAIN_DEADLINE = 5.0  # seconds an old generation gives its in-flight connections


def say(who: str, text: str) -> None:
    print(f"[{who}] {text}", flush=True)


# -- a server generation --------------------------------------------------------------------


async def start_generation_retrying(handoff_path: str) -> Generation:
    """start_generation, retried while the running one is busy with the previous upgrade."""
    for _ in range(50):
        try:
            return await start_generation(handoff_path)
        except HandoffBusyError as exc:
            say(f"pid {os.getpid()}", f"{exc}: retrying in 0.1 s")
            await asyncio.sleep(0.1)
    raise SystemExit("the running generation stayed busy")


async def generation_main(number: int, handoff_path: str) -> int:
    me = f"gen {number} pid {os.getpid()}"
    gen = await start_generation_retrying(handoff_path)
    if gen.predecessor_pid is None:
        say(me, "nobody on the handoff socket: first generation")
    else:
        say(me, f"took {gen.inherited.names()} from generation pid {gen.predecessor_pid}")
    # Inherit by name, or bind if absent: only generation 1 ever binds the port.
    listener = gen.take_socket("web", create=lambda: socket.create_server(("127.0.0.1", 0)))
    port = listener.getsockname()[1]
    inode = os.fstat(listener.fileno()).st_ino
    served = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readline()
        await asyncio.sleep(0.01)  # some work, so that connections are in flight at handoff
        writer.write(f"generation {number} (pid {os.getpid()})\n".encode())
        await writer.drain()
        served += 1  # the server closes the writer when this returns

    # Every connection is tracked from the instant it is accepted: when this generation
    # stops, it knows exactly which ones it must finish before exiting.
    server = ConnectionServer(serve)
    server.add_listener(listener, name="web")
    await gen.ready()  # the predecessor stops accepting; the handoff socket is ours now
    say(me, f"accepting on 127.0.0.1:{port} (socket inode {inode})")
    print(f"READY {port}", flush=True)  # tells the driver this generation is up

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    handed = asyncio.ensure_future(gen.handed_over())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([handed, stopped], return_when=asyncio.FIRST_COMPLETED)
    handed.cancel()
    stopped.cancel()
    server.stop_accepting()  # the listener stays open: the successor accepts on it
    why = "a successor took over" if gen.is_handed_over() else "asked to stop"
    say(me, f"{why}: stopped accepting; finishing {server.active} connection(s)")
    late = await server.drain(timeout=DRAIN_DEADLINE)
    listener.close()  # this process's copy: the port stays bound in the successor
    await gen.close()  # lets the successor accept the next upgrade
    say(me, f"served {served} connections ({late} cut at the deadline); exiting")
    return 0 if late == 0 else 1


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


async def spawn_generation(
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
            proc, port = await spawn_generation(1, path, relays)
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
                proc, _port = await spawn_generation(gen, path, relays)
                procs.append(proc)
            await asyncio.sleep(SECONDS_PER_GENERATION)
            stop.set()
            await asyncio.gather(*clients)
            say("driver", f"clients stopped; asking generation {GENERATIONS} to exit")
            procs[-1].send_signal(signal.SIGTERM)
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
