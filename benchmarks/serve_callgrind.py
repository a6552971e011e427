"""Instructions per request in one HTTP worker process: ``aioancillary serve``'s worker
(``AsgiAdapter`` on a ``Worker``; and ``aioancillary-accepting``, a worker of ``serve --accept
workers``: ``AsgiAdapter.accept_on``) against a uvicorn worker (what gunicorn's
``UvicornWorker`` and ``uvicorn --workers`` run: ``uvicorn.Server.serve(sockets=...)``), all
on uvloop with httptools, serving ``serve_app.py`` (callgrind).

Instruction counts do not depend on how loaded the machine is: this is the figure to compare
while the machine is shared, and to find where the worker spends them
(``callgrind_annotate`` on the files it keeps). The worker runs alone under
``valgrind --tool=callgrind``; the acceptor (for ``aioancillary``) and the C client
(``c/httpload.c``) run outside it. Each case is run for two request counts; the difference
over the difference of requests is the cost per request, without start-up. The acceptor's
own cost per connection is measured by ``acceptor_callgrind.py``.

Run::

    .venv/bin/python benchmarks/serve_callgrind.py                      # both modes, all three
    .venv/bin/python benchmarks/serve_callgrind.py --mode close --keep   # keep the callgrind files
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "_build" / "httpload"
#: aioancillary-accepting: a worker of ``serve --accept workers`` (``AsgiAdapter.accept_on``).
SERVERS = ("aioancillary", "aioancillary-accepting", "uvicorn")

CHILD = """
import asyncio, os, signal, socket, sys
import uvloop
sys.path.insert(0, {here!r})
server, lfd, wfd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def ours():
    from aioancillary import AsgiAdapter, Worker
    async with AsgiAdapter("serve_app:app", http="httptools") as adapter:
        async with await Worker.connect(sock=socket.socket(fileno=wfd)) as worker:
            print("ready", flush=True)
            await adapter.serve(worker)

async def theirs():
    import uvicorn
    config = uvicorn.Config("serve_app:app", http="httptools", log_config=None,
                            access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    print("ready", flush=True)
    await server.serve(sockets=[socket.socket(fileno=lfd)])

async def accepting():  # a worker of serve --accept workers
    from aioancillary import AsgiAdapter
    async with AsgiAdapter("serve_app:app", http="httptools") as adapter:
        await adapter.accept_on([socket.socket(fileno=lfd)])
        print("ready", flush=True)
        await asyncio.Event().wait()  # until the driver's SIGTERM

MAINS = {{"aioancillary": ours, "aioancillary-accepting": accepting, "uvicorn": theirs}}
uvloop.run(MAINS[server]())
"""


def instructions(out: Path) -> int:
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


async def one(server: str, mode: str, requests: int, out: Path) -> int:
    from aioancillary import Acceptor  # noqa: PLC0415 - the driver's own acceptor

    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = listener.getsockname()[1]
    ours, theirs = socket.socketpair()
    acceptor = Acceptor() if server == "aioancillary" else None
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
        sys.executable, "-c", CHILD.format(here=str(HERE)),
        server, str(listener.fileno()), str(theirs.fileno()),
    ]  # fmt: skip
    child = await asyncio.create_subprocess_exec(
        *command,
        pass_fds=(listener.fileno(), theirs.fileno()),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    theirs.close()
    assert child.stdout is not None
    assert (await child.stdout.readline()).strip() == b"ready"
    if acceptor is not None:
        acceptor.add_listener(listener)
        acceptor.add_worker(ours)
        await acceptor.wait_workers(1)
    await asyncio.sleep(0.5)
    client = await asyncio.create_subprocess_exec(
        str(CLIENT), "127.0.0.1", str(port), "--mode", mode, "--conns", "16",
        "--warmup", "0", "--requests", str(requests), "--timeout", "600",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output, _ = await client.communicate()
    assert b'"failed": 0' in output, output
    if acceptor is not None:
        acceptor.close()  # the worker's stream ends; it drains and exits
        await acceptor.wait_closed()
    else:
        child.send_signal(signal.SIGTERM)
        listener.close()
        ours.close()
    await child.wait()
    return instructions(out)


async def measure(server: str, mode: str, low: int, high: int, keep: Path | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        where = keep or Path(tmp)
        counts = []
        for n in (low, high):
            out = where / f"callgrind.{server}.{mode}.{n}"
            counts.append(await one(server, mode, n, out))
        return (counts[1] - counts[0]) / (high - low)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", action="append", choices=("keepalive", "close"))
    parser.add_argument("--server", action="append", choices=SERVERS)
    parser.add_argument("--low", type=int, default=1000)
    parser.add_argument("--high", type=int, default=3000)
    parser.add_argument("--keep", type=Path, help="keep the callgrind files in this directory")
    args = parser.parse_args(argv)
    if not CLIENT.exists():
        CLIENT.parent.mkdir(exist_ok=True)
        subprocess.run(["cc", "-O2", "-o", str(CLIENT), str(HERE / "c" / "httpload.c")], check=True)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    results = {}
    for mode in args.mode or ["keepalive", "close"]:
        for server in args.server or SERVERS:
            per = asyncio.run(measure(server, mode, args.low, args.high, args.keep))
            results[server, mode] = per
            print(f"{server:22} {mode:9}: {per:10,.0f} instructions per request", flush=True)
    for mode in args.mode or ["keepalive", "close"]:
        for ours in SERVERS[:2]:
            if (ours, mode) in results and ("uvicorn", mode) in results:
                ratio = results[ours, mode] / results["uvicorn", mode]
                print(f"{mode}: {ours}'s worker / uvicorn's worker = {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
