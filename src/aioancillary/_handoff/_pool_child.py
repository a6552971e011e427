"""Entry point of a [`WorkerPool`][aioancillary.WorkerPool] worker process.

Run as ``python -m aioancillary._handoff._pool_child CONFIG``, where CONFIG is a JSON object
from the pool: the handler's or main's reference, the pool's ``args``, the slot index, the
event loop to run, the inherited fds (the link to the acceptor, the ready pipe, the pool's
shared sockets) and the
parent's ``sys.path``.

Exit status: 0 when the main returned (the acceptor ended the client stream), 1 when it
raised, `LOAD_FAILED` when the handler or main could not be imported.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

from ._pool_worker import PoolWorker, resolve_reference, serve_handler

#: Exit status of a worker whose handler or main cannot be imported (as gunicorn's
#: ``APP_LOAD_ERROR``): nothing would change by restarting it.
LOAD_FAILED = 4


def _load(config: dict[str, Any]) -> Callable[[PoolWorker], Any]:
    if "main" in config:
        main: Callable[[PoolWorker], Any] = resolve_reference(config["main"])
        return main
    handler = resolve_reference(config["handler"])
    return lambda pool_worker: serve_handler(pool_worker, handler)


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    # Terminal signals go to the whole process group; the pool decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for entry in reversed(config["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    # pass_fds made them inheritable: processes this worker starts must not get them.
    shared: list[int] = config.get("shared", [])
    for fd in (config["fd"], config["ready"], *shared):
        os.set_inheritable(fd, False)
    args = config.get("args") or {}
    pool_worker = PoolWorker(config["index"], args, config["fd"], config["ready"], shared)
    try:
        try:
            target = _load(config)
        except Exception as exc:
            ref = (config.get("main") or config["handler"])["ref"]
            print(
                f"aioancillary worker {os.getpid()}: cannot load {ref!r}: "
                f"{type(exc).__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )
            if not isinstance(exc, ModuleNotFoundError | AttributeError):
                traceback.print_exc()
            return LOAD_FAILED
        factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
        if config["loop"] == "uvloop":
            import uvloop  # noqa: PLC0415 - optional dependency, only when asked for

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(target(pool_worker))
    finally:
        pool_worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
