"""One server generation for the reload tests: inherits or creates, serves TCP, hands over.

``reload_app.py PATH LOOP LABEL [options]`` starts a generation on the handoff socket PATH on
the event loop LOOP (asyncio or uvloop), serves 127.0.0.1 TCP clients (a line in, an answer
out after a little work), and exits once a successor took over (or on SIGTERM), after its
in-flight connections finished. It prints JSON lines on stdout, one per event:

* ``{"event": "got-fds", "names": [...]}`` after the handoff fetched the predecessor's fds;
* ``{"event": "serving", "port", "inode", "generation", "from"}`` after ``ready()``;
* ``{"event": "log", "message"}`` for each warning the library logs;
* ``{"event": "failed", "error", "message"}`` when the handoff failed (exit status 2);
* ``{"event": "exit", "fds_before", "fds_after", "served", "cancelled", "handed_over"}``.

Options: ``--crash-after-fds`` (``os._exit(3)`` right after fetching the fds),
``--never-ready`` (fetch, serve, never call ``ready()``), ``--timeout S``,
``--ready-timeout S``, ``--first-ready-timeout S`` (the first handoff's ``ready`` deadline,
until one fails; later ones get ``--ready-timeout``), ``--drain S`` (deadline for in-flight
connections). Every deadline is
30 s by default, far beyond what any step takes on a loaded machine: a test that needs one to
fire sets it, and drives that step with a peer that never answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from aioancillary import AncillaryError, OwnedFd
from aioancillary._lifecycle._reload import start_generation

#: Every answer ends with this, so that a client can tell a full answer from a cut one.
PAYLOAD = "x" * 2000


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class EmitWarnings(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        #: Called with each message (the first-handoff timeout listens for its end).
        self.listeners: list[Callable[[str], None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        emit("log", message=message)
        for listener in self.listeners:
            listener(message)


WARNINGS = EmitWarnings(logging.WARNING)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def warm_up() -> None:
    """One stream on the loop before counting: libuv opens a reserve /dev/null fd (its EMFILE
    fallback) with a loop's first stream handle and keeps it until the loop closes."""
    left, right = socket.socketpair()
    _reader, writer = await asyncio.open_connection(sock=left)
    writer.close()
    await writer.wait_closed()
    right.close()


def new_state() -> OwnedFd:
    return OwnedFd(os.memfd_create("generation-state"))


async def main(args: argparse.Namespace) -> int:
    await warm_up()
    before = fd_count()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        gen = await start_generation(
            args.path, timeout=args.timeout, ready_timeout=args.ready_timeout, systemd=False
        )
    except AncillaryError as exc:
        emit("failed", error=type(exc).__name__, message=str(exc))
        return 2
    if args.first_ready_timeout is not None:
        # Only the first successor's "ready" has the short deadline (the test drives it with
        # a successor that never sends it); later successors get --ready-timeout.
        offering = gen._offering
        offering._ready_timeout = args.first_ready_timeout

        def restore(message: str) -> None:
            if "failed, still serving" in message:
                offering._ready_timeout = args.ready_timeout

        WARNINGS.listeners.append(restore)
    if gen.inherited.source == "predecessor":
        emit("got-fds", names=gen.inherited.names())
    if args.crash_after_fds:
        os._exit(3)  # mid-handoff: fds received, "ready" never sent

    web = gen.take_socket("web", create=lambda: socket.create_server(("127.0.0.1", 0), backlog=512))
    state = gen.take_fd("state", create=new_state)
    number = int.from_bytes(os.pread(state.fileno(), 8, 0) or bytes(8), "little") + 1
    os.pwrite(state.fileno(), number.to_bytes(8, "little"), 0)
    port = web.getsockname()[1]
    inode = os.fstat(web.fileno()).st_ino

    tasks: set[asyncio.Task[None]] = set()
    served = 0

    async def handle(sock: socket.socket) -> None:
        nonlocal served
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            await reader.readline()
            await asyncio.sleep(0.01)  # some work: connections are in flight at the switch
            writer.write(f"{args.label} {os.getpid()} {PAYLOAD}\n".encode())
            await writer.drain()
            served += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def on_acceptable() -> None:
        # Accepting by hand puts every connection in ``tasks`` the moment it leaves the
        # kernel's queue. (asyncio.Server creates its handler task some loop iterations after
        # accept(): a drain that starts in between would not see that connection.)
        while True:
            try:
                sock, _addr = web.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            task = loop.create_task(handle(sock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    web.setblocking(False)
    loop.add_reader(web.fileno(), on_acceptable)

    code = 0
    if args.never_ready:
        emit("serving-unready", port=port)
        await stop.wait()
    else:
        try:
            await gen.ready()
        except AncillaryError as exc:
            # The predecessor keeps serving: finish what this process accepted, then exit.
            emit("failed", error=type(exc).__name__, message=str(exc))
            code = 2
        else:
            source = gen.inherited.source
            emit("serving", port=port, inode=inode, generation=number, **{"from": source})
            handed = asyncio.ensure_future(gen.handed_over())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([handed, stopped], return_when=asyncio.FIRST_COMPLETED)
            handed.cancel()
            stopped.cancel()
    # Stop accepting: closes this process's copy only; a successor accepts from the same queue.
    loop.remove_reader(web.fileno())
    web.close()
    cancelled = 0
    if tasks:
        _done, late = await asyncio.wait(set(tasks), timeout=args.drain)
        for task in late:  # past the deadline: give up on these connections
            task.cancel()
        cancelled = len(late)
        await asyncio.gather(*late, return_exceptions=True)
    state.close()
    handed_over = gen.is_handed_over()
    await gen.close()
    emit(
        "exit",
        fds_before=before,
        fds_after=fd_count(),
        served=served,
        cancelled=cancelled,
        handed_over=handed_over,
    )
    return code


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("loop", choices=["asyncio", "uvloop"])
    parser.add_argument("label")
    parser.add_argument("--crash-after-fds", action="store_true")
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--ready-timeout", type=float, default=30.0)
    parser.add_argument("--first-ready-timeout", type=float, default=None)
    parser.add_argument("--drain", type=float, default=30.0)
    args = parser.parse_args()
    log = logging.getLogger("aioancillary")
    log.addHandler(WARNINGS)
    log.propagate = False
    factory = asyncio.new_event_loop
    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415 - only when asked for: the suite also runs without it

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        code = runner.run(main(args))
    raise SystemExit(code)


if __name__ == "__main__":
    cli()
