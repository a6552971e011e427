"""A worker process of ``python -m aioancillary serve``: the ``main`` its pool runs.

Each worker is a fresh interpreter: it runs ``--worker-init``, imports the application, runs
its startup, with ``--accept workers`` starts accepting on its copies of the listeners, and
only then connects to the runner's acceptor (the pool counts it as ready).
It serves until the acceptor ends its client stream (a reload, a smaller pool, a stop), then
stops gracefully within ``--graceful-timeout`` and runs the application's shutdown.

Exit status: 0 after a normal stop; `LOAD_FAILED` (4) when the application or the
worker-init function cannot be imported; `STARTUP_FAILED` (3) when the application's
startup (or the worker-init function) failed.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import signal
import sys
import traceback
from typing import Any, NoReturn

from .._core._errors import AppStartupError
from .._handoff._pool_worker import PoolWorker
from ._adapter import ClientAdapter, ProtocolAdapter
from ._options import ServeOptions
from ._streams import StreamAdapter

__all__ = ["LOAD_FAILED", "STARTUP_FAILED", "load_reference", "main", "make_adapter"]

logger = logging.getLogger("aioancillary.serve")

STARTUP_FAILED = 3
LOAD_FAILED = 4
#: What every process of the runner logs with: its pid says which worker wrote a line.
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """One stderr handler on the root logger with `LOG_FORMAT` (runner and workers)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)


class LoadError(Exception):
    """The application (or worker-init function) cannot be imported."""


def load_reference(reference: str, what: str) -> Any:
    """The object named by ``"module:attribute"`` (dotted attributes allowed).

    Raises:
        LoadError: the module cannot be imported or has no such attribute (chained).
    """
    module_name, _, attribute = reference.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise LoadError(
                f"cannot import the {what} {reference!r}: no module named {exc.name!r} "
                f"(is the current directory, {os.getcwd()!r}, the one that holds it?)"
            ) from exc
        raise
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LoadError(
                f"cannot find the {what} {reference!r}: module {module_name!r} has no "
                f"attribute {attribute!r}"
            ) from None
    return obj


async def make_adapter(app: Any, options: ServeOptions) -> ClientAdapter:
    """The adapter of ``options.interface`` for ``app`` (not started)."""
    interface = options.interface
    if interface == "asgi":
        _require("uvicorn", "asgi")
        from ._asgi import AsgiAdapter  # noqa: PLC0415 - needs uvicorn

        return AsgiAdapter(
            app,
            http=options.http,
            lifespan=options.lifespan,
            timeout_keep_alive=int(options.keep_alive),
            access_log=options.access_log,
        )
    if interface == "aiohttp":
        _require("aiohttp", "aiohttp")
        from ._aiohttp import AiohttpAdapter  # noqa: PLC0415 - needs aiohttp

        if not _is_aiohttp_app(app) and callable(app):
            app = app()  # a factory: web.run_app takes one too
            if inspect.isawaitable(app):
                app = await app
        return AiohttpAdapter(
            app, keepalive_timeout=options.keep_alive, access_log=options.access_log
        )
    if interface == "protocol":
        if not callable(app):
            raise TypeError(f"the protocol interface needs a protocol factory, got {app!r}")
        return ProtocolAdapter(app)
    if not inspect.iscoroutinefunction(app):
        raise TypeError(
            f"the handler interface needs an async def handler(reader, writer), got {app!r}"
        )
    return StreamAdapter(app)


def _require(module: str, extra: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise LoadError(
            f"the {extra} interface needs {module}: pip install 'aioancillary[{extra}]'"
        ) from None


def _is_aiohttp_app(app: Any) -> bool:
    from aiohttp import web  # noqa: PLC0415

    return isinstance(app, web.Application)


async def main(pool_worker: PoolWorker) -> None:
    """Serve the application of the runner's options (``pool_worker.args``)."""
    options = ServeOptions.from_json(pool_worker.args)
    configure_logging(options.log_level)
    if options.cwd not in sys.path:
        sys.path.insert(0, options.cwd)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # The runner decides about reloads and pool size; a TERM sent to the whole group (systemd's
    # default KillMode) stops this worker gracefully, like the runner's own stop.
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        if options.worker_init:
            result = load_reference(options.worker_init, "worker-init function")()
            if inspect.isawaitable(result):
                await result
    except LoadError as exc:
        _fail(LOAD_FAILED, f"error: {exc}")
    except Exception:
        _fail(STARTUP_FAILED, "error: the worker-init function failed:", trace=True)
    try:
        app = load_reference(options.app, "application")
        adapter = await make_adapter(app, options)
    except LoadError as exc:
        _fail(LOAD_FAILED, f"error: {exc}")
    except ImportError as exc:
        _fail(LOAD_FAILED, f"error: cannot import {options.app!r}: {exc}", trace=True)
    except Exception:
        _fail(LOAD_FAILED, f"error: cannot load {options.app!r}:", trace=True)
    try:
        await adapter.start()
    except AppStartupError as exc:
        _fail(STARTUP_FAILED, f"error: {exc}", trace=exc.__cause__ is not None)
    except Exception:
        _fail(STARTUP_FAILED, "error: the application's startup failed:", trace=True)
    try:
        if options.accept == "workers":
            # Accepting before connecting: the runner counts this worker as ready (and, in a
            # reload, retires the old ones) only once it serves.
            await adapter.accept_on(pool_worker.take_shared(), backlog=options.backlog)
        async with await pool_worker.connect() as worker:
            await adapter.serve(worker, graceful_timeout=options.graceful_timeout, stop=stop)
    finally:
        await adapter.close()


def _fail(status: int, message: str, *, trace: bool = False) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    if trace:
        traceback.print_exc()
    raise SystemExit(status)
