"""Instructions per handed client in the [`Acceptor`][aioancillary.Acceptor]'s hot path (callgrind).

Instruction counts do not depend on how loaded the machine is, so this compares versions of
the acceptor's hot path (accept burst, dispatch, batched hand-off, completion report) where
wall-clock figures would be noise.

One process under ``valgrind --tool=callgrind`` runs an acceptor with one listener and one
worker whose side of the link is a plain socket driven by this script, in rounds: connect
``batch`` clients (all in the listen backlog before the loop runs), let the loop run until
the acceptor has accepted them (one wake-up: one burst, one ``C`` message; two loop turns,
checked at the end), read that message and close the client fds as a worker would, report them
finished (one ``D`` message) and let the loop read it (two turns). Nothing waits on time, so
the count is the same from run to run. The count
is taken for two numbers of rounds; the difference over the difference of clients is the cost
per client, without the interpreter's start-up and the set-up. The client side (connect,
close) and the worker side are in it too, the same for every version of the acceptor.

Run::

    .venv/bin/python benchmarks/acceptor_callgrind.py                  # asyncio and uvloop
    .venv/bin/python benchmarks/acceptor_callgrind.py --loop asyncio --batch 1 --batch 16
    PYTHONPATH=/path/to/other/src .venv/bin/python benchmarks/acceptor_callgrind.py  # compare
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import asyncio, socket, struct, sys
import aioancillary as aa
from aioancillary import recv_fds

loop_name, batch, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if loop_name == "uvloop":
    import uvloop
    factory = uvloop.new_event_loop
else:
    factory = asyncio.new_event_loop

HEADER = struct.Struct(">BBHI")  # the framing: version, flags, fd count, length

def frame(payload):
    return HEADER.pack(1, 0, 0, len(payload)) + payload

def read_message(sock):
    # One framed message from the acceptor; its fds closed (the clients are "served").
    with recv_fds(sock, 1 << 16, 253) as msg:
        return msg.data, len(msg.fds)

async def until(predicate):
    while not predicate():
        await asyncio.sleep(0)

async def turns(count=2):
    # A fixed number of loop iterations, enough for one wake-up to be handled (everything it
    # reacts to is ready before): the count then needs no look at the acceptor's state.
    for _ in range(count):
        await asyncio.sleep(0)

async def main():
    acceptor = aa.Acceptor(accept_burst=max(batch, 1))
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    addr = listener.getsockname()
    acceptor.add_listener(listener)
    ours, worker = socket.socketpair()
    acceptor.add_worker(ours)
    await until(lambda: acceptor.stats().accepting)
    worker.settimeout(30)
    read_message(worker)  # the welcome and the listener announcement (one read or two)
    worker.setblocking(False)
    try:
        while True:
            read_message(worker)
    except BlockingIOError:
        pass
    worker.settimeout(30)
    done = 0
    for _ in range(rounds):
        clients = [socket.socket() for _ in range(batch)]
        for client in clients:
            client.connect(addr)  # loopback: complete at once, queued in the backlog
        await turns()
        got = 0
        while got < batch:
            got += read_message(worker)[1]
        done += batch
        worker.sendall(frame(b"D" + batch.to_bytes(4, "big")))
        await turns()
        for client in clients:
            client.close()
    stats = acceptor.stats()
    assert stats.handed == stats.completed == done == rounds * batch, stats
    acceptor.close()
    worker.close()
    await acceptor.wait_closed()

with asyncio.Runner(loop_factory=factory) as runner:
    runner.run(main())
"""


def measure(loop_name: str, batch: int, rounds: int, out: Path) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-c",
            CHILD,
            loop_name,
            str(batch),
            str(rounds),
        ],
        capture_output=True,
        env=env,
        timeout=1800,
        check=False,
    )
    err = proc.stderr.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"the acceptor run failed ({proc.returncode}): {err[-3000:]}")
    match = re.search(r"Collected : (\d+)", err)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output: {err[-2000:]}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--loop", action="append", choices=["asyncio", "uvloop"])
    parser.add_argument("--batch", action="append", type=int, help="clients per wake (1, 16)")
    parser.add_argument("--rounds", type=int, nargs=2, default=[40, 240], metavar=("FEW", "MANY"))
    args = parser.parse_args()
    import aioancillary  # noqa: PLC0415 - the version under test (PYTHONPATH)

    print(f"aioancillary from {Path(aioancillary.__file__).parent}")
    few, many = args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        for loop_name in args.loop or ["asyncio", "uvloop"]:
            for batch in args.batch or [1, 16]:
                small = measure(loop_name, batch, few, Path(tmp) / "few.out")
                large = measure(loop_name, batch, many, Path(tmp) / "many.out")
                per = (large - small) / ((many - few) * batch)
                print(f"{loop_name:8} batch {batch:3}: {per:9.0f} instructions per handed client")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
