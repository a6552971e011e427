"""Entry point of a [`WorkerPool`][aioancillary.WorkerPool] worker process.

Run as ``python -m aioancillary._handoff._pool_child``.

The single argument is a JSON object from the pool: the handler's reference, the event loop
to run, the inherited fd of the link to the acceptor, and the parent's ``sys.path``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import Callable

from ._pool import resolve_handler
from ._worker import ClientHandler, Worker


async def _serve(sock: socket.socket, handler: ClientHandler) -> None:
    async with await Worker.connect(sock=sock) as worker:
        await worker.serve(handler)


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    # Terminal signals go to the whole process group; the pool decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for entry in reversed(config["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, config["fd"])
    handler = resolve_handler(config["handler"])
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if config["loop"] == "uvloop":
        import uvloop  # noqa: PLC0415 - optional dependency, only when asked for

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(sock, handler))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
