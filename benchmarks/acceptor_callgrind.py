"""Instructions per handed client in the :class:`aioancillary.Acceptor` process (callgrind).

Instruction counts do not depend on how loaded the machine is, so this compares versions of the
acceptor's hot path (accept burst, dispatch, batched hand-off, completion reports) where
wall-clock figures would be noise.

The acceptor runs alone under ``valgrind --tool=callgrind`` in a child process; this process
connects the clients (in waves of ``--wave``, all queued in the listen backlog before the next
wave) and runs the worker (an :class:`aioancillary.Worker` that closes each client at once). The
acceptor's instruction count is taken for two client counts; the difference over the difference
of clients is the cost per client, without the interpreter's start-up and the loop's set-up.

Run::

    .venv/bin/python benchmarks/acceptor_callgrind.py                  # asyncio and uvloop
    .venv/bin/python benchmarks/acceptor_callgrind.py --loop asyncio --wave 1 --wave 32
    PYTHONPATH=/path/to/other/src .venv/bin/python benchmarks/acceptor_callgrind.py  # compare
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import asyncio, os, signal, socket, sys
import aioancillary as aa

loop_name, lfd, wfd, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if loop_name == "uvloop":
    import uvloop
    factory = uvloop.new_event_loop
else:
    factory = asyncio.new_event_loop

async def main():
    acceptor = aa.Acceptor()
    acceptor.add_listener(socket.socket(fileno=lfd))
    acceptor.add_worker(socket.socket(fileno=wfd))
    done = asyncio.get_running_loop().create_future()
    # No timer polls for the end (its wake-ups would be counted): the driver signals it.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set_result, None)
    await done
    acceptor.close()
    await acceptor.wait_closed()  # the worker left: its last reports were read before
    assert acceptor.stats().completed == total, acceptor.stats()

with asyncio.Runner(loop_factory=factory) as runner:
    runner.run(main())
"""


async def drive(listener_addr: tuple[str, int], sock: socket.socket, total: int, wave: int) -> None:
    import aioancillary as aa  # noqa: PLC0415 - the version under test (PYTHONPATH)

    worker = await aa.Worker.connect(sock=sock)
    served = 0
    closed = asyncio.Event()

    async def serve() -> None:
        nonlocal served
        async for client in worker:
            client.done()
            served += 1
            closed.set()

    task = asyncio.ensure_future(serve())
    sent = 0
    while sent < total:
        n = min(wave, total - sent)
        clients = []
        for _ in range(n):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(listener_addr)
            clients.append(c)
        sent += n
        while served < sent:
            closed.clear()
            await closed.wait()
        for c in clients:
            c.close()
    worker.close()
    await worker.wait_closed()
    await task


def measure(loop_name: str, total: int, wave: int, out: Path) -> int:
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    ours, theirs = socket.socketpair()
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        "-c",
        CHILD,
        loop_name,
        str(listener.fileno()),
        str(theirs.fileno()),
        str(total),
    ]
    proc = subprocess.Popen(
        cmd,
        pass_fds=(listener.fileno(), theirs.fileno()),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    addr = listener.getsockname()
    listener.close()
    theirs.close()
    asyncio.run(drive(addr, ours, total, wave))
    proc.terminate()
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"acceptor failed ({proc.returncode}): {err.decode()[-2000:]}")
    match = re.search(rb"Collected : (\d+)", err)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output: {err.decode()[-2000:]}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", action="append", choices=["asyncio", "uvloop"])
    parser.add_argument("--wave", action="append", type=int, help="clients per wave (1, 16)")
    parser.add_argument("--small", type=int, default=200, help="clients in the short run")
    parser.add_argument("--large", type=int, default=1200, help="clients in the long run")
    args = parser.parse_args()
    import aioancillary  # noqa: PLC0415

    print(f"aioancillary from {Path(aioancillary.__file__).parent}")
    with tempfile.TemporaryDirectory() as tmp:
        for loop_name in args.loop or ["asyncio", "uvloop"]:
            for wave in args.wave or [1, 16]:
                small = measure(loop_name, args.small, wave, Path(tmp) / "small.out")
                large = measure(loop_name, args.large, wave, Path(tmp) / "large.out")
                per = (large - small) / (args.large - args.small)
                print(f"{loop_name:8} wave {wave:3}: {per:9.0f} instructions per handed client")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
